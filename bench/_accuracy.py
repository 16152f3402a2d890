"""Scenario 1, accuracy: does "every 10 ms" start every 10 ms when each run blocks for 2 ms?

Each contender runs a job ``runs`` times at ``period``; the job records the monotonic instant it
starts, then blocks for ``work`` seconds (``time.sleep``: code that blocks, as a synchronous
database driver or a CPU-bound step does). Lateness of run k = its start − (t0 + k × period),
where t0 is the instant the loop was started. *Drift* is how much later the runs end up than
they started out: the median lateness of the last tenth minus that of the first tenth.

Two variants: the job as an ``async def`` that blocks the event loop, and as a ``def`` that each
library runs in a worker thread (repeat-every: the loop's default executor; fastapi-utils:
Starlette's thread pool; bare loop: ``loop.run_in_executor``).
"""

from __future__ import annotations

import asyncio
import time
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
    median,
    percentile,
    pyplot,
    ratio,
    table,
)

CONTENDERS = (OURS, BARE, FASTAPI_UTILS)
VARIANTS = {"async": "`async def` job blocking the loop", "thread": "`def` job in a worker thread"}
DRIFT_LIMIT_MS = 1.0  # "no drift": the runs end up less than a tenth of a period later
# Below a tenth of a millisecond a ratio of two p99s measures the machine's noise, not the loop.
P99_SLACK_MS = 0.1


def plan(quick: bool) -> list[Params]:
    """One child process per contender, variant and round (rounds interleaved)."""
    runs, rounds = (100, 1) if quick else (500, 3)
    return [
        {"contender": c, "variant": v, "round": r, "runs": runs, "period": 0.010, "work": 0.002}
        for v in VARIANTS
        for r in range(rounds)
        for c in CONTENDERS
        if available(c)
    ]


def measure(params: Params) -> Result:
    """Run one contender: each run's lateness in milliseconds, and the ticks it skipped."""
    params = dict(params)
    params.pop("round")
    return asyncio.run(_measure(**params))


async def _measure(contender: str, variant: str, runs: int, period: float, work: float) -> Result:
    starts: list[float] = []
    clock = time.monotonic

    def blocking_job() -> None:
        starts.append(clock())
        time.sleep(work)

    async def async_job() -> None:
        starts.append(clock())
        time.sleep(work)  # blocks the event loop on purpose

    in_thread = variant == "thread"
    t0 = clock()
    skipped: int | None = None  # fastapi-utils never skips: it sleeps after each run
    if contender == OURS:
        from repeat_every import repeat_every

        job: Any = blocking_job if in_thread else async_job
        task = repeat_every(seconds=period, max_repetitions=runs, name="accuracy")(job)
        t0 = clock()
        handle = task()
        await handle.wait()
        skipped = handle.skipped
    elif contender == FASTAPI_UTILS:
        from fastapi_utils.tasks import repeat_every as fu_repeat_every

        finished = asyncio.Event()

        async def on_complete() -> None:
            finished.set()

        job = blocking_job if in_thread else async_job
        wrapped = fu_repeat_every(seconds=period, max_repetitions=runs, on_complete=on_complete)(
            job
        )
        t0 = clock()
        await wrapped()
        await finished.wait()
    elif contender == BARE:
        loop = asyncio.get_running_loop()

        async def in_executor() -> None:
            await loop.run_in_executor(None, blocking_job)

        t0 = clock()
        skipped = await asyncio.create_task(
            bare_fixed_rate(in_executor if in_thread else async_job, period, runs=runs)
        )
    else:
        raise ValueError(f"unknown contender {contender!r}")
    lateness = [(start - (t0 + k * period)) * 1000 for k, start in enumerate(starts)]
    return {"lateness_ms": lateness, "skipped": skipped}


