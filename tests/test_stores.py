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
from servers import Gate, PostgresServer, RedisServer, free_port

from repeat_every import ClaimStore, repeat_every
from repeat_every.stores import PostgresClaimStore, RedisClaimStore, SQLiteClaimStore
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
    # A server that accepts connections and then says nothing (a hung or overloaded one).
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client gives up and closes

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
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
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


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
