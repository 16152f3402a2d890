"""Scenario 4, virtual time: how long a test takes to simulate hours of periodic jobs.

Four cases: *a day* (one job every second for 86,400 s); *a day of a sleeping job* (the same,
but each run awaits ``asyncio.sleep(0.25)`` twice, as a job that polls or backs off does);
*a fleet* (100 jobs every second for an hour: 360,000 runs, all on the same instants, the
best case for an event-loop clock, which pays per distinct instant); and a *staggered fleet*
(100 jobs every second, job i offset by i/100 s, so every run has an instant of its own, as
jobs started at different moments do; 15 minutes, to keep the run short). Each job only
counts its runs (and sleeps, in the second case). Contenders, each in a fresh process:

- repeat-every under ``repeat_every.testing.FakeClock``: jobs decorated and started under the
  clock, then one ``await clock.advance(horizon)``;
- looptime (an event loop whose clock is virtual) running fastapi-utils' ``repeat_every`` jobs,
  which is how a fastapi-utils user gets virtual time today, then ``await
  asyncio.sleep(horizon)``; also, for reference, looptime running the bare loop and
  repeat-every (given ``clock=loop.time``: looptime fakes the loop's clock, not
  ``time.monotonic``). Every looptime row is measured twice: with looptime's defaults, and with
  its public ``noop_cycles=1`` option (``looptime.new_event_loop(noop_cycles=1)``, or
  ``@pytest.mark.looptime(noop_cycles=1)``), which makes it idle one loop cycle instead of 42
  before each jump of its clock;
- trio's ``MockClock(autojump_threshold=0)`` through anyio, running a bare anyio loop.

Wall time covers decorating and starting the jobs and simulating the horizon (not imports or
teardown), for every contender alike. The figure compared is µs of real time per run (wall
time / runs: fastapi-utils sleeps a full period *after* each run, so with a sleeping job it
does fewer runs in the same horizon), against the floor: one bare asyncio future wake-up
(``_common.wakeup_floor``) per wait a run makes — its tick, plus each sleep inside it.

The sleeping day's FakeClock is given ``FakeClock(timeout=0.2)``: a FakeClock whose runs'
``asyncio.sleep`` were not virtual (before 0.2) raised ``RunStalledError`` at the first run
instead of taking 0.5 real seconds per run, and the row then reads "unsupported (stalls)".
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from _common import (
    BARE,
    FASTAPI_UTILS,
    FLOOR,
    LOOPTIME,
    LOOPTIME_FAST,
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
    wakeup_floor,
)

# name: (jobs, horizon s, staggered, sleeps inside each run) — full size; quick sizes below.
CASES: dict[str, tuple[int, int, bool, tuple[float, ...]]] = {
    "day": (1, 86_400, False, ()),
    "sleeping day": (1, 86_400, False, (0.25, 0.25)),
    "fleet": (100, 3600, False, ()),
    "staggered fleet": (100, 900, True, ()),
}
QUICK_CASES: dict[str, tuple[int, int, bool, tuple[float, ...]]] = {
    "day": (1, 1200, False, ()),
    "sleeping day": (1, 600, False, (0.25, 0.25)),
    "fleet": (10, 120, False, ()),
    "staggered fleet": (10, 120, True, ()),
}
# (driver, job) per case; the reference rows for the ratios are looptime + fastapi-utils.
EVERY_LOOPTIME = (
    (LOOPTIME, FASTAPI_UTILS),
    (LOOPTIME_FAST, FASTAPI_UTILS),
    (LOOPTIME, BARE),
    (LOOPTIME_FAST, BARE),
    (LOOPTIME, OURS),
    (LOOPTIME_FAST, OURS),
)
CONTENDERS = ((OURS, OURS), *EVERY_LOOPTIME, (TRIO, BARE))
# Looptime by default costs ~40 s per row on the sleeping day: the repeat-every row is measured
# with noop_cycles=1 only (the fastapi-utils row gives the default's figure).
SLEEPING_CONTENDERS = (
    (OURS, OURS),
    (LOOPTIME, FASTAPI_UTILS),
    (LOOPTIME_FAST, FASTAPI_UTILS),
    (LOOPTIME_FAST, OURS),
    (TRIO, BARE),
)
QUICK_CONTENDERS = ((OURS, OURS), (LOOPTIME, FASTAPI_UTILS), (LOOPTIME_FAST, FASTAPI_UTILS))
REFERENCE = (LOOPTIME, FASTAPI_UTILS)
REFERENCE_FAST = (LOOPTIME_FAST, FASTAPI_UTILS)
# What FakeClock must beat, per case: (× looptime's default, × looptime noop_cycles=1 or None).
TARGETS: dict[str, tuple[float, float | None]] = {
    "day": (20.0, 3.0),
    "sleeping day": (10.0, 2.0),
    "fleet": (20.0, None),
    "staggered fleet": (20.0, None),
}
FLOOR_TARGET = 2.0  # FakeClock's µs per run on the day, over the wake-up floor
STALL_TIMEOUT = 0.2  # FakeClock(timeout=…) on the sleeping day: real seconds a run may wait
FLOOR_CASE = "floor"
DRIVER_LABEL = {
    OURS: "FakeClock",
    LOOPTIME: "looptime (default)",
    LOOPTIME_FAST: "looptime noop_cycles=1",
    TRIO: "trio MockClock via anyio",
}


def plan(quick: bool) -> list[Params]:
    """The floor, then every case for every contender (smaller and fewer in quick mode)."""
    params: list[Params] = [
        {"contender": FLOOR, "case": FLOOR_CASE, "n": 10_000 if quick else 200_000}
    ]
    for case, (jobs, horizon, staggered, sleeps) in (QUICK_CASES if quick else CASES).items():
        contenders: tuple[tuple[str, str], ...]
        if quick:
            contenders = (*QUICK_CONTENDERS, (TRIO, BARE)) if case == "day" else QUICK_CONTENDERS
        else:
            contenders = SLEEPING_CONTENDERS if sleeps else CONTENDERS
        params += [
            {
                "contender": driver,
                "job": job,
                "case": case,
                "jobs": jobs,
                "period": 1.0,
                "horizon": horizon,
                "staggered": staggered,
                "sleeps": list(sleeps),
            }
            for driver, job in contenders
            if available(driver) and available(job)
        ]
    return params


def _offsets(jobs: int, period: float, staggered: bool) -> list[float]:
    """When each job first runs: all at once, or spread evenly over one period."""
    return [i * period / jobs if staggered else 0.0 for i in range(jobs)]


def measure(params: Params) -> Result:
    """Simulate ``horizon`` virtual seconds of ``jobs`` jobs; return wall seconds and runs."""
    driver = params["contender"]
    if driver == FLOOR:
        return {"us": wakeup_floor(params["n"])}
    offsets = _offsets(params["jobs"], params["period"], params["staggered"])
    args = (params["job"], offsets, params["period"], params["horizon"], params["sleeps"])
    if driver == OURS:
        return asyncio.run(_fake_clock(*args))
    if driver in (LOOPTIME, LOOPTIME_FAST):
        import looptime

        options = {"noop_cycles": 1} if driver == LOOPTIME_FAST else {}
        return _run_on(looptime.new_event_loop(start=0, **options), _looptime(*args))
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


def looptime_default_noop_cycles() -> int | None:
    """How many idle cycles looptime spends before each jump by default (its signature's)."""
    try:
        import looptime
    except ImportError:
        return None
    parameter = inspect.signature(looptime.LoopTimeEventLoop.setup_looptime).parameters
    default = parameter["noop_cycles"].default if "noop_cycles" in parameter else None
    return default if isinstance(default, int) else None


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


def _counting_job(
    sleeps: list[float], sleep: Callable[[float], Awaitable[Any]]
) -> tuple[Callable[[], Coroutine[Any, Any, None]], Callable[[], int]]:
    """A job that counts its runs and awaits ``sleep(s)`` for each ``s`` in ``sleeps``."""
    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1
        for seconds in sleeps:
            await sleep(seconds)

    def count() -> int:
        return runs

    return job, count


async def _fake_clock(
    job_kind: str, offsets: list[float], period: float, horizon: float, sleeps: list[float]
) -> Result:
    from repeat_every import repeat_every
    from repeat_every.testing import FakeClock, RunStalledError

    job, runs = _counting_job(sleeps, asyncio.sleep)
    stalled: str | None = None
    t0 = time.perf_counter()
    tasks = [
        repeat_every(seconds=period, wait_first=offset, name=f"job-{i}")(job)
        for i, offset in enumerate(offsets)
    ]
    clock = FakeClock(timeout=STALL_TIMEOUT) if sleeps else FakeClock()
    with clock:
        handles = [task() for task in tasks]
        try:
            await clock.advance(horizon)
        except RunStalledError as error:
            stalled = str(error).splitlines()[0]
        wall = time.perf_counter() - t0
        for handle in handles:
            handle.cancel()
        await asyncio.gather(*(handle.wait() for handle in handles), return_exceptions=True)
    return {"wall_s": wall, "runs": runs(), "virtual_s": clock.now, "stalled": stalled}


async def _looptime(
    job_kind: str, offsets: list[float], period: float, horizon: float, sleeps: list[float]
) -> Result:
    loop = asyncio.get_running_loop()
    job, runs = _counting_job(sleeps, asyncio.sleep)
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
    return {"wall_s": wall, "runs": runs(), "virtual_s": loop.time() - start, "kept": len(keep)}


async def _trio(
    job_kind: str, offsets: list[float], period: float, horizon: float, sleeps: list[float]
) -> Result:
    import anyio

    job, runs = _counting_job(sleeps, anyio.sleep)

    async def fixed_rate(offset: float) -> None:
        origin = anyio.current_time() + offset
        k = 0
        while True:
            delay = origin + k * period - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
            await job()
            k = max(k + 1, math.ceil((anyio.current_time() - origin) / period))

    t0 = time.perf_counter()
    start = anyio.current_time()
    async with anyio.create_task_group() as group:
        for offset in offsets:
            group.start_soon(fixed_rate, offset)
        await anyio.sleep(horizon)
        wall = time.perf_counter() - t0
        virtual = anyio.current_time() - start
        group.cancel_scope.cancel()
    return {"wall_s": wall, "runs": runs(), "virtual_s": virtual}


# -- report ------------------------------------------------------------------------------------

Rows = dict[tuple[str, str], tuple[Params, Result]]


def _us_per_run(result: Result | None) -> float:
    """µs of real time per run; NaN when the contender could not run the case."""
    if result is None or result.get("stalled") or not result.get("runs"):
        return math.nan
    return float(result["wall_s"]) / int(result["runs"]) * 1e6


def _title(params: Params) -> str:
    jobs, horizon = params["jobs"], params["horizon"]
    title = f"{jobs} job{'s' if jobs > 1 else ''} every {params['period']:g} s for " + (
        f"{horizon / 3600:g} h" if horizon >= 3600 else f"{horizon / 60:g} min"
    )
    if params["sleeps"]:
        title += ", each run sleeps " + " + ".join(f"{s:g} s" for s in params["sleeps"])
    if params["staggered"]:
        title += ", staggered"
    elif jobs > 1:
        title += ", in step"
    return title


def report(results: list[tuple[Params, Result]], out: Path) -> Section:
    """µs per run per case and contender, against the floor and looptime (both settings)."""
    floor_ways: dict[str, float] = {}
    cases: dict[str, Rows] = {}
    for params, result in results:
        if params["case"] == FLOOR_CASE:
            floor_ways = result["us"]
            continue
        cases.setdefault(params["case"], {})[(params["contender"], params["job"])] = (
            params,
            result,
        )
    floor = min(floor_ways.values()) if floor_ways else math.nan
    noop_default = looptime_default_noop_cycles()
    body: list[str] = [
        "µs per run = wall time (decorating and starting the jobs, then simulating the horizon) "
        "/ runs. *× floor* = µs per run / (the bare wake-up floor × the waits in one run: its "
        "tick plus each sleep inside it). *FakeClock faster by* = this row's µs per run / "
        "FakeClock's. looptime (default) idles "
        + (f"{noop_default} loop cycles" if noop_default else "its default number of cycles")
        + " before each jump of its clock; `noop_cycles=1` is its public option to idle one.",
        _floor_text(floor_ways),
    ]
    headline: list[Headline] = []
    for case, rows_by in cases.items():
        any_params = next(iter(rows_by.values()))[0]
        waits = 1 + len(any_params["sleeps"])
        title = _title(any_params)
        ours = rows_by.get((OURS, OURS))
        ours_us = _us_per_run(ours[1] if ours else None)
        rows = []
        for key in CONTENDERS:
            if key not in rows_by:
                continue
            _, r = rows_by[key]
            us = _us_per_run(r)
            if r.get("stalled"):
                rows.append([_label(key, " + "), "unsupported (stalls)", "—", "—", "—", "—"])
                continue
            rows.append(
                [
                    _label(key, " + "),
                    fmt(r["wall_s"]),
                    f"{r['runs']:,}",
                    fmt(us),
                    fmt_ratio(ratio(us, floor * waits)),
                    fmt_ratio(ratio(us, ours_us)),
                ]
            )
        text = f"**{title}**\n\n" + table(
            ["", "wall s", "runs", "µs / run", "× floor", "FakeClock faster by"], rows
        )
        if ours and ours[1].get("stalled"):
            text += f"\n\nFakeClock: `{ours[1]['stalled']}`"
        body.append(text)
        headline.append(_case_headline(case, title, rows_by, ours_us, floor * waits))
        if case == "day" and not math.isnan(ours_us):
            over = ratio(ours_us, floor)
            headline.append(
                Headline(
                    "4 virtual time",
                    f"FakeClock µs per run over the bare wake-up floor ({title})",
                    {OURS: fmt(ours_us), FLOOR: fmt(floor)},
                    fmt_ratio(over),
                    f"≤ {FLOOR_TARGET:g}× floor",
                    over <= FLOOR_TARGET,
                )
            )
    plot = "virtual_time.png"
    if _plot(cases, floor, out / plot):
        body.append(f"![µs per simulated run, per case and contender]({plot})")
    else:
        body.append("(No plot: matplotlib is not installed.)")
    return Section("4. Virtual time", "\n\n".join(body), headline)


def _floor_text(ways: dict[str, float]) -> str:
    if not ways:
        return "(The floor was not measured.)"
    cheapest = min(ways, key=ways.__getitem__)
    return (
        "**The floor: one bare future wake-up.** A task parks on a new future and resumes when "
        "something resolves it — the least a virtual clock does per wait, with no clock, "
        "schedule or job around it. Measured three ways in the same run (µs per wake-up, best "
        "of 3): "
        + "; ".join(f"`{name}` {fmt(us)}" for name, us in ways.items())
        + f". The floor is the cheapest, `{cheapest}`: {fmt(ways[cheapest])} µs."
    )


def _case_headline(
    case: str, title: str, rows_by: Rows, ours_us: float, floor_us: float
) -> Headline:
    reference = _us_per_run(rows_by[REFERENCE][1]) if REFERENCE in rows_by else math.nan
    fast = _us_per_run(rows_by[REFERENCE_FAST][1]) if REFERENCE_FAST in rows_by else math.nan
    trio = _us_per_run(rows_by[(TRIO, BARE)][1]) if (TRIO, BARE) in rows_by else math.nan
    target, target_fast = TARGETS.get(case, (20.0, None))
    values = {FLOOR: fmt(floor_us)}
    for column, us in ((LOOPTIME, reference), (LOOPTIME_FAST, fast), (TRIO, trio)):
        if not math.isnan(us):
            values[column] = fmt(us)
    runs = next(iter(rows_by.values()))[0]
    n_runs = runs["jobs"] * runs["horizon"] / runs["period"]
    measure = f"{title} (~{n_runs:,.0f} runs), µs per run"
    wanted = f"≥ {target:g}× looptime" + (
        f", ≥ {target_fast:g}× noop_cycles=1" if target_fast else ""
    )
    ours = rows_by.get((OURS, OURS))
    if ours is None or ours[1].get("stalled"):
        values[OURS] = "unsupported (stalls)" if ours else "—"
        return Headline("4 virtual time", measure, values, "—", wanted, False)
    values[OURS] = fmt(ours_us)
    speedup, speedup_fast = ratio(reference, ours_us), ratio(fast, ours_us)
    met = speedup >= target and (target_fast is None or speedup_fast >= target_fast)
    return Headline(
        "4 virtual time",
        measure,
        values,
        f"{speedup:.1f}× / {speedup_fast:.1f}× faster",
        wanted,
        met,
    )


def _label(key: tuple[str, str], joiner: str) -> str:
    driver, job = key
    job_label = "bare anyio loop" if driver == TRIO else job
    return f"{DRIVER_LABEL[driver]}{joiner}{job_label} job"


def _plot(cases: dict[str, Rows], floor: float, path: Path) -> bool:
    """One panel per case, one bar per contender, on one shared log axis of µs per run."""
    plt = pyplot()
    if plt is None:
        return False

    keys_by_case = {case: [k for k in CONTENDERS if k in rows] for case, rows in cases.items()}
    heights = [max(2, len(keys)) for keys in keys_by_case.values()]
    fig, axes = plt.subplots(
        len(cases),
        1,
        figsize=(11, 1.2 + 0.42 * sum(heights) + 0.5 * len(cases)),
        sharex=True,
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    finite = [
        _us_per_run(r)
        for rows in cases.values()
        for _, r in rows.values()
        if not math.isnan(_us_per_run(r))
    ]
    right = max([*finite, floor * 3 if not math.isnan(floor) else 1.0]) * 4
    for ax, (case, rows_by) in zip(axes[:, 0], cases.items(), strict=True):
        keys = keys_by_case[case]
        p = next(iter(rows_by.values()))[0]
        waits = 1 + len(p["sleeps"])
        labels = [_label(k, " + ") for k in keys]
        values = [_us_per_run(rows_by[k][1]) for k in keys]
        colors = [
            "tab:green"
            if k == (OURS, OURS)
            else "tab:blue"
            if k[0] == LOOPTIME_FAST
            else "tab:purple"
            if k[0] == TRIO
            else "tab:gray"
            for k in keys
        ]
        bars = ax.barh(labels, [0 if math.isnan(v) else v for v in values], color=colors)
        for bar, value in zip(bars, values, strict=True):
            y = bar.get_y() + bar.get_height() / 2
            if math.isnan(value):
                ax.text(1, y, "  unsupported (stalls)", va="center", color="tab:red")
            else:
                ax.text(value, y, f" {fmt(value)}", va="center")
        if not math.isnan(floor):
            ax.axvline(floor * waits, color="black", linestyle="--", linewidth=1.2)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(left=1, right=right)
        ax.set_title(f"{_title(p)}  (floor: {waits} wake-up{'s' if waits > 1 else ''})", loc="left")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    axes[-1][0].set_xlabel(
        "µs of real time per simulated run (log scale, less is better)\n"
        "dashed line: the floor, one bare future wake-up per wait in a run"
    )
    fig.suptitle("Virtual time: real cost of one simulated run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
