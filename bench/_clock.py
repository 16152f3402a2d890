"""Scenario 6, FakeClock at scale: many sleeping tasks, and a month of history.

Only repeat-every under ``repeat_every.testing.FakeClock`` (no other library offers the same):

- **one job**: a 1 s job for a day (86,400 runs), the per-run figure the others are set
  against. Alone, the job goes from tick to tick without a step of ``advance`` between (the
  clock's jump: nothing else is due in between), so this is the clock's cheapest path;
- **10 staggered jobs**: each every 1 s, job i first due at i/10 s, for an hour (36,000
  runs): every run has an instant of its own and another job is due before each job's next
  tick, so every run takes a step of ``advance`` and an event-loop iteration — the path the
  10,000 jobs take, with few sleepers: the reference for how a step scales with them;
- **10,000 staggered jobs**: each every 1 s, job i first due at i/10,000 s, so the clock has
  10,000 sleepers and every run an instant of its own, simulated for 60 virtual seconds
  (600,000 runs). If a step costs work proportional to the number of sleeping tasks, this is
  slow: the clock is advanced one virtual second at a time, and stopped once ``budget_s`` real
  seconds have gone by, so the run stays affordable; the table says how much was simulated;
- **30 days**: a 1 s job for a simulated month (2,592,000 runs) with the clock's default
  settings (its run history included), in a fresh process: peak resident set size
  (``resource.getrusage``'s ``ru_maxrss``, no tracemalloc, so it runs at full speed), and its
  growth over the baseline taken after the imports and the job's start.

The per-run figure is the time spent in ``advance`` divided by the runs it made; starting the
jobs (decorating, creating their tasks) is timed apart. Quick mode shrinks each case (1 job for
an hour; 1,000 jobs for 10 s; 1 simulated day, whose memory growth is then multiplied by 30 and
labelled as extrapolated).
"""

from __future__ import annotations

import asyncio
import math
import resource
import sys
import time
from pathlib import Path

from _common import (
    OURS,
    Headline,
    Params,
    Result,
    Section,
    fmt,
    fmt_ratio,
    ratio,
    rss_bytes,
    table,
)

DAY = 86_400
MONTH = 30 * DAY
SCALE_TARGET = 2.0  # the many-task µs per run, over the one-job figure
RSS_TARGET_MIB = 100.0
MIB = 1024 * 1024


def plan(quick: bool) -> list[Params]:
    """The one-job reference, the staggered crowd, the month (smaller in quick mode)."""
    return [
        {"case": "one job", "jobs": 1, "horizon": 3600 if quick else DAY, "budget_s": None},
        {"case": "few staggered", "jobs": 10, "horizon": 600 if quick else 3600, "budget_s": None},
        {
            "case": "staggered",
            "jobs": 1000 if quick else 10_000,
            "horizon": 10 if quick else 60,
            "budget_s": 10.0 if quick else 60.0,
        },
        {"case": "month", "jobs": 1, "horizon": DAY if quick else MONTH, "budget_s": None},
    ]


def measure(params: Params) -> Result:
    """Start the jobs under a FakeClock, advance; time it, count runs and memory."""
    return asyncio.run(_measure(params["jobs"], params["horizon"], params["budget_s"]))


async def _measure(jobs: int, horizon: int, budget_s: float | None) -> Result:
    from repeat_every import repeat_every
    from repeat_every.testing import FakeClock

    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1

    period = 1.0
    t0 = time.perf_counter()
    tasks = [
        repeat_every(seconds=period, wait_first=i * period / jobs, name=f"job-{i}")(job)
        for i in range(jobs)
    ]
    with FakeClock() as clock:
        handles = [task() for task in tasks]
        await asyncio.sleep(0)  # every task takes its first step and sleeps on the clock
        t1 = time.perf_counter()
        rss_base = _peak_rss()
        # One advance, or (with a budget) one virtual second at a time until the budget is spent.
        step = horizon if budget_s is None else 1
        while clock.now < horizon:
            await clock.advance(min(step, horizon - clock.now))
            if budget_s is not None and time.perf_counter() - t1 > budget_s:
                break
        t2 = time.perf_counter()
        rss_peak = _peak_rss()
        rss_now = rss_bytes()
        history = len(clock.history)
        simulated = clock.now
        for handle in handles:
            handle.cancel()
        await asyncio.gather(*(handle.wait() for handle in handles), return_exceptions=True)
    return {
        "start_s": t1 - t0,
        "advance_s": t2 - t1,
        "runs": runs,
        "simulated_s": simulated,
        "rss_base": rss_base,
        "rss_peak": rss_peak,
        "rss_end": rss_now,
        "history": history,
    }


