"""Claim stores on SQLite, Redis and PostgreSQL: one winner per tick, expiry, outages.

Every behaviour is checked against each store on a real backend: a SQLite file in the test's
folder, and the Redis and PostgreSQL servers that tests/servers.py starts for the session.
Outages are injected by holding SQLite's write lock, or by cutting a TCP gate in front of the
real server. Tasks run under a FakeClock; only expiry waits a few tens of real milliseconds,
because each store measures it on its own clock (the server's, for Redis and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio
import redis.exceptions
from servers import Gate, PostgresServer, RedisServer, free_port, silent_server

from repeat_every import ClaimStore, repeat_every
from repeat_every.stores import (
    LastRun,
    PostgresClaimStore,
    RedisClaimStore,
    SQLiteClaimStore,
    TaskStatus,
)
from repeat_every.stores._common import (
    MAX_ERROR_CHARS,
    MAX_TASK_NAME_BYTES,
    check_task_name,
    owner,
)
from repeat_every.testing import FakeClock

START = dt.datetime(2031, 3, 4, 5, 6, 0, tzinfo=dt.timezone.utc)
START_KEY = int(START.timestamp())  # the key of the 1-second tick at START

Store = SQLiteClaimStore | RedisClaimStore | PostgresClaimStore


class Outage:
    """A store whose backend a test can make unreachable, then bring back."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def cut(self) -> None:
        raise NotImplementedError

    async def restore(self) -> None:
        raise NotImplementedError


class Backend:
    """One kind of store on a real backend; makes store instances (one per "process")."""

    name = ""
    unreachable_error: type[Exception] = Exception  # what a claim raises when unreachable

    def __init__(self) -> None:
        self._stores: list[Store] = []
        self._gates: list[Gate] = []

    def store(self, **options: Any) -> Store:
        store = self._new(**options)
        self._stores.append(store)
        return store

    def _new(self, **options: Any) -> Store:
        raise NotImplementedError

    def bounded_store(self) -> Store:
        """A store that deletes expired claims after every claim (when it deletes them)."""
        return self.store(cleanup_interval=0)

    def unreachable_store(self) -> Store:
        raise NotImplementedError

    async def outage(self) -> Outage:
        raise NotImplementedError

    async def claimed_ticks(self, task: str) -> list[int]:
        raise NotImplementedError

    async def aclose(self) -> None:
        for store in self._stores:
            await store.aclose()
        for gate in self._gates:
            await gate.cut()


class SQLiteBackend(Backend):
    name = "sqlite"
    unreachable_error = sqlite3.OperationalError

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.path = folder / "claims.db"

    def _new(self, **options: Any) -> Store:
        return SQLiteClaimStore(self.path, **options)

    def unreachable_store(self) -> Store:
        return self.store_at(self.path.parent / "missing-folder" / "claims.db")

    def store_at(self, path: Path) -> Store:
        store = SQLiteClaimStore(path)
        self._stores.append(store)
        return store

    async def outage(self) -> Outage:
        # A stuck process that holds SQLite's write lock longer than the store waits for it.
        backend = self

        class LockHeld(Outage):
            holder: sqlite3.Connection | None = None

            async def cut(self) -> None:
                self.holder = sqlite3.connect(backend.path, isolation_level=None)
                self.holder.execute("BEGIN EXCLUSIVE")

            async def restore(self) -> None:
                assert self.holder is not None
                self.holder.execute("ROLLBACK")
                self.holder.close()

        return LockHeld(self.store(timeout=0.05))

    async def claimed_ticks(self, task: str) -> list[int]:
        with sqlite3.connect(self.path) as conn:
            rows = conn.execute(
                "SELECT tick FROM repeat_every_claims WHERE task = ? ORDER BY tick", (task,)
            ).fetchall()
        conn.close()
        return [tick for (tick,) in rows]


class GateOutage(Outage):
    def __init__(self, store: Store, gate: Gate) -> None:
        super().__init__(store)
        self.gate = gate

    async def cut(self) -> None:
        await self.gate.cut()

    async def restore(self) -> None:
        await self.gate.open()


