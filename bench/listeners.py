"""What an event listener costs per run: none, a no-op one, the Prometheus and OpenTelemetry
metrics.

Usage (from the repository root)::

    python bench/listeners.py            # 5 interleaved rounds of each case
    python bench/listeners.py --quick    # 1 round: a smoke run

Each round of each case runs in a fresh process: ``tasks`` jobs at a 10 ms period on one event
loop, each only counting its run (as in ``_overhead.py``, scenario 2), with:

- **no listener**: the library as shipped (the runner tests an empty list at each emit point);
- **no-op listener**: ``add_listener(lambda event: None)``: the cost of building and handing
  out the events (an attempt's start and end and the run's end: three events per run);
- **Prometheus**: ``PrometheusMetrics(registry=CollectorRegistry())``;
- **OpenTelemetry**: ``OpenTelemetryMetrics`` on an SDK ``MeterProvider`` with an
  ``InMemoryMetricReader`` (collected once, at the end).

After a warm-up, the process's CPU time (``time.process_time``) and the runs are read over the
window; the figure is CPU µs per run, best (lowest) of the rounds that kept up (at least
``KEPT_UP`` of the due runs done: a saturated loop no longer measures the cost of a run; on a
shared machine other processes only add CPU time), and its difference and ratio to *no
listener*. 50 jobs (5,000 runs a second) keep even the OpenTelemetry case below one core.
The machine is shared and noisy: compare the cases of one run, not figures across runs.
Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

CASES = ("no listener", "no-op listener", "Prometheus", "OpenTelemetry")
KEPT_UP = 0.95  # a round with fewer of its due runs done is saturated, left out of the best


async def _measure(case: str, tasks: int, period: float, seconds: float, warmup: float) -> Any:
    from repeat_every import add_listener, repeat_every

    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1

    reader: Any = None
    if case == "no-op listener":
        add_listener(lambda event: None)
    elif case == "Prometheus":
        from prometheus_client import CollectorRegistry

        from repeat_every.metrics.prometheus import PrometheusMetrics

        PrometheusMetrics(registry=CollectorRegistry())
    elif case == "OpenTelemetry":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from repeat_every.metrics.opentelemetry import OpenTelemetryMetrics

        reader = InMemoryMetricReader()
        OpenTelemetryMetrics(meter_provider=MeterProvider(metric_readers=[reader]))
    elif case != "no listener":
        raise ValueError(f"unknown case {case!r}")

    handles = [repeat_every(seconds=period, name=f"job-{i}")(job)() for i in range(tasks)]
    await asyncio.sleep(warmup)
    cpu0, runs0, wall0 = time.process_time(), runs, time.perf_counter()
    await asyncio.sleep(seconds)
    cpu1, runs1, wall1 = time.process_time(), runs, time.perf_counter()
    if reader is not None:
        reader.get_metrics_data()  # the data is really there (not timed)
    for handle in handles:
        handle.cancel()
    return {
        "cpu_s": cpu1 - cpu0,
        "runs": runs1 - runs0,
        "due": tasks * (wall1 - wall0) / period,
    }


def _child(case: str, tasks: int, seconds: float) -> None:
    result = asyncio.run(_measure(case, tasks, 0.010, seconds, 0.5))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round: a smoke run")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.tasks, args.seconds)
        return
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = 1.0 if args.quick else args.seconds
    per_run: dict[str, list[float]] = {case: [] for case in CASES}
    kept_up: dict[str, list[float]] = {case: [] for case in CASES}
    load0 = os.getloadavg()
    for r in range(rounds):
        for case in CASES:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    case,
                    "--tasks",
                    str(args.tasks),
                    "--seconds",
                    str(seconds),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout)
            per_run[case].append(result["cpu_s"] / result["runs"] * 1e6)
            kept_up[case].append(result["runs"] / result["due"])
            print(
                f"round {r + 1}/{rounds} {case:>15}: {per_run[case][-1]:6.2f} µs/run, "
                f"{kept_up[case][-1] * 100:.0f} % of due runs",
                file=sys.stderr,
            )
    load1 = os.getloadavg()
    best = {
        case: min(
            (v for v, k in zip(per_run[case], kept_up[case], strict=True) if k >= KEPT_UP),
            default=float("nan"),
        )
        for case in CASES
    }
    base = best["no listener"]
    print(
        f"\n{args.tasks} jobs at 10 ms, {seconds:g} s per round, best of {rounds} round(s); "
        f"load average {load0[0]:.2f} → {load1[0]:.2f}\n"
    )
    print("| case | CPU µs per run (best) | each round | vs no listener | runs done / due |")
    print("| :-- | --: | --: | --: | --: |")
    for case in CASES:
        rounds_text = " / ".join(
            f"{v:.2f}" + ("" if k >= KEPT_UP else " (sat.)")
            for v, k in zip(per_run[case], kept_up[case], strict=True)
        )
        done = " / ".join(f"{v * 100:.0f} %" for v in kept_up[case])
        print(
            f"| {case} | {best[case]:.2f} | {rounds_text} | +{best[case] - base:.2f} µs "
            f"({best[case] / base:.2f}×) | {done} |"
        )


if __name__ == "__main__":
    main()
