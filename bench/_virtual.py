"""Scenario 4, virtual time: how long a test takes to simulate hours of periodic jobs.

Three cases: *a day* (one job every second for 86,400 s); *a fleet* (100 jobs every second for
an hour: 360,000 runs, all on the same instants, the best case for an event-loop clock, which
pays per distinct instant); and a *staggered fleet* (100 jobs every second, job i offset by
i/100 s, so every run has an instant of its own, as jobs started at different moments do; 15
minutes, to keep the run short). Each job only counts its runs. Contenders, each in a fresh
process:

- repeat-every under ``repeat_every.testing.FakeClock``: jobs started under the clock, then one
  ``await clock.advance(horizon)``;
- looptime (an event loop whose clock is virtual) running fastapi-utils' ``repeat_every`` jobs,
  which is how a fastapi-utils user gets virtual time today, then ``await
  asyncio.sleep(horizon)``; also, for reference, looptime running the bare loop and
  repeat-every (given ``clock=loop.time``: looptime fakes the loop's clock, not
  ``time.monotonic``);
- trio's ``MockClock(autojump_threshold=0)`` through anyio, running a bare anyio loop.

Wall time covers starting the jobs and simulating the horizon (not imports or teardown); the
ratio is looptime-with-fastapi-utils over FakeClock. ``runs`` shows every contender did the
same work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from _common import (
    BARE,
    FASTAPI_UTILS,
    LOOPTIME,
    OURS,
    TRIO,
    Headline,
    Params,
    Result,
    Section,
    available,
    bare_fixed_rate,
    fmt,
    fmt_ratio,
    pyplot,
    ratio,
    table,
)

TARGET = 20.0
# (driver, job): the reference row for the ratio is (LOOPTIME, FASTAPI_UTILS).
CONTENDERS = (
    (OURS, OURS),
    (LOOPTIME, FASTAPI_UTILS),
    (LOOPTIME, BARE),
    (LOOPTIME, OURS),
    (TRIO, BARE),
)
DRIVER_LABEL = {OURS: "FakeClock", LOOPTIME: "looptime", TRIO: "trio MockClock via anyio"}


def plan(quick: bool) -> list[Params]:
    """Every case for every contender (smaller horizons in quick mode)."""
    cases = {  # name: (jobs, horizon, staggered)
        "day": (1, 3600 if quick else 86_400, False),
        "fleet": (10 if quick else 100, 600 if quick else 3600, False),
        "staggered fleet": (10 if quick else 100, 600 if quick else 900, True),
    }
    return [
        {
            "contender": driver,
            "job": job,
            "case": case,
            "jobs": jobs,
            "period": 1.0,
            "horizon": horizon,
            "staggered": staggered,
        }
        for case, (jobs, horizon, staggered) in cases.items()
        for driver, job in CONTENDERS
        if available(driver) and available(job)
    ]


def _offsets(jobs: int, period: float, staggered: bool) -> list[float]:
    """When each job first runs: all at once, or spread evenly over one period."""
    return [i * period / jobs if staggered else 0.0 for i in range(jobs)]


def measure(params: Params) -> Result:
    """Simulate ``horizon`` virtual seconds of ``jobs`` jobs; return wall seconds and runs."""
    driver = params["contender"]
    offsets = _offsets(params["jobs"], params["period"], params["staggered"])
    args = (params["job"], offsets, params["period"], params["horizon"])
    if driver == OURS:
        return asyncio.run(_fake_clock(*args))
    if driver == LOOPTIME:
        import looptime

        return _run_on(looptime.new_event_loop(start=0, _enabled=True), _looptime(*args))
    if driver == TRIO:
        import anyio
        from trio.testing import MockClock

        result: Result = anyio.run(
            _trio,
            *args,
            backend="trio",
            backend_options={"clock": MockClock(autojump_threshold=0)},
        )
        return result
    raise ValueError(f"unknown contender {driver!r}")


def _run_on(loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, Result]) -> Result:
    """``asyncio.run`` on a given loop (``asyncio.Runner(loop_factory=…)`` needs 3.11)."""
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


async def _fake_clock(job_kind: str, offsets: list[float], period: float, horizon: float) -> Result:
    from repeat_every import repeat_every
    from repeat_every.testing import FakeClock

    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1

    tasks = [
        repeat_every(seconds=period, wait_first=offset, name=f"job-{i}")(job)
        for i, offset in enumerate(offsets)
    ]
    with FakeClock() as clock:
        t0 = time.perf_counter()
        handles = [task() for task in tasks]
        await clock.advance(horizon)
        wall = time.perf_counter() - t0
        for handle in handles:
            handle.cancel()
        await asyncio.gather(*(handle.wait() for handle in handles))
    return {"wall_s": wall, "runs": runs, "virtual_s": clock.now}


async def _looptime(job_kind: str, offsets: list[float], period: float, horizon: float) -> Result:
    loop = asyncio.get_running_loop()
    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1

    t0 = time.perf_counter()
    start = loop.time()
    keep: list[Any] = []
    if job_kind == FASTAPI_UTILS:
        from fastapi_utils.tasks import repeat_every as fu_repeat_every

        for offset in offsets:
            await fu_repeat_every(seconds=period, wait_first=offset or None)(job)()
    elif job_kind == BARE:
        keep = [
            asyncio.create_task(bare_fixed_rate(job, period, first_delay=offset))
            for offset in offsets
        ]
    elif job_kind == OURS:
        from repeat_every import repeat_every

        keep = [
            repeat_every(seconds=period, wait_first=offset, clock=loop.time, name=f"job-{i}")(job)()
            for i, offset in enumerate(offsets)
        ]
    else:
        raise ValueError(f"unknown job {job_kind!r}")
    await asyncio.sleep(horizon)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "runs": runs, "virtual_s": loop.time() - start, "kept": len(keep)}


async def _trio(job_kind: str, offsets: list[float], period: float, horizon: float) -> Result:
    import anyio

    runs = 0

    async def fixed_rate(offset: float) -> None:
        nonlocal runs
        origin = anyio.current_time() + offset
        k = 0
        while True:
            delay = origin + k * period - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
            runs += 1
            k += 1

    t0 = time.perf_counter()
    start = anyio.current_time()
    async with anyio.create_task_group() as group:
        for offset in offsets:
            group.start_soon(fixed_rate, offset)
        await anyio.sleep(horizon)
        wall = time.perf_counter() - t0
        virtual = anyio.current_time() - start
        group.cancel_scope.cancel()
    return {"wall_s": wall, "runs": runs, "virtual_s": virtual}


def report(results: list[tuple[Params, Result]], out: Path) -> Section:
    """Wall seconds per case and contender; ratio of looptime + fastapi-utils to FakeClock."""
    cases: dict[str, dict[tuple[str, str], tuple[Params, Result]]] = {}
    for params, result in results:
        cases.setdefault(params["case"], {})[(params["contender"], params["job"])] = (
            params,
            result,
        )
    body: list[str] = [
        "Wall seconds to simulate the horizon (starting the jobs included); µs per run = wall "
        "time / runs; ratio = this row's wall time / FakeClock's."
    ]
    headline: list[Headline] = []
    for rows_by in cases.values():
        any_params = next(iter(rows_by.values()))[0]
        jobs, horizon = any_params["jobs"], any_params["horizon"]
        title = f"{jobs} job{'s' if jobs > 1 else ''} every {any_params['period']:g} s for " + (
            f"{horizon / 3600:g} h" if horizon >= 3600 else f"{horizon / 60:g} min"
        )
        if any_params["staggered"]:
            title += ", staggered"
        elif jobs > 1:
            title += ", in step"
        ours = rows_by.get((OURS, OURS))
        ours_wall = ours[1]["wall_s"] if ours else float("nan")
        rows = []
        for key in CONTENDERS:
            if key not in rows_by:
                continue
            _, r = rows_by[key]
            rows.append(
                [
                    _label(key, " + "),
                    fmt(r["wall_s"]),
                    f"{r['runs']:,}",
                    fmt(r["wall_s"] / r["runs"] * 1e6),
                    fmt_ratio(ratio(r["wall_s"], ours_wall)),
                ]
            )
        body.append(f"**{title}**\n\n" + table(["", "wall s", "runs", "µs / run", "ratio"], rows))
        reference = rows_by.get((LOOPTIME, FASTAPI_UTILS))
        trio = rows_by.get((TRIO, BARE))
        speedup = ratio(reference[1]["wall_s"], ours_wall) if reference else float("nan")
        values = {OURS: fmt(ours_wall)}
        if reference:
            values[LOOPTIME] = fmt(reference[1]["wall_s"])
        if trio:
            values[TRIO] = fmt(trio[1]["wall_s"])
        headline.append(
            Headline(
                "4 virtual time",
                f"{title} ({jobs * horizon / any_params['period']:,.0f} runs), wall s",
                values,
                f"{speedup:.1f}× faster",
                f"≥ {TARGET:g}× faster than looptime",
                speedup >= TARGET,
            )
        )
    plot = "virtual_time.png"
    if _plot(cases, out / plot):
        body.append(f"![virtual time]({plot})")
    else:
        body.append("(No plot: matplotlib is not installed.)")
    return Section("4. Virtual time", "\n\n".join(body), headline)


def _label(key: tuple[str, str], joiner: str) -> str:
    driver, job = key
    job_label = "bare anyio loop" if driver == TRIO else job
    return f"{DRIVER_LABEL[driver]}{joiner}{job_label} job"


def _plot(cases: dict[str, dict[tuple[str, str], tuple[Params, Result]]], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False

    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.6), squeeze=False)
    for ax, (case, rows_by) in zip(axes[0], cases.items(), strict=True):
        keys = [k for k in CONTENDERS if k in rows_by]
        labels = [_label(k, "\n+ ") for k in keys]
        walls = [rows_by[k][1]["wall_s"] for k in keys]
        colors = ["tab:green" if k == (OURS, OURS) else "tab:gray" for k in keys]
        ax.barh(labels, walls, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("wall seconds (less is better)")
        p = next(iter(rows_by.values()))[0]
        ax.set_title(f"{case}: {p['jobs']} job(s), {p['horizon']:,.0f} virtual s")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
