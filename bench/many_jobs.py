"""1,000 jobs due at the same instants sharing one SQLiteClaimStore, against no store.

Usage (from the repository root)::

    python bench/many_jobs.py               # 1,000 jobs at 1 s, 8 ticks each
    python bench/many_jobs.py --jobs 200 --ticks 4
    python bench/many_jobs.py --stores sqlite,redis,postgres   # also on throwaway servers

Each case runs in a fresh process: ``jobs`` async no-op jobs with ``seconds=1`` on the
wall-clock grid (``align=True``), every one claiming its tick in the same store in the store
case (one worker, so every claim is won: the winner's path, a write) and writing its run record
after the run (a second write). ``python bench/run.py --only stores`` runs the same case in
interleaved rounds (scenario 7 of RESULTS.md). A run's lateness is the
wall clock at its start minus its tick's instant. It prints the p50 and p99 lateness and the
CPU time of the process (every thread) per 1,000 runs, first tick left out (start-up).

The tasks of one store due at the same instant claim together: the first to wake claims
every task's tick in one ``claim_many`` call (docs/many-workers.md). ``--stores`` adds
``RedisClaimStore`` and ``PostgresClaimStore`` cases, on servers started from the test
extra's wheels (tests/servers.py), as bench/claims.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_NAMES = {
    "none": "no store",
    "store": "one SQLiteClaimStore",
    "redis": "one RedisClaimStore",
    "postgres": "one PostgresClaimStore",
}


async def _case(
    jobs: int, ticks: int, store_path: str | None, server: str | None = None
) -> dict[str, float]:
    """One case in this process: ``store_path`` for SQLite, or ``server`` (a Redis URL or a
    PostgreSQL DSN), or neither for no store."""
    from repeat_every import repeat_every, run_tasks
    from repeat_every.stores import PostgresClaimStore, RedisClaimStore, SQLiteClaimStore

    store: Any = None
    if server is not None and server.startswith("redis"):
        store = RedisClaimStore(server)
    elif server is not None:
        store = PostgresClaimStore(server)
    elif store_path:
        store = SQLiteClaimStore(store_path)
    late: list[float] = []
    start_tick = math.ceil(time.time()) + 2  # the first tick measured
    end_tick = start_tick + ticks

    def make(i: int) -> object:
        @repeat_every(seconds=1, align=True, store=store, name=f"job-{i}")
        async def job() -> None:
            now = time.time()
            tick = round(now)
            if start_tick <= tick < end_tick:
                late.append(now - tick)

        return job

    tasks = [make(i) for i in range(jobs)]
    if store is not None:
        await store.claim("warm-up", 0, 60)
    async with run_tasks(*tasks):  # type: ignore[arg-type]
        await asyncio.sleep(start_tick - time.time() - 0.5)
        cpu = time.process_time()
        await asyncio.sleep(end_tick - time.time() - 0.5)
        cpu = time.process_time() - cpu
    if store is not None:
        await store.aclose()
    late.sort()
    return {
        "runs": len(late),
        "p50_ms": statistics.median(late) * 1000,
        "p99_ms": statistics.quantiles(late, n=100, method="inclusive")[98] * 1000,
        "cpu_ms_per_1000": cpu / max(1, len(late)) * 1000 * 1000,
    }


@contextlib.contextmanager
def _servers(names: list[str]) -> Iterator[dict[str, str]]:
    """Throwaway servers for the cases that need one: case → URL or DSN."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from servers import PostgresServer, RedisServer

    started: list[Any] = []
    urls: dict[str, str] = {}
    try:
        if "redis" in names:
            redis = RedisServer()
            redis.start()
            started.append(redis)
            urls["redis"] = redis.url
        if "postgres" in names:
            postgres = PostgresServer()
            postgres.start()
            started.append(postgres)
            urls["postgres"] = postgres.dsn
        yield urls
    finally:
        for server in started:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=8)
    parser.add_argument(
        "--stores", default="sqlite", help="comma-separated: sqlite, redis, postgres"
    )
    parser.add_argument("--case", choices=list(_NAMES), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        path = args.path if args.case == "store" else None
        server = args.server if args.case in ("redis", "postgres") else None
        print(json.dumps(asyncio.run(_case(args.jobs, args.ticks, path, server))))
        return
    wanted = [name.strip() for name in args.stores.split(",") if name.strip()]
    cases = ["none"] + [{"sqlite": "store"}.get(name, name) for name in wanted]
    if unknown := [c for c in cases if c not in _NAMES]:
        parser.error(f"--stores takes sqlite, redis, postgres; got {', '.join(unknown)}")
    print(f"{args.jobs} jobs at 1 s, {args.ticks} ticks; lateness in ms, CPU ms per 1,000 runs")
    print("| case | runs | lateness p50 | lateness p99 | CPU per 1,000 runs |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder, _servers(cases) as urls:
        for case in cases:
            command = [
                sys.executable,
                __file__,
                "--jobs",
                str(args.jobs),
                "--ticks",
                str(args.ticks),
                "--case",
                case,
                "--path",
                str(Path(folder) / "claims.db"),
            ]
            if case in urls:
                command += ["--server", urls[case]]
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {_NAMES[case]} | {r['runs']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                f"| {r['cpu_ms_per_1000']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