def _stats(lateness: list[float]) -> dict[str, float]:
    tenth = max(1, len(lateness) // 10)
    return {
        "p50": percentile(lateness, 50),
        "p99": percentile(lateness, 99),
        "max": max(lateness),
        "drift": median(lateness[-tenth:]) - median(lateness[:tenth]),
    }


def report(results: list[tuple[Params, Result]], out: Path) -> Section:
    """Tables per variant (median of the rounds), the headline lines, and the lateness plot."""
    rounds: dict[tuple[str, str], list[Result]] = {}
    for params, result in results:
        rounds.setdefault((params["variant"], params["contender"]), []).append(result)
    first = results[0][0]
    runs, period_ms, work_ms = first["runs"], first["period"] * 1000, first["work"] * 1000
    n_rounds = max(len(r) for r in rounds.values())
    body = [
        f"{runs} runs at a {period_ms:g} ms period, each blocking for {work_ms:g} ms; "
        f"{n_rounds} round(s) per contender in fresh processes, interleaved. Lateness of run "
        "k = its start − (t0 + k × period); drift = median lateness of the last tenth of the "
        "runs − that of the first tenth. Each figure is the median over the rounds; all in "
        "milliseconds. A skipped tick (a run that ended after the next tick was due: fixed-"
        "rate loops skip it rather than burst) shows as a one-period step in lateness.",
    ]
    headline: list[Headline] = []
    median_rounds: dict[tuple[str, str], list[float]] = {}
    for variant, title in VARIANTS.items():
        stats: dict[str, dict[str, float]] = {}
        rows = []
        for c in CONTENDERS:
            if (variant, c) not in rounds:
                continue
            per_round = [_stats(r["lateness_ms"]) for r in rounds[(variant, c)]]
            stats[c] = {k: median([st[k] for st in per_round]) for k in per_round[0]}
            by_p99 = sorted(range(len(per_round)), key=lambda i: per_round[i]["p99"])
            middle = rounds[(variant, c)][by_p99[len(by_p99) // 2]]
            median_rounds[(variant, c)] = middle["lateness_ms"]
            skipped = [r["skipped"] for r in rounds[(variant, c)]]
            rows.append(
                [
                    c,
                    *(fmt(stats[c][k]) for k in ("p50", "p99", "max", "drift")),
                    " / ".join(fmt(st["p99"]) for st in per_round),
                    " / ".join("n/a" if k is None else str(k) for k in skipped),
                ]
            )
        body.append(
            f"**{title}**\n\n"
            + table(["", "p50", "p99", "max", "drift", "p99 each round", "ticks skipped"], rows)
        )
        ours, bare = stats[OURS], stats[BARE]
        p99_ratio = ratio(ours["p99"], bare["p99"])
        label = "async job" if variant == "async" else "def job in a thread"
        headline.append(
            Headline(
                "1 accuracy",
                f"lateness p99, ms ({label})",
                {c: fmt(st["p99"]) for c, st in stats.items()},
                fmt_ratio(p99_ratio),
                f"≤ 2× bare (or within {P99_SLACK_MS:g} ms of it)",
                p99_ratio <= 2 or ours["p99"] <= bare["p99"] + P99_SLACK_MS,
            )
        )
        headline.append(
            Headline(
                "1 accuracy",
                f"drift over {runs} runs, ms ({label})",
                {c: fmt(st["drift"]) for c, st in stats.items()},
                "—",
                f"< {DRIFT_LIMIT_MS:g} ms",
                abs(ours["drift"]) < DRIFT_LIMIT_MS,
            )
        )
    plot = "accuracy_lateness.png"
    if _plot(median_rounds, out / plot, period_ms, work_ms):
        body.append(f"![lateness over time (the median round of each)]({plot})")
    else:
        body.append("(No plot: matplotlib is not installed.)")
    return Section("1. Accuracy", "\n\n".join(body), headline)


def _plot(
    by_key: dict[tuple[str, str], list[float]], path: Path, period_ms: float, work_ms: float
) -> bool:
    plt = pyplot()
    if plt is None:
        return False

    variants = [v for v in VARIANTS if any(k[0] == v for k in by_key)]
    fig, axes = plt.subplots(
        1, len(variants), figsize=(6 * len(variants), 4), sharey=True, squeeze=False
    )
    styles = {OURS: ("tab:green", 1.6), BARE: ("tab:gray", 1.0), FASTAPI_UTILS: ("tab:red", 1.0)}
    for ax, variant in zip(axes[0], variants, strict=True):
        for contender in CONTENDERS:
            lateness = by_key.get((variant, contender))
            if lateness is None:
                continue
            color, width = styles[contender]
            ax.plot(range(len(lateness)), lateness, label=contender, color=color, linewidth=width)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(VARIANTS[variant].replace("`", ""))
        ax.set_xlabel("run")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("lateness of the start (ms, symlog)")
    axes[0][0].legend()
    fig.suptitle(f"Every {period_ms:g} ms, {work_ms:g} ms of blocking work per run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
