"""Claim latency of each claim store, against the same statement sent through the bare driver.

Usage (from the repository root)::

    python bench/claims.py            # 2,000 claims per store and case
    python bench/claims.py --quick    # 200: a smoke run
    python bench/claims.py --redis-url redis://host:6379/0 --postgres-dsn postgresql://…

Without ``--redis-url``/``--postgres-dsn`` it starts throwaway servers on 127.0.0.1 from the
test extra's wheels (tests/servers.py); SQLite uses a file in a temporary folder.

For each store it times, one claim at a time from one process:

- **won**: ``store.claim(task, tick, 60)`` on a new tick (the winner's path: a write, which
  also notes the task's last claimed tick);
- **won + record**: the same claim followed by ``store.record_run(...)``, what a worker that
  keeps run records pays per tick;
- **lost**: the same ticks claimed again through a second store instance (the path every
  other worker takes);
- **bare driver**: the same winning statement sent straight through the driver
  (``sqlite3`` on the event loop's thread, ``redis.asyncio``'s ``SET NX PX``, asyncpg's
  ``fetchval``): the floor, without the store's checks, thread hop or pool.

It prints p50/p99 in microseconds and the ratio of the store's won p50 to the bare driver's.

Then, for each store that has ``claim_many``, 1,000 tasks due at the same instant, each
claiming its own new tick (what the task loop hands a store at a shared instant):

- **claim_many**: one ``await store.claim_many(claims)`` of the 1,000;
- **gather**: 1,000 ``store.claim(...)`` at once, through ``asyncio.gather``;
- **sequential**: 1,000 ``await store.claim(...)``, one after the other.

It prints the median over several rounds (5, or 2 with ``--quick``) of each's wall time and
of this process's CPU time, in milliseconds, and the ratios to ``claim_many``.
The machines these run on are shared and noisy: read the ratios, not absolute times across
runs. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import PostgresServer, RedisServer

from repeat_every.stores import (
    PostgresClaimStore,
    RedisClaimStore,
    SQLiteClaimStore,
)

Claim = Callable[[int], Awaitable[Any]]


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def _time(claim: Claim, ticks: range) -> list[float]:
    """Microseconds of each ``claim(tick)``."""
    out = []
    for tick in ticks:
        started = time.perf_counter_ns()
        await claim(tick)
        out.append((time.perf_counter_ns() - started) / 1000)
    return out


async def _measure(
    winner: Any, loser: Any, bare: Claim, bare_cleanup: Callable[[], Awaitable[None]], n: int
) -> dict[str, list[float]]:
    task = f"bench-{uuid.uuid4().hex[:8]}"
    warm = range(10**9, 10**9 + 20)  # connect, prepare, fill caches
    for tick in warm:
        await winner.claim(task, tick, 60)
        await loser.claim(task, tick, 60)
        await bare(tick)
    ticks = range(n)
    won = await _time(lambda t: winner.claim(task, t, 60), ticks)
    lost = await _time(lambda t: loser.claim(task, t, 60), ticks)

    async def claim_and_record(tick: int) -> None:
        await winner.claim(task, tick, 60)
        await winner.record_run(task, tick, time.time(), 0.001)

    recorded = await _time(claim_and_record, range(n, 2 * n))
    raw = await _time(bare, range(2 * n, 3 * n))
    await bare_cleanup()
    return {"won": won, "recorded": recorded, "lost": lost, "bare": raw}


async def _sqlite(folder: Path, n: int) -> dict[str, list[float]]:
    path = folder / "claims.db"
    async with SQLiteClaimStore(path) as winner, SQLiteClaimStore(path) as loser:
        await winner.claim("create-the-table", 0, 60)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA synchronous = NORMAL")
        now = time.time()
        bare_task = f"bench-bare-{uuid.uuid4().hex[:8]}"

        async def bare(tick: int) -> Any:
            return conn.execute(
                "INSERT INTO repeat_every_claims (task, tick, owner, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (task, tick) DO UPDATE SET owner = excluded.owner, "
                "expires = excluded.expires WHERE repeat_every_claims.expires <= ?",
                (bare_task, tick, "bench", now + 60, now),
            ).rowcount

        async def cleanup() -> None:
            conn.close()

        return await _measure(winner, loser, bare, cleanup, n)


async def _redis(url: str, n: int) -> dict[str, list[float]]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    prefix = f"bench-bare-{uuid.uuid4().hex[:8]}"

    async def bare(tick: int) -> Any:
        return await client.set(f"{prefix}:{tick}", "bench", nx=True, px=60_000)

    async with RedisClaimStore(url) as winner, RedisClaimStore(url) as loser:
        return await _measure(winner, loser, bare, client.aclose, n)


async def _postgres(dsn: str, n: int) -> dict[str, list[float]]:
    import asyncpg

    async with PostgresClaimStore(dsn) as winner, PostgresClaimStore(dsn) as loser:
        await winner.claim("create-the-table", 0, 60)
        conn = await asyncpg.connect(dsn)
        bare_task = f"bench-bare-{uuid.uuid4().hex[:8]}"

        async def bare(tick: int) -> Any:
            return await conn.fetchval(
                "INSERT INTO repeat_every_claims AS c (task, tick, owner, expires_at) "
                "VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4)) "
                "ON CONFLICT (task, tick) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at WHERE c.expires_at <= clock_timestamp() "
                "RETURNING true",
                bare_task,
                tick,
                "bench",
                60.0,
            )

        return await _measure(winner, loser, bare, conn.close, n)


BATCH = 1000  # claims due at the same instant


async def _batches(store: Any, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(wall ms, CPU ms) of claiming ``BATCH`` new ticks each way, ``rounds`` times."""
    run = uuid.uuid4().hex[:8]
    await store.claim_many([(f"bench-many-{run}-warm", 0, 60.0, time.time())])
    out: dict[str, list[tuple[float, float]]] = {"many": [], "gather": [], "sequential": []}

    async def many(claims: list[tuple[str, int, float, float]]) -> list[bool]:
        won: list[bool] = await store.claim_many(claims)
        return won

    async def gather(claims: list[tuple[str, int, float, float]]) -> list[bool]:
        return list(
            await asyncio.gather(*(store.claim(t, k, ttl, deadline=d) for t, k, ttl, d in claims))
        )

    async def sequential(claims: list[tuple[str, int, float, float]]) -> list[bool]:
        return [await store.claim(t, k, ttl, deadline=d) for t, k, ttl, d in claims]

    ways = {"many": many, "gather": gather, "sequential": sequential}
    for r in range(rounds):
        for way, claim in ways.items():
            now = time.time()
            claims = [(f"bench-many-{run}-{n}", r, 60.0, now) for n in range(BATCH)]
            wall, cpu = time.perf_counter_ns(), time.process_time_ns()
            won = await claim(claims)
            out[way].append(
                ((time.perf_counter_ns() - wall) / 1e6, (time.process_time_ns() - cpu) / 1e6)
            )
            assert won == [True] * BATCH, f"{way}: {won.count(False)} claims lost"
            run = uuid.uuid4().hex[:8]  # new tasks for the next way: every claim is new
    return out


