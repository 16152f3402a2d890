"""One worker process of tests/test_multiprocess.py: a job sharing a claim store.

    python claim_worker.py STORE TARGET TASK OUT [--period SECONDS] [--claim-ttl SECONDS]
        [--jitter SECONDS] [--stall SECONDS] [--no-deadline] [--catch-up GRACE]

STORE is sqlite, redis or postgres; TARGET the file, URL or DSN. The worker writes
``ready <pid>`` to OUT once its task runs, then ``run <pid> <tick>`` for every run, and stops
gracefully on SIGTERM or SIGINT, as a ``uvicorn --workers N`` worker would.

``--stall S`` blocks the worker's event loop for S seconds starting 10 ms before every tick
(a CPU-bound request handler, a long garbage collection), so its task wakes up late.
The loop passes each tick's deadline to the claim (``deadline=``), and the store refuses a
claim arriving after deadline + ttl; ``--no-deadline`` drops it on the way to the store.
``--catch-up GRACE`` starts the task with ``catch_up=True, misfire_grace=GRACE``.
``--tasks N`` runs N tasks ``TASK-0`` … ``TASK-<N-1>`` on the store itself (no witness: the
tasks due at one instant claim together, through ``claim_many``), and writes
``grun <pid> <task> <tick>`` for every run, the tick read from the run's start event.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import time
from typing import TextIO

from repeat_every import AttemptStarted, TaskEvent, add_listener, repeat_every, run_tasks
from repeat_every.stores import (
    PostgresClaimStore,
    RedisClaimStore,
    SQLiteClaimStore,
    TaskStatus,
)

Store = SQLiteClaimStore | RedisClaimStore | PostgresClaimStore
STALL_BEFORE = 0.01  # a stall starts this long before the tick


class Witness:
    """A store that remembers the tick this process won last: the tick its job then runs.

    It takes ``deadline=`` as the stores of repeat_every.stores do, so the loop passes each
    tick's deadline, computed from the tick's key; the witness forwards it to the store and
    notes it beside the run (``run <pid> <tick> <deadline>``), for the test to check it. With
    ``forward=False`` it drops the deadline: the store then decides as before issue 14, while
    the loop still believes the store refuses late claims (the switch that shows the test can
    fail).
    """

    def __init__(self, store: Store, forward: bool = True) -> None:
        self.store = store
        self.won: int | None = None
        self.deadline: float | None = None
        self.forward = forward

    async def claim(
        self,
        task: str,
        tick: int,
        ttl: float,
        *,
        deadline: float | None = None,
        if_newest: bool = False,
    ) -> bool:
        if self.forward:
            won = await self.store.claim(task, tick, ttl, deadline=deadline, if_newest=if_newest)
        else:
            won = await self.store.claim(task, tick, ttl)
        if won:
            self.won, self.deadline = tick, deadline
        return won

    async def status(self, task: str) -> TaskStatus:
        return await self.store.status(task)


def make_store(kind: str, target: str) -> Store:
    if kind == "sqlite":
        return SQLiteClaimStore(target)
    if kind == "redis":
        return RedisClaimStore(target)
    if kind == "postgres":
        return PostgresClaimStore(target)
    raise SystemExit(f"unknown store {kind!r}: sqlite, redis or postgres")


def stall_before_every_tick(loop: asyncio.AbstractEventLoop, period: float, stall: float) -> None:
    """Block the event loop for ``stall`` seconds from STALL_BEFORE before each tick."""

    def block() -> None:
        time.sleep(stall)
        plan()

    def plan() -> None:
        now = time.time()
        tick = math.floor((now + STALL_BEFORE) / period) + 1
        loop.call_later(tick * period - STALL_BEFORE - now, block)

    plan()


async def main(
    kind: str,
    target: str,
    task: str,
    out: TextIO,
    period: float,
    claim_ttl: float | None,
    jitter: float,
    stall: float,
    deadline: bool,
    catch_up: float | None = None,
    tasks: int = 1,
) -> None:
    store = make_store(kind, target)
    witness = Witness(store, forward=deadline)
    pid = os.getpid()
    if tasks > 1:
        await many_tasks(store, task, out, period, tasks)
        return

    @repeat_every(
        seconds=period,
        store=witness,
        name=task,
        claim_ttl=claim_ttl,
        jitter=jitter,
        catch_up=catch_up is not None,
        misfire_grace=catch_up,
    )
    async def job() -> None:
        out.write(f"run {pid} {witness.won} {witness.deadline!r}\n")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with store, run_tasks(job):
        if stall:
            stall_before_every_tick(loop, period, stall)
        out.write(f"ready {pid}\n")
        await stop.wait()


async def many_tasks(store: Store, task: str, out: TextIO, period: float, tasks: int) -> None:
    """``tasks`` tasks due at the same instants, claiming together (see ``--tasks``)."""
    pid = os.getpid()

    def witness(event: TaskEvent) -> None:
        if isinstance(event, AttemptStarted) and not event.manual:
            tick = round((event.wall - event.late) / period)  # the tick's due instant
            out.write(f"grun {pid} {event.task} {tick}\n")

    def make(name: str) -> object:
        @repeat_every(seconds=period, store=store, name=name)
        async def job() -> None:
            pass

        return job

    add_listener(witness)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with store, run_tasks(*(make(f"{task}-{i}") for i in range(tasks))):  # type: ignore[arg-type]
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
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--stall", type=float, default=0.0)
    parser.add_argument("--deadline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--catch-up", type=float, default=None)
    parser.add_argument("--tasks", type=int, default=1)
    args = parser.parse_args()
    with open(args.out, "a", buffering=1) as results:  # a line per write: whole lines only
        asyncio.run(
            main(
                args.store,
                args.target,
                args.task,
                results,
                args.period,
                args.claim_ttl,
                args.jitter,
                args.stall,
                args.deadline,
                args.catch_up,
                args.tasks,
            )
        )
