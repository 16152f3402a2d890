"""Scenario 7, many jobs on one claim store: what a shared ``SQLiteClaimStore`` costs per run.

``bench/many_jobs.py``'s case, in fresh processes: 1,000 async no-op jobs at 1 s on the
wall-clock grid (``align=True``), all due at the same instants, once with one
``SQLiteClaimStore`` shared by every job (each run claims its tick and writes its run record:
the winner's path, two writes) and once without a store. A run's lateness is the wall clock at
its start minus its tick's instant; CPU is ``time.process_time`` of the process (every
thread), per 1,000 runs, first ticks left out. Rounds alternate the two cases; the figures
are medians over the rounds.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from _common import OURS, Headline, Params, Result, Section, fmt, fmt_ratio, median, ratio, table
from many_jobs import _case

CASES = {"none": "no store", "store": "one SQLiteClaimStore"}
TARGETS = {"p99_ms": 2.0, "cpu_ms_per_1000": 3.0}  # with a store, at most this × without


def plan(quick: bool) -> list[Params]:
    """Interleaved rounds of both cases."""
    jobs, ticks, rounds = (200, 2, 1) if quick else (1000, 8, 3)
    return [
        {"case": case, "jobs": jobs, "ticks": ticks, "round": r}
        for r in range(rounds)
        for case in CASES
    ]


def measure(params: Params) -> Result:
    """Lateness p50/p99 and CPU per 1,000 runs of one case."""
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "claims.db") if params["case"] == "store" else None
        return asyncio.run(_case(params["jobs"], params["ticks"], path))


def report(results: list[tuple[Params, Result]], out: Path) -> Section:
    """Medians per case, and the store's ratios against no store."""
    by: dict[str, list[Result]] = {case: [] for case in CASES}
    for params, result in results:
        by[params["case"]].append(result)
    med = {
        case: {k: median([r[k] for r in rs]) for k in ("p50_ms", "p99_ms", "cpu_ms_per_1000")}
        for case, rs in by.items()
    }
    first = results[0][0]
    rows = [
        [
            name,
            fmt(med[case]["p50_ms"]),
            fmt(med[case]["p99_ms"]),
            fmt(med[case]["cpu_ms_per_1000"]),
            ", ".join(
                f"{r['p50_ms']:.0f}/{r['p99_ms']:.0f}/{r['cpu_ms_per_1000']:.0f}" for r in by[case]
            ),
        ]
        for case, name in CASES.items()
    ]
    ratios = {k: ratio(med["store"][k], med["none"][k]) for k in ("p50_ms", *TARGETS)}
    rows.append(
        [
            "store ÷ no store",
            fmt_ratio(ratios["p50_ms"]),
            fmt_ratio(ratios["p99_ms"]),
            fmt_ratio(ratios["cpu_ms_per_1000"]),
            "",
        ]
    )
    body = (
        f"{first['jobs']:,} async no-op jobs at 1 s on the wall-clock grid, {first['ticks']} "
        f"ticks measured, {len(by['store'])} round(s) per case (`python bench/many_jobs.py` "
        "measures the same case once). Lateness: the run's start minus its tick's instant. "
        "With the store, every run claims its tick and writes its run record; the claims of "
        "the tasks due in one turn of the event loop share one transaction, and so do the run "
        "records (docs/many-workers.md says what a store costs).\n\n"
        + table(
            [
                "",
                "lateness p50, ms",
                "lateness p99, ms",
                "CPU ms per 1,000 runs",
                "each round (p50/p99/CPU)",
            ],
            rows,
        )
    )
    headline = [
        Headline(
            "7 stores",
            f"lateness p99, ms, {first['jobs']:,} jobs at 1 s on one SQLiteClaimStore "
            f"(no store: {fmt(med['none']['p99_ms'])})",
            {OURS: fmt(med["store"]["p99_ms"])},
            fmt_ratio(ratios["p99_ms"]),
            f"≤ {TARGETS['p99_ms']:g}× no store",
            ratios["p99_ms"] <= TARGETS["p99_ms"],
        ),
        Headline(
            "7 stores",
            f"CPU ms per 1,000 runs, same jobs (no store: {fmt(med['none']['cpu_ms_per_1000'])})",
            {OURS: fmt(med["store"]["cpu_ms_per_1000"])},
            fmt_ratio(ratios["cpu_ms_per_1000"]),
            f"≤ {TARGETS['cpu_ms_per_1000']:g}× no store",
            ratios["cpu_ms_per_1000"] <= TARGETS["cpu_ms_per_1000"],
        ),
    ]
    return Section("7. Many jobs on one claim store", body, headline)