async def _sqlite_batches(folder: Path, rounds: int) -> dict[str, list[tuple[float, float]]]:
    async with SQLiteClaimStore(folder / "batches.db") as store:
        return await _batches(store, rounds)


async def _redis_batches(url: str, rounds: int) -> dict[str, list[tuple[float, float]]]:
    async with RedisClaimStore(url) as store:
        return await _batches(store, rounds)


async def _postgres_batches(dsn: str, rounds: int) -> dict[str, list[tuple[float, float]]]:
    async with PostgresClaimStore(dsn) as store:
        return await _batches(store, rounds)


@contextlib.contextmanager
def _server(server: Any, given: str | None) -> Iterator[Any]:
    if given is not None:
        yield given
        return
    server.start()
    try:
        yield server.url if isinstance(server, RedisServer) else server.dsn
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 claims per case, not 2,000")
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--postgres-dsn", help="use this PostgreSQL instead of starting one")
    args = parser.parse_args()
    n = 200 if args.quick else 2000

    rounds = 2 if args.quick else 5

    results: dict[str, dict[str, list[float]]] = {}
    batches: dict[str, dict[str, list[tuple[float, float]]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        results["SQLiteClaimStore"] = asyncio.run(_sqlite(Path(folder), n))
        # Until SQLiteClaimStore has claim_many, its row is left out.
        if hasattr(SQLiteClaimStore, "claim_many"):
            batches["SQLiteClaimStore"] = asyncio.run(_sqlite_batches(Path(folder), rounds))
    with _server(RedisServer(), args.redis_url) as url:
        results["RedisClaimStore"] = asyncio.run(_redis(url, n))
        batches["RedisClaimStore"] = asyncio.run(_redis_batches(url, rounds))
    with _server(PostgresServer(), args.postgres_dsn) as dsn:
        results["PostgresClaimStore"] = asyncio.run(_postgres(dsn, n))
        batches["PostgresClaimStore"] = asyncio.run(_postgres_batches(dsn, rounds))

    header = (
        f"| store | claims | won p50 | won p99 | won + record p50 | won + record p99 "
        f"| lost p50 | lost p99 | bare driver p50 | bare p99 | won p50 / bare p50 |"
        f"\n|{'---|' * 11}"
    )
    print(f"\nClaim latency in µs, one claim at a time ({n} claims per column)\n")
    print(header)
    for name, r in results.items():
        p50 = {k: statistics.median(v) for k, v in r.items()}
        p99 = {k: _p99(v) for k, v in r.items()}
        print(
            f"| {name} | {n} | {p50['won']:.0f} | {p99['won']:.0f} "
            f"| {p50['recorded']:.0f} | {p99['recorded']:.0f} | {p50['lost']:.0f} "
            f"| {p99['lost']:.0f} | {p50['bare']:.0f} | {p99['bare']:.0f} "
            f"| {p50['won'] / p50['bare']:.2f}× |"
        )

    print(
        f"\n{BATCH:,} tasks due at one instant, each claiming a new tick: median of {rounds} "
        "rounds, wall and CPU time of this process in ms\n"
    )
    print(
        "| store | claim_many wall | gather wall | sequential wall | gather / many "
        "| sequential / many | claim_many CPU | gather CPU | sequential CPU |"
        f"\n|{'---|' * 9}"
    )
    for name, b in batches.items():
        wall = {k: statistics.median(w for w, _ in v) for k, v in b.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in b.items()}
        print(
            f"| {name} | {wall['many']:.1f} | {wall['gather']:.1f} | {wall['sequential']:.1f} "
            f"| {wall['gather'] / wall['many']:.1f}× | {wall['sequential'] / wall['many']:.1f}× "
            f"| {cpu['many']:.1f} | {cpu['gather']:.1f} | {cpu['sequential']:.1f} |"
        )


if __name__ == "__main__":
    main()
