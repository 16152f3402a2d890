"""Scenario 3, scale: how many idle periodic jobs one event loop can hold, and how fast they start.

``tasks`` jobs with a one-hour period that wait one period before their first run are started
on one loop (each job decorated on its own, as an application would), and the loop is let run
until every one of them is asleep. Measured in two fresh processes per contender:

- untraced: the time to decorate, the time to start and settle (until every job sleeps), and
  the growth of the resident set size (RSS, from ``/proc``) divided by ``tasks``;
- traced: the bytes Python allocated for the jobs (``tracemalloc``) divided by ``tasks``, the
  precise figure (RSS includes allocator slack and is page-grained).

Both baselines are taken after the contender's library is imported, so its import is not
charged to its tasks.

The jobs are kept alive the way each library allows: repeat-every holds its handles itself,
the bare loop keeps its ``asyncio.Task`` objects in a set (asyncio keeps only weak references),
fastapi-utils returns nothing, so the figure shows what its tasks cost while they survive.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from pathlib import Path
from typing import Any

from _common import (
    BARE,
    FASTAPI_UTILS,
    OURS,
    Headline,
    Params,
    Result,
    Section,
    available,
    bare_fixed_rate,
    fmt,
    fmt_ratio,
    ratio,
    rss_bytes,
    table,
)

CONTENDERS = (OURS, BARE, FASTAPI_UTILS)
TARGET = 2.0
PERIOD = 3600.0


def plan(quick: bool) -> list[Params]:
    """An untraced and a traced process per contender."""
    tasks = 5_000 if quick else 100_000
    return [
        {"contender": c, "tasks": tasks, "traced": traced}
        for traced in (False, True)
        for c in CONTENDERS
        if available(c)
    ]


def measure(params: Params) -> Result:
    """Decorate and start ``tasks`` idle jobs; time it and count the memory."""
    return asyncio.run(_measure(**params))


async def _measure(contender: str, tasks: int, traced: bool) -> Result:
    async def job() -> None:  # never runs: the jobs wait an hour first
        pass

    # Import first: the baseline must not charge a library's import to its tasks.
    if contender == OURS:
        from repeat_every import repeat_every
    elif contender == FASTAPI_UTILS:
        from fastapi_utils.tasks import repeat_every as fu_repeat_every
    gc.collect()
    if traced:
        tracemalloc.start()
    memory0 = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    keep: list[Any] = []
    if contender == OURS:
        t0 = time.perf_counter()
        decorated = [
            repeat_every(seconds=PERIOD, wait_first=True, name=f"job-{i}")(job)
            for i in range(tasks)
        ]
        t1 = time.perf_counter()
        keep = [task() for task in decorated]
    elif contender == FASTAPI_UTILS:
        t0 = time.perf_counter()
        wrapped = [fu_repeat_every(seconds=PERIOD, wait_first=PERIOD)(job) for _ in range(tasks)]
        t1 = time.perf_counter()
        for start in wrapped:
            await start()
        keep = wrapped
    elif contender == BARE:
        t0 = t1 = time.perf_counter()
        running: set[asyncio.Task[int]] = set()
        for _ in range(tasks):
            running.add(asyncio.create_task(bare_fixed_rate(job, PERIOD, first_delay=PERIOD)))
        keep = [running]
    else:
        raise ValueError(f"unknown contender {contender!r}")
    # Every new task takes its first step on the next loop iteration and goes to sleep.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    t2 = time.perf_counter()
    sleeping = sum(1 for t in asyncio.all_tasks() if t is not asyncio.current_task())
    memory1 = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
    if traced:
        tracemalloc.stop()
    assert len(keep) > 0
    return {
        "decorate_s": t1 - t0,
        "start_s": t2 - t1,
        "sleeping": sleeping,
        "bytes": None if memory0 is None or memory1 is None else memory1 - memory0,
    }


def report(results: list[tuple[Params, Result]], out: Path) -> Section:
    """Bytes per task (traced and RSS), decoration and start-up times, ratios to the bare loop."""
    untraced = {p["contender"]: r for p, r in results if not p["traced"]}
    traced = {p["contender"]: r for p, r in results if p["traced"]}
    tasks = results[0][0]["tasks"]

    def per_task(r: Result | None) -> float:
        return float("nan") if r is None or r["bytes"] is None else r["bytes"] / tasks

    bare_traced = per_task(traced.get(BARE))
    bare_total = _total(untraced.get(BARE))
    rows = []
    for c in CONTENDERS:
        t, u = traced.get(c), untraced.get(c)
        rows.append(
            [
                c,
                fmt(per_task(t)),
                fmt_ratio(ratio(per_task(t), bare_traced)),
                fmt(per_task(u)),
                "—" if u is None else fmt(u["decorate_s"]),
                "—" if u is None else fmt(u["start_s"]),
                fmt_ratio(ratio(_total(u), bare_total)),
                "—" if u is None else f"{u['sleeping']:,}",
            ]
        )
    body = (
        f"{tasks:,} idle jobs (period {PERIOD:g} s, first run after one period) on one event "
        "loop. Start-up = decorating every job + starting it and letting the loop run until "
        "every job sleeps.\n\n"
        + table(
            [
                "",
                "traced bytes / task",
                "ratio",
                "RSS bytes / task",
                "decorate s",
                "start + settle s",
                "start-up ratio",
                "tasks asleep",
            ],
            rows,
        )
    )
    ours_traced = per_task(traced.get(OURS))
    mem_ratio = ratio(ours_traced, bare_traced)
    startup_ratio = ratio(_total(untraced.get(OURS)), bare_total)
    headline = [
        Headline(
            "3 scale",
            f"memory per idle task, bytes ({tasks:,} tasks, tracemalloc)",
            {c: fmt(per_task(traced.get(c))) for c in CONTENDERS if c in traced},
            fmt_ratio(mem_ratio),
            f"≤ {TARGET:g}× bare",
            mem_ratio <= TARGET,
        ),
        Headline(
            "3 scale",
            f"start-up of {tasks:,} tasks, s",
            {c: fmt(_total(untraced.get(c))) for c in CONTENDERS if c in untraced},
            fmt_ratio(startup_ratio),
            "—",
            None,
        ),
    ]
    return Section("3. Scale", body, headline)


def _total(r: Result | None) -> float:
    return float("nan") if r is None else float(r["decorate_s"] + r["start_s"])