class RedisBackend(Backend):
    name = "redis"
    unreachable_error = redis.exceptions.ConnectionError

    def __init__(self, server: RedisServer) -> None:
        super().__init__()
        self.server = server

    def _new(self, **options: Any) -> Store:
        return RedisClaimStore(self.server.url, **options)

    def bounded_store(self) -> Store:
        return self.store()  # Redis deletes expired keys itself

    def unreachable_store(self) -> Store:
        store = RedisClaimStore(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
        self._stores.append(store)
        return store

    async def outage(self) -> Outage:
        gate = await Gate(self.server.port).open()
        self._gates.append(gate)
        store = RedisClaimStore(f"redis://127.0.0.1:{gate.port}/0", timeout=1)
        self._stores.append(store)
        return GateOutage(store, gate)

    async def claimed_ticks(self, task: str) -> list[int]:
        client = redis.asyncio.Redis.from_url(self.server.url)
        try:
            keys = await client.keys(f"repeat_every:claim:{task}:*")
        finally:
            await client.aclose()
        return sorted(int(key.rsplit(b":", 1)[1]) for key in keys)


class PostgresBackend(Backend):
    name = "postgres"
    unreachable_error = OSError  # connection refused

    def __init__(self, server: PostgresServer) -> None:
        super().__init__()
        self.server = server

    def _new(self, **options: Any) -> Store:
        return PostgresClaimStore(self.server.dsn, **options)

    def unreachable_store(self) -> Store:
        store = PostgresClaimStore(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
        self._stores.append(store)
        return store

    async def outage(self) -> Outage:
        gate = await Gate(self.server.port).open()
        self._gates.append(gate)
        store = PostgresClaimStore(f"postgresql://postgres@127.0.0.1:{gate.port}/postgres")
        self._stores.append(store)
        return GateOutage(store, gate)

    async def claimed_ticks(self, task: str) -> list[int]:
        conn = await asyncpg.connect(self.server.dsn)
        try:
            rows = await conn.fetch(
                "SELECT tick FROM repeat_every_claims WHERE task = $1 ORDER BY tick", task
            )
        finally:
            await conn.close()
        return [row["tick"] for row in rows]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.servers),
        pytest.param("postgres", marks=pytest.mark.servers),
    ]
)
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Builds the Backend (servers are started here, outside the event loop)."""
    if request.param == "sqlite":
        return lambda: SQLiteBackend(tmp_path)
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return lambda: RedisBackend(server)
    server = request.getfixturevalue("postgres_server")
    return lambda: PostgresBackend(server)


@pytest.fixture
async def backend(make_backend: Any) -> AsyncIterator[Backend]:
    made: Backend = make_backend()
    yield made
    await made.aclose()


@pytest.fixture
def task_name() -> str:
    """A task name no other test uses: the servers live for the whole session."""
    return f"job-{uuid.uuid4().hex}"


# -- the claim itself ----------------------------------------------------------------------


async def test_every_store_is_a_claim_store(backend: Backend) -> None:
    assert isinstance(backend.store(), ClaimStore)


async def test_a_claim_is_won_once_and_lost_by_every_later_claimer(
    backend: Backend, task_name: str
) -> None:
    first, second = backend.store(), backend.store()
    assert await first.claim(task_name, 7, 60) is True
    assert await first.claim(task_name, 7, 60) is False
    assert await second.claim(task_name, 7, 60) is False
    assert await second.claim(task_name, 8, 60) is True
    assert await first.claim(task_name + "-other", 7, 60) is True


async def test_a_claim_expires_after_its_ttl(backend: Backend, task_name: str) -> None:
    # Held within its ttl, then free after it; no step depends on being fast: the held check
    # has a ttl far longer than any stall, and a stall only makes the short claim older.
    # Both stores connect first, so a slow first connection eats into no ttl.
    store, other = backend.store(), backend.store()
    assert await store.claim(task_name, 0, 60) is True
    assert await other.claim(task_name, 0, 60) is False
    assert await store.claim(task_name, 1, 30) is True
    assert await other.claim(task_name, 1, 30) is False
    assert await store.claim(task_name, 2, 0.05) is True
    await asyncio.sleep(0.15)  # real time: each store measures expiry on its own clock
    assert await other.claim(task_name, 2, 60) is True
    assert await store.claim(task_name, 2, 60) is False
    assert await other.claim(task_name, 1, 60) is False  # the 30 s claim is still held


async def test_concurrent_claimers_on_several_connections_have_exactly_one_winner(
    backend: Backend, task_name: str
) -> None:
    stores = [backend.store() for _ in range(4)]
    for tick in range(3):
        results = await asyncio.gather(
            *(store.claim(task_name, tick, 60) for store in stores for _ in range(10))
        )
        assert results.count(True) == 1, results


async def test_expired_claims_are_deleted_so_storage_stays_bounded(
    backend: Backend, task_name: str
) -> None:
    store = backend.bounded_store()
    assert await store.claim(task_name + "-connect", 0, 60)  # connect before the short claims
    for tick in range(20):
        assert await store.claim(task_name, tick, 0.02)
    await asyncio.sleep(0.08)  # a stall only makes the claims older: expired all the same
    assert await store.claim(task_name, 100, 60)
    assert await backend.claimed_ticks(task_name) == [100]


async def test_a_store_connects_on_its_first_claim_and_again_after_aclose(
    backend: Backend, task_name: str
) -> None:
    unreachable = backend.unreachable_store()  # making it does not touch the backend
    with pytest.raises(backend.unreachable_error):
        await unreachable.claim(task_name, 1, 60)
    async with backend.store() as store:
        assert await store.claim(task_name, 1, 60)
    assert await store.claim(task_name, 2, 60)  # reopened
    await store.aclose()
    await store.aclose()  # twice is harmless


async def test_a_malformed_claim_is_refused(backend: Backend) -> None:
    store = backend.store()
    with pytest.raises(ValueError, match="task"):
        await store.claim("", 1, 60)
    with pytest.raises(TypeError, match="tick"):
        await store.claim("job", 1.5, 60)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        await store.claim("job", 1, 0)


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_a_claim_gives_up_after_its_timeout_when_the_server_never_answers(
    kind: str,
) -> None:
    async with silent_server() as port:  # a hung or overloaded server
        store: Store = (
            RedisClaimStore(f"redis://127.0.0.1:{port}/0", timeout=0.2)
            if kind == "redis"
            else PostgresClaimStore(f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=0.2)
        )
        started = time.monotonic()
        try:
            with pytest.raises((TimeoutError, asyncio.TimeoutError, redis.exceptions.TimeoutError)):
                await store.claim("job", 1, 60)
            assert time.monotonic() - started < 3  # not the drivers' defaults (none, or 60 s)
        finally:
            await store.aclose()


# -- a task with a store, under the fake clock -----------------------------------------------


async def test_two_processes_sharing_a_store_run_each_aligned_tick_once(
    backend: Backend, task_name: str
) -> None:
    clock = FakeClock(start=START)
    runs: list[tuple[str, float]] = []

    def worker(who: str) -> Any:
        # Each "process" has its own store instance (its own connection) on the same backend.
        @repeat_every(seconds=1, store=backend.store(), name=task_name)
        async def job() -> None:
            runs.append((who, clock.now))

        return job

    first, second = worker("first"), worker("second")
    with clock:
        handles = [first(), second()]
        await clock.advance(9)
        for handle in handles:
            await handle.aclose()
    assert sorted(instant for _, instant in runs) == [float(i) for i in range(10)]
    assert sum(h.runs for h in handles) == 10
    assert sum(h.elsewhere for h in handles) == 10
    # The ticks are the wall clock's multiples of the period: every process computes the same.
    assert await backend.claimed_ticks(task_name) == [START_KEY + i for i in range(10)]


async def test_an_unreachable_store_skips_the_tick_and_logs_it(
    backend: Backend, task_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[float] = []

    @repeat_every(seconds=1, store=backend.unreachable_store(), name=task_name)
    async def job() -> None:
        ran.append(1)

    with FakeClock(start=START) as clock:
        handle = job()
        await clock.advance(2)
        await handle.aclose()
    assert ran == []
    assert (handle.runs, handle.skipped, handle.elsewhere) == (0, 3, 0)
    errors = [r for r in caplog.records if "claim store failed; skipping tick" in r.getMessage()]
    assert [r.levelno for r in errors] == [logging.ERROR] * 3
    assert f"tick {START_KEY}" in errors[0].getMessage()
    assert all(r.exc_info for r in errors)  # with the store's error and its traceback


async def test_an_unreachable_store_runs_the_tick_anyway_with_on_store_error_run(
    backend: Backend, task_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[float] = []

    @repeat_every(
        seconds=1, store=backend.unreachable_store(), name=task_name, on_store_error="run"
    )
    async def job() -> None:
        ran.append(clock.now)

    with FakeClock(start=START) as clock:
        handle = job()
        await clock.advance(2)
        await handle.aclose()
    assert ran == [0.0, 1.0, 2.0]
    assert (handle.runs, handle.skipped) == (3, 0)
    warnings = [r for r in caplog.records if "running tick" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING] * 3


async def test_claims_resume_when_the_store_comes_back(
    backend: Backend, task_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    outage = await backend.outage()
    ran: list[float] = []

    @repeat_every(seconds=1, store=outage.store, name=task_name)
    async def job() -> None:
        ran.append(clock.now)

    with FakeClock(start=START) as clock:
        handle = job()
        await clock.advance(1)  # ticks 0 and 1: the store works (its connection is open)
        await outage.cut()
        await clock.advance(2)  # ticks 2 and 3: unreachable, skipped
        await outage.restore()
        await clock.advance(2)  # ticks 4 and 5: claimed and run again
        await handle.aclose()
    assert ran == [0.0, 1.0, 4.0, 5.0]
    assert (handle.runs, handle.skipped) == (4, 2)
    skipped = [r for r in caplog.records if "skipping tick" in r.getMessage()]
    assert [r.getMessage().split("tick ")[1].split(" ")[0] for r in skipped] == [
        str(START_KEY + 2),
        str(START_KEY + 3),
    ]


async def test_a_loop_that_wakes_too_late_for_its_tick_skips_it_instead_of_claiming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The fault: one sleep lasts 10 s longer than asked (the process was frozen). By then the
    # claims other processes made for the ticks it slept through (ttl 4 s) have expired, so
    # claiming them could win and run them twice; the loop must move on to the current tick.
    claimed: list[int] = []
    ran: list[float] = []
    oversleep = [0.0]

    class Recording:
        def __init__(self, store: SQLiteClaimStore) -> None:
            self.store = store

        async def claim(self, task: str, tick: int, ttl: float) -> bool:
            claimed.append(tick - START_KEY)
            return await self.store.claim(task, tick, ttl)

    with FakeClock(start=START) as clock:

        def frozen_sleep(seconds: float) -> Any:
            extra, oversleep[0] = oversleep[0], 0.0
            return clock.sleep(seconds + extra)

        store = SQLiteClaimStore(tmp_path / "claims.db")

        @repeat_every(
            seconds=1,
            store=Recording(store),
            claim_ttl=4,
            clock=clock.monotonic,
            sleep=frozen_sleep,
            name="frozen-worker",
        )
        async def job() -> None:
            ran.append(clock.now)

        handle = job()
        # The task's own sleep makes it known to the clock: wait (real time) for its first.
        deadline = time.monotonic() + 5
        while not clock.deadlines:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await clock.advance(2)  # ticks 0, 1, 2
        oversleep[0] = 10.0  # the next sleep, from tick 3 towards tick 4, ends at 14 s
        await clock.advance(15)
        await handle.aclose()
        await store.aclose()
    assert ran == [0.0, 1.0, 2.0, 3.0, 14.0, 15.0, 16.0, 17.0]
    assert claimed == [0, 1, 2, 3, 14, 15, 16, 17]  # never ticks 4 to 13
    assert handle.skipped == 10
    [warning] = [r for r in caplog.records if "after tick" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(
        f"frozen-worker: woke 10 s after tick {START_KEY + 4} was due"
    )
    assert "skipping it and the 9 tick(s) since" in warning.getMessage()


# -- the stores' own contracts ---------------------------------------------------------------


def test_a_store_keeps_working_from_one_event_loop_to_the_next(
    make_backend: Any, task_name: str
) -> None:
    # A store made at import time outlives the event loops of a test suite (one per test).
    made: Backend = make_backend()
    store = made.store()
    assert asyncio.run(store.claim(task_name, 1, 60)) is True
    assert asyncio.run(store.claim(task_name, 1, 60)) is False
    assert asyncio.run(store.claim(task_name, 2, 60)) is True
    asyncio.run(made.aclose())


async def test_the_sqlite_file_is_made_on_the_first_claim(tmp_path: Path) -> None:
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path) as store:
        assert not path.exists()
        assert await store.claim("job", 1, 60)
        assert path.exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_sqlite_stores_opening_a_new_file_at_the_same_moment_all_get_an_answer(
    tmp_path: Path,
) -> None:
    # Workers that start together race to switch the new file to WAL; none may fail for it.
    for round_ in range(20):
        stores = [SQLiteClaimStore(tmp_path / f"claims-{round_}.db") for _ in range(6)]
        try:
            results = await asyncio.gather(*(store.claim("job", 1, 60) for store in stores))
        finally:
            for store in stores:
                await store.aclose()
        assert results.count(True) == 1


async def test_an_sqlite_store_comes_back_when_its_folder_appears(tmp_path: Path) -> None:
    path = tmp_path / "later" / "claims.db"
    async with SQLiteClaimStore(path) as store:
        with pytest.raises(sqlite3.OperationalError):
            await store.claim("job", 1, 60)
        path.parent.mkdir()
        assert await store.claim("job", 1, 60)


async def test_stores_use_a_given_client_or_pool_and_leave_it_open(
    redis_server: RedisServer, postgres_server: PostgresServer, task_name: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    pool = await asyncpg.create_pool(postgres_server.dsn, min_size=1, max_size=2)
    try:
        stores: list[Store] = [
            RedisClaimStore(client=client, prefix="custom:"),
            PostgresClaimStore(pool=pool, table="custom_claims"),
        ]
        for store in stores:
            async with store:
                assert await store.claim(task_name, 1, 60)
                assert not await store.claim(task_name, 1, 60)
        assert await client.exists(f"custom:{task_name}:1") == 1
        assert await pool.fetchval("SELECT count(*) FROM custom_claims WHERE task = $1", task_name)
    finally:
        await client.aclose()
        await pool.close()


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: SQLiteClaimStore(":memory:"), ValueError, "in-memory"),
        (lambda: SQLiteClaimStore(42), TypeError, "path"),
        (lambda: SQLiteClaimStore("x.db", table="claims; DROP"), ValueError, "table"),
        (lambda: SQLiteClaimStore("x.db", timeout=0), ValueError, "timeout"),
        (lambda: SQLiteClaimStore("x.db", cleanup_interval=-1), ValueError, "cleanup_interval"),
        (lambda: RedisClaimStore(), TypeError, "url="),
        (lambda: RedisClaimStore("redis://x", client=object()), TypeError, "not both"),
        (lambda: RedisClaimStore("redis://x", timeout=float("inf")), ValueError, "timeout"),
        (lambda: PostgresClaimStore(), TypeError, "dsn="),
        (lambda: PostgresClaimStore("postgresql://x", pool_size=0), ValueError, "pool_size"),
        (lambda: PostgresClaimStore("postgresql://x", table="a.b.c"), ValueError, "table"),
    ],
)
def test_a_wrong_store_argument_is_refused_with_a_message_naming_it(
    make: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        make()


def test_importing_the_stores_loads_no_database_driver() -> None:
    code = (
        "import sys, json; import repeat_every.stores; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('sqlite3', '_sqlite3', 'redis', 'asyncpg'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    assert json.loads(out.stdout) == []


# -- claims that know their tick's deadline --------------------------------------------------


async def test_with_a_deadline_a_claim_lives_until_the_deadline_plus_ttl(
    backend: Backend, task_name: str
) -> None:
    # Real time (each store reads its own clock). The tick is due 0.2 s from now, claims live
    # 0.2 s: the first claim is held until 0.4 s from now, whenever it was made.
    first, late = backend.store(), backend.store()
    deadline = time.time() + 0.2
    assert await first.claim(task_name, 1, 0.2, deadline=deadline) is True
    await asyncio.sleep(0.25)  # past the first claim's instant + ttl, not past deadline + ttl
    assert await late.claim(task_name, 1, 0.2, deadline=deadline) is False
    await asyncio.sleep(max(0.0, deadline + 0.2 - time.time()) + 0.05)
    # The tick's window is over: nobody wins it again, however the first claim is doing.
    assert await late.claim(task_name, 1, 0.2, deadline=deadline) is False
    assert await late.claim(task_name, 2, 0.2, deadline=deadline) is False  # never claimed
    assert await backend.claimed_ticks(task_name) in ([1], [])  # 2 was never written


async def test_a_claim_reaching_the_store_after_deadline_plus_ttl_loses_and_writes_nothing(
    backend: Backend, task_name: str
) -> None:
    store = backend.store()
    past = time.time() - 10
    assert await store.claim(task_name, 1, 5, deadline=past) is False
    assert await store.claim(task_name, 2, 60, deadline=past) is True  # still in its window
    assert await backend.claimed_ticks(task_name) == [2]
    assert (await store.status(task_name)).last_claim.tick == 2  # type: ignore[union-attr]


async def test_of_claims_with_the_same_deadline_exactly_one_wins(
    backend: Backend, task_name: str
) -> None:
    stores = [backend.store() for _ in range(4)]
    deadline = time.time()
    for tick in range(3):
        results = await asyncio.gather(
            *(s.claim(task_name, tick, 60, deadline=deadline) for s in stores for _ in range(5))
        )
        assert results.count(True) == 1, results


# -- run records -----------------------------------------------------------------------------


async def test_a_won_claim_is_remembered_as_the_tasks_last_claimed_tick(
    backend: Backend, task_name: str
) -> None:
    store, other = backend.store(), backend.store()
    assert await store.status(task_name) == TaskStatus(task_name)  # never seen: all None
    before = time.time()
    assert await store.claim(task_name, 7, 60)
    assert not await other.claim(task_name, 7, 60)  # a lost claim notes nothing
    status = await other.status(task_name)
    assert status.last_claim is not None
    assert (status.last_claim.tick, status.last_claim.worker) == (7, owner())
    assert before - 1 <= status.last_claim.at.timestamp() <= time.time() + 1
    assert status.last_claim.at.tzinfo is not None
    assert await other.claim(task_name, 5, 60)  # an older tick won late does not go back
    assert (await store.status(task_name)).last_claim.tick == 7  # type: ignore[union-attr]
    assert await other.claim(task_name, 8, 60)
    assert (await store.status(task_name)).last_claim.tick == 8  # type: ignore[union-attr]


async def test_the_last_success_and_the_last_failure_are_kept_apart(
    backend: Backend, task_name: str
) -> None:
    store = backend.store()
    await store.record_run(task_name, 1, 1_900_000_000.5, 0.25)
    await store.record_run(task_name, 2, 1_900_000_060.0, 1.5, ValueError("disk full"))
    await store.record_run(task_name, 3, 1_900_000_120.0, 0.5, worker="web-2:42")
    # Late news does not replace newer news (a slow worker reporting an old run).
    await store.record_run(task_name, 0, 1_899_999_000.0, 9.0)
    await store.record_run(task_name, 0, 1_899_999_000.0, 9.0, "old failure")
    status = await backend.store().status(task_name)  # another "process" reads it
    utc = dt.timezone.utc
    assert status == TaskStatus(
        task_name,
        last_claim=None,
        last_success=LastRun(
            3, dt.datetime.fromtimestamp(1_900_000_120, utc), "web-2:42", 0.5, None
        ),
        last_failure=LastRun(
            2,
            dt.datetime.fromtimestamp(1_900_000_060, utc),
            owner(),
            1.5,
            "ValueError: disk full",
        ),
    )


async def test_a_failures_text_is_capped(backend: Backend, task_name: str) -> None:
    store = backend.store()
    await store.record_run(task_name, 1, time.time(), 0.1, "x" * (MAX_ERROR_CHARS + 500))
    failure = (await store.status(task_name)).last_failure
    assert failure is not None
    assert failure.error == "x" * MAX_ERROR_CHARS


async def test_statuses_list_every_task_by_name_and_survive_a_new_store(
    backend: Backend, task_name: str
) -> None:
    store = backend.store()
    names = [f"{task_name}-b", f"{task_name}-a", f"{task_name}-c"]
    for tick, name in enumerate(names):
        assert await store.claim(name, tick, 60)
    await store.record_run(names[0], 0, time.time(), 0.01)
    await store.aclose()
    seen = [s for s in await backend.store().statuses() if s.task.startswith(task_name)]
    assert [s.task for s in seen] == sorted(names)
    assert [s.last_claim.tick for s in seen] == [1, 0, 2]  # type: ignore[union-attr]
    assert [s.last_success is not None for s in seen] == [False, True, False]


async def test_a_malformed_run_record_is_refused(backend: Backend, task_name: str) -> None:
    store = backend.store()
    with pytest.raises(ValueError, match="task"):
        await store.record_run("", 1, time.time(), 0.1)
    with pytest.raises(TypeError, match="started_at"):
        await store.record_run(task_name, 1, "now", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duration"):
        await store.record_run(task_name, 1, time.time(), -1)
    with pytest.raises(TypeError, match="deadline"):
        await store.claim(task_name, 1, 60, deadline="soon")  # type: ignore[arg-type]


async def test_an_sqlite_file_of_the_previous_version_keeps_its_claims_and_gains_records(
    tmp_path: Path,
) -> None:
    path = tmp_path / "claims.db"
    with sqlite3.connect(path) as conn:  # the schema of 0.x, with a live claim in it
        conn.execute(
            "CREATE TABLE repeat_every_claims (task TEXT NOT NULL, tick INTEGER NOT NULL, "
            "owner TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (task, tick)) WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO repeat_every_claims VALUES ('job', 1, 'old:1', ?)", (time.time() + 60,)
        )
    conn.close()
    async with SQLiteClaimStore(path) as store:
        assert await store.claim("job", 1, 60) is False  # the old claim still holds
        assert await store.claim("job", 2, 60) is True
        await store.record_run("job", 2, time.time(), 0.1)
        status = await store.status("job")
    assert status.last_claim is not None
    assert status.last_claim.tick == 2
    assert status.last_success is not None


async def test_a_postgres_database_of_the_previous_version_gains_the_records_table(
    postgres_server: PostgresServer, task_name: str
) -> None:
    table = f"old_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        await conn.execute(
            f"CREATE TABLE {table} (task text NOT NULL, tick bigint NOT NULL, owner text NOT "
            "NULL, expires_at timestamptz NOT NULL, PRIMARY KEY (task, tick))"
        )
        await conn.execute(
            f"INSERT INTO {table} VALUES ($1, 1, 'old:1', now() + interval '1 minute')", task_name
        )
        async with PostgresClaimStore(postgres_server.dsn, table=table) as store:
            assert await store.claim(task_name, 1, 60) is False
            assert await store.claim(task_name, 2, 60) is True
            await store.record_run(task_name, 2, time.time(), 0.1, "boom")
            status = await store.status(task_name)
        assert status.last_failure is not None
        assert status.last_failure.error == "boom"
        assert await conn.fetchval(f"SELECT count(*) FROM {table}_tasks") == 1
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_tasks")
        await conn.close()


# -- task names, secrets ---------------------------------------------------------------------


async def test_every_store_takes_a_task_name_at_the_limit_and_refuses_one_beyond(
    backend: Backend, task_name: str
) -> None:
    store = backend.store()
    longest = task_name + "é" * ((MAX_TASK_NAME_BYTES - len(task_name)) // 2)
    longest += "x" * (MAX_TASK_NAME_BYTES - len(longest.encode()))
    assert len(longest.encode()) == MAX_TASK_NAME_BYTES
    assert await store.claim(longest, 1, 60) is True
    assert await store.claim(longest, 1, 60) is False
    await store.record_run(longest, 1, time.time(), 0.1, "boom")
    assert (await store.status(longest)).last_failure is not None
    for bad in (longest + "x", "job\x00", "job\nFAKE LOG LINE", "job\x1b[31m", "\ud800"):
        with pytest.raises(ValueError, match="task"):
            await store.claim(bad, 1, 60)
        with pytest.raises(ValueError, match="task"):
            await store.record_run(bad, 1, time.time(), 0.1)


@pytest.mark.parametrize(
    ("name", "fine"),
    [
        ("reports.send_digest", True),
        ("tâche-nocturne ✓", True),
        ("x" * MAX_TASK_NAME_BYTES, True),
        ("x" * (MAX_TASK_NAME_BYTES + 1), False),
        ("a\x00b", False),
        ("a\nb", False),
        ("a\tb", False),
        ("", False),
    ],
)
def test_check_task_name_accepts_what_every_store_accepts(name: str, fine: bool) -> None:
    if fine:
        assert check_task_name(name) == name
    else:
        with pytest.raises(ValueError, match="name must"):
            check_task_name(name, "name")


def test_check_task_name_refuses_a_non_string_naming_the_argument() -> None:
    with pytest.raises(TypeError, match="name must be a string"):
        check_task_name(42, "name")


@pytest.mark.parametrize(
    "make",
    [
        lambda: RedisClaimStore("redis://:s3cret-pw@127.0.0.1:1/0"),
        lambda: RedisClaimStore("rediss://user:s3cret-pw@127.0.0.1:1/0"),
        lambda: RedisClaimStore("redis://127.0.0.1:1/0?password=s3cret-pw"),
        lambda: PostgresClaimStore("postgresql://postgres:s3cret-pw@127.0.0.1:1/db"),
        lambda: PostgresClaimStore("postgres://u:s3cret-pw@127.0.0.1:1/db?sslmode=disable"),
        lambda: PostgresClaimStore("host=127.0.0.1 password=s3cret-pw dbname=db"),
        lambda: PostgresClaimStore("postgresql://u@127.0.0.1:1/db?password=s3cret-pw"),
    ],
)
def test_no_store_shows_its_password_in_its_repr(make: Any) -> None:
    text = repr(make())
    assert "s3cret-pw" not in text
    assert "***" in text


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret-pw@127.0.0.1:{port}/0",
        "postgresql://postgres:s3cret-pw@127.0.0.1:{port}/postgres",
    ],
)
async def test_a_failing_store_logs_no_secret(url: str, caplog: pytest.LogCaptureFixture) -> None:
    target = url.format(port=free_port())
    store: Store = (
        RedisClaimStore(target, timeout=1)
        if target.startswith("redis")
        else PostgresClaimStore(target, timeout=1)
    )

    @repeat_every(seconds=1, store=store, name="secretive")
    async def job() -> None:
        pass

    caplog.set_level(logging.DEBUG, logger="repeat_every")
    with FakeClock(start=START) as clock:
        handle = job()
        await clock.advance(1)
        await handle.aclose()
    await store.aclose()
    assert handle.skipped == 2
    logged = "\n".join(
        logging.Formatter().format(record) for record in caplog.records
    )  # messages and tracebacks
    assert "claim store failed" in logged
    assert "s3cret-pw" not in logged


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379/0", "localhost:6379", "valkey://:s3cret-pw@host/0"]
)
def test_a_redis_url_with_another_scheme_is_refused_without_showing_its_password(
    url: str,
) -> None:
    with pytest.raises(ValueError, match="url must start with redis://") as caught:
        RedisClaimStore(url)
    assert "s3cret-pw" not in str(caught.value)


async def test_the_run_records_example_of_the_docs_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (Path(__file__).parent.parent / "docs" / "many-workers.md").read_text()
    block = text.split("<!-- run-records-example -->\n```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(block, "many-workers.md", "exec"), namespace)
    await namespace["show"](tmp_path / "claims.db")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{owner()} LastRun(tick=1, started_at=")
    assert out[1].startswith("reports.nightly LastRun(tick=1,")
    assert out[1].endswith(" None")


async def test_sqlite_claims_that_meet_another_processs_lock_wait_in_the_stores_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path) as store:
        assert await store.claim("job", 0, 60)  # the file is open: claims now start inline
        holder = sqlite3.connect(path, isolation_level=None)  # another process, writing
        holder.execute("BEGIN IMMEDIATE")
        claims = asyncio.gather(*(store.claim("job", tick, 60) for tick in (1, 1, 2, 2, 3)))
        await asyncio.sleep(0.05)  # the event loop is free meanwhile
        assert not claims.done()
        holder.execute("ROLLBACK")
        holder.close()
        assert await claims == [True, False, True, False, True]
        assert await store.claim("job", 4, 60)  # and inline again


async def test_the_sqlite_write_ahead_log_stays_small_though_the_loop_never_checkpoints(
    tmp_path: Path,
) -> None:
    # Claims made on the event loop's thread leave WAL checkpoints to the store's thread
    # (every 500 writes and at each cleanup). 3,000 claims without any checkpoint leave a
    # WAL of about 26 MB; with them it is reused from its start, about 5 MB.
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path, cleanup_interval=3600) as store:
        for tick in range(3000):
            assert await store.claim("job", tick, 60)
        assert Path(f"{path}-wal").stat().st_size < 12_000_000


async def test_an_sqlite_store_makes_its_tables_again_when_they_vanish(tmp_path: Path) -> None:
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path) as store:
        assert await store.claim("job", 1, 60)
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("DROP TABLE repeat_every_claims")
        other.close()
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await store.claim("job", 2, 60)
        assert await store.claim("job", 2, 60)  # reconnected, and the table made again
        assert not await store.claim("job", 2, 60)


async def test_sqlite_writes_of_many_tasks_in_one_turn_share_a_transaction_or_wait_together(
    tmp_path: Path,
) -> None:
    # Task 1 claims on the event loop's thread; tasks 2 and 3 claim in the same turn of the
    # loop, after another process took the write lock: their claims are queued for the end
    # of the turn, meet the lock there, and are answered by the store's thread once it is
    # released.
    path = tmp_path / "claims.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    async def claim(task: str, lock_first: bool = False) -> bool:
        if lock_first:
            holder.execute("BEGIN IMMEDIATE")
        return await store.claim(task, 1, 60)

    async with SQLiteClaimStore(path) as store:
        assert await store.claim("warm-up", 0, 60)
        claims = asyncio.gather(claim("one"), claim("two", lock_first=True), claim("three"))
        await asyncio.sleep(0.05)
        assert not claims.done()
        holder.execute("ROLLBACK")
        assert await claims == [True, True, True]
        assert [await store.claim(t, 1, 60) for t in ("one", "two", "three")] == [False] * 3
    holder.close()


async def test_a_failing_shared_transaction_fails_each_of_its_claims(tmp_path: Path) -> None:
    path = tmp_path / "claims.db"

    async def claim(task: str, drop_first: bool = False) -> bool:
        if drop_first:
            with sqlite3.connect(path, isolation_level=None) as other:
                other.execute("DROP TABLE repeat_every_claims")
            other.close()
        return await store.claim(task, 1, 60)

    async with SQLiteClaimStore(path) as store:
        assert await store.claim("warm-up", 0, 60)
        results = await asyncio.gather(
            claim("one"), claim("two", drop_first=True), claim("three"), return_exceptions=True
        )
        assert results[0] is True
        assert [type(r) for r in results[1:]] == [sqlite3.OperationalError] * 2
        assert await store.claim("two", 1, 60)  # the table is made again


# -- catch-up: a tick nobody ran ---------------------------------------------------------------


async def test_a_catch_up_claim_wins_only_a_tick_newer_than_every_claimed_one(
    backend: Backend, task_name: str
) -> None:
    # Three workers restart after an outage; the daily tick of 09:00 (an hour ago) was run by
    # nobody. Each claims it with if_newest and a grace of two hours: one wins.
    nine = time.time() - 3600
    stores = [backend.store() for _ in range(3)]
    assert await stores[0].claim(task_name, 1, 60)  # yesterday's tick ran
    results = await asyncio.gather(
        *(s.claim(task_name, 2, 7200, deadline=nine, if_newest=True) for s in stores)
    )
    assert sorted(results) == [False, False, True]
    # Restarted again: the tick ran already (its claim is still there, and the records say so).
    assert not await stores[1].claim(task_name, 2, 7200, deadline=nine, if_newest=True)
    # A tick older than the last one claimed never runs late, however long its grace.
    assert await stores[2].claim(task_name, 5, 60)
    assert not await stores[0].claim(task_name, 4, 7200, deadline=nine, if_newest=True)
    # Past its grace, not even the newest tick is caught up.
    assert not await stores[0].claim(task_name, 6, 1800, deadline=nine, if_newest=True)


async def test_a_catch_up_claim_loses_to_a_tick_whose_claim_has_expired(
    backend: Backend, task_name: str
) -> None:
    store = backend.store()
    assert await store.claim(task_name, 3, 0.05)
    await asyncio.sleep(0.15)  # real time: the claim has expired (each store's own clock)
    assert not await backend.store().claim(task_name, 3, 60, if_newest=True)
    assert await backend.store().claim(task_name, 4, 60, if_newest=True)  # never claimed
    assert not await store.claim(task_name, 4, 60)  # and an ordinary claim finds it