def _peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; Linux: KiB


def report(results: list[tuple[Params, Result]], out: Path) -> Section:
    """µs per run (one job vs many), peak RSS over a month."""
    by_case = {p["case"]: (p, r) for p, r in results}
    body: list[str] = []
    headline: list[Headline] = []

    def us(case: str) -> float:
        if case not in by_case:
            return math.nan
        r = by_case[case][1]
        return float(r["advance_s"]) / r["runs"] * 1e6 if r["runs"] else math.nan

    rows = []
    for case in ("one job", "few staggered", "staggered"):
        if case not in by_case:
            continue
        p, r = by_case[case]
        partial = r["simulated_s"] < p["horizon"]
        rows.append(
            [
                f"{p['jobs']:,} job{'s' if p['jobs'] > 1 else ''}"
                + (", staggered" if p["jobs"] > 1 else ""),
                f"{p['horizon']:,} s",
                f"{r['simulated_s']:,.0f} s"
                + (f" (stopped after {p['budget_s']:g} s of real time)" if partial else ""),
                f"{r['runs']:,}",
                fmt(r["start_s"]),
                fmt(r["advance_s"]),
                fmt(us(case)),
                fmt_ratio(ratio(us(case), us("one job"))),
            ]
        )
    if rows:
        body.append(
            "**Many sleeping tasks.** µs per run = real time spent in `advance` / runs made "
            "(starting the jobs is timed apart); ratio = this row's µs per run / one job's "
            "(one job alone takes the clock's cheapest path: see the module's docstring).\n\n"
            + table(
                [
                    "",
                    "asked",
                    "simulated",
                    "runs",
                    "start-up s",
                    "advance s",
                    "µs / run",
                    "ratio",
                ],
                rows,
            )
        )
    if "staggered" in by_case and "few staggered" in by_case:
        p, r = by_case["staggered"]
        few = by_case["few staggered"][0]["jobs"]
        over = ratio(us("staggered"), us("few staggered"))
        partial = r["simulated_s"] < p["horizon"]
        headline.append(
            Headline(
                "6 FakeClock scale",
                f"µs per run, {p['jobs']:,} staggered jobs for {p['horizon']:g} s"
                + (f" (only {r['simulated_s']:g} s simulated: budget)" if partial else "")
                + f" vs {few} staggered jobs (the same path, few sleepers; 1 job alone: "
                + f"{fmt(us('one job'))}, {fmt_ratio(ratio(us('staggered'), us('one job')))})",
                {OURS: f"{fmt(us('staggered'))} vs {fmt(us('few staggered'))}"},
                fmt_ratio(over),
                f"≤ {SCALE_TARGET:g}× {few} staggered",
                over <= SCALE_TARGET,
            )
        )
    if "month" in by_case:
        p, r = by_case["month"]
        factor = MONTH / r["simulated_s"] if r["simulated_s"] else math.nan
        growth = r["rss_peak"] - r["rss_base"]
        peak_month = r["rss_base"] + growth * factor
        extrapolated = r["simulated_s"] < MONTH
        days = r["simulated_s"] / DAY
        label = "30 days" + (
            f" (extrapolated ×{factor:g} from {days:g} simulated)" if extrapolated else ""
        )
        body.append(
            f"**A simulated month of a 1 s job.** Default `FakeClock()`, {days:g} day(s) "
            f"simulated in one `advance`: {r['runs']:,} runs in {fmt(r['advance_s'])} s "
            f"({fmt(us('month'))} µs per run), {r['history']:,} records kept in "
            "`clock.history`. RSS from `getrusage` (peak) in a fresh process; the baseline is "
            "taken after the imports and the job's start.\n\n"
            + table(
                [
                    "",
                    "baseline MiB",
                    "peak MiB",
                    "growth MiB",
                    "bytes / run",
                    "peak over 30 days, MiB",
                ],
                [
                    [
                        "FakeClock, 1 job every 1 s",
                        fmt(r["rss_base"] / MIB),
                        fmt(r["rss_peak"] / MIB),
                        fmt(growth / MIB),
                        fmt(growth / r["runs"]) if r["runs"] else "—",
                        fmt(peak_month / MIB) + (" (extrapolated)" if extrapolated else ""),
                    ]
                ],
            )
        )
        headline.append(
            Headline(
                "6 FakeClock scale",
                f"peak RSS, MiB: {label} of a 1 s job ({MONTH:,} runs), default settings",
                {OURS: fmt(peak_month / MIB)},
                "—",
                f"< {RSS_TARGET_MIB:g} MiB",
                peak_month / MIB < RSS_TARGET_MIB,
            )
        )
    return Section("6. FakeClock at scale", "\n\n".join(body), headline)
