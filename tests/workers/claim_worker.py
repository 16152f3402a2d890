"""One worker process of tests/test_multiprocess.py: a 0.2 s job sharing a claim store.

    python claim_worker.py STORE TARGET TASK OUT [--period SECONDS] [--claim-ttl SECONDS]

STORE is sqlite, redis or postgres; TARGET the file, URL or DSN. The worker writes
``ready <pid>`` to OUT once its task runs, then ``run <pid> <tick>`` for every run, and stops
gracefully on SIGTERM or SIGINT, as a ``uvicorn --workers N`` worker would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import TextIO

from repeat_every import repeat_every, run_tasks
from repeat_every.stores import PostgresClaimStore, RedisClaimStore, SQLiteClaimStore

Store = SQLiteClaimStore | RedisClaimStore | PostgresClaimStore


class Witness:
    """A store that remembers the tick this process won last: the tick its job then runs."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.won: int | None = None

    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        won = await self.store.claim(task, tick, ttl)
        if won:
            self.won = tick
        return won


def make_store(kind: str, target: str) -> Store:
    if kind == "sqlite":
        return SQLiteClaimStore(target)
    if kind == "redis":
        return RedisClaimStore(target)
    if kind == "postgres":
        return PostgresClaimStore(target)
    raise SystemExit(f"unknown store {kind!r}: sqlite, redis or postgres")


async def main(
    kind: str, target: str, task: str, out: TextIO, period: float, claim_ttl: float | None
) -> None:
    store = make_store(kind, target)
    witness = Witness(store)
    pid = os.getpid()

    @repeat_every(seconds=period, store=witness, name=task, claim_ttl=claim_ttl)
    async def job() -> None:
        out.write(f"run {pid} {witness.won}\n")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with store, run_tasks(job):
        out.write(f"ready {pid}\n")
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("store", choices=["sqlite", "redis", "postgres"])
    parser.add_argument("target")
    parser.add_argument("task")
    parser.add_argument("out")
    parser.add_argument("--period", type=float, default=0.2)
    parser.add_argument("--claim-ttl", type=float, default=None)
    args = parser.parse_args()
    with open(args.out, "a", buffering=1) as results:  # a line per write: whole lines only
        asyncio.run(main(args.store, args.target, args.task, results, args.period, args.claim_ttl))
