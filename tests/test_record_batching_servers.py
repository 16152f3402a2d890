"""Run records on the Redis and PostgreSQL stores: the records of one turn of the event loop
go to the server together, and only a lone record is waited for.

A thousand tasks ending at the same instant used to cost a thousand ``record_run`` round trips.
Every test runs against the real Valkey and PostgreSQL servers that tests/servers.py starts
for the session. Round trips are counted by the servers themselves: Valkey's ``INFO
commandstats`` (the store's pipelines of ``EVALSHA``), and for PostgreSQL a statement-level
trigger on the run-records table, which fires once per statement that writes it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped,unused-ignore]
import pytest
import redis.asyncio
from servers import PostgresServer, RedisServer, free_port, silent_server

from repeat_every import repeat_every, run_tasks
from repeat_every.stores import PostgresClaimStore, RedisClaimStore
from repeat_every.stores._common import owner
from repeat_every.testing import FakeClock

Store = RedisClaimStore | PostgresClaimStore


class Server:
    """One real server (and the stores made on it, closed at the end): counts its writes."""

    def __init__(self, kind: str, server: RedisServer | PostgresServer) -> None:
        self.kind = kind
        self.server = server
        self.table = f"records_{uuid.uuid4().hex[:12]}"  # PostgreSQL: this test's tables
        self._made: list[Store] = []

    def store(self, **options: Any) -> Store:
        made: Store
        if isinstance(self.server, RedisServer):
            made = RedisClaimStore(self.server.url, **options)
        else:
            made = PostgresClaimStore(self.server.dsn, table=self.table, **options)
        self._made.append(made)
        return made

    def unreachable(self, password: str, **options: Any) -> Store:
        """A store whose URL has ``password``, on a port of 127.0.0.1 nothing listens on."""
        made: Store
        if self.kind == "redis":
            made = RedisClaimStore(f"redis://:{password}@127.0.0.1:{free_port()}/0", **options)
        else:
            made = PostgresClaimStore(
                f"postgresql://postgres:{password}@127.0.0.1:{free_port()}/postgres", **options
            )
        self._made.append(made)
        return made

    async def start_counting(self) -> None:
        """From now on, `writes` counts the run-record writes the server receives."""
        if isinstance(self.server, RedisServer):
            self._evalsha = await self._redis_evalsha()
            return
        await self.store().status("-")  # the store creates its tables
        conn = await asyncpg.connect(self.server.dsn)
        try:
            await conn.execute(
                f"CREATE TABLE {self.table}_writes (n int NOT NULL);"
                f"INSERT INTO {self.table}_writes VALUES (0);"
                f"CREATE FUNCTION {self.table}_count() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN UPDATE {self.table}_writes SET n = n + 1; RETURN NULL; END $$;"
                f"CREATE TRIGGER counted AFTER UPDATE OF ok_tick, failed_tick "
                f"ON {self.table}_tasks "
                f"FOR EACH STATEMENT EXECUTE PROCEDURE {self.table}_count();"
            )
        finally:
            await conn.close()

    async def writes(self) -> int:
        """Redis: ``EVALSHA`` calls since `start_counting`; PostgreSQL: statements that wrote
        run records."""
        if isinstance(self.server, RedisServer):
            return await self._redis_evalsha() - self._evalsha
        conn = await asyncpg.connect(self.server.dsn)
        try:
            n: int = await conn.fetchval(f"SELECT n FROM {self.table}_writes")
        finally:
            await conn.close()
        return n

    async def _redis_evalsha(self) -> int:
        assert isinstance(self.server, RedisServer)
        client = redis.asyncio.Redis.from_url(self.server.url)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        calls: int = stats.get("cmdstat_evalsha", {}).get("calls", 0)
        return calls

    async def aclose(self) -> None:
        for made in self._made:
            await made.aclose()


@pytest.fixture
async def server(
    network_server: tuple[str, RedisServer | PostgresServer],
) -> AsyncIterator[Server]:
    made = Server(*network_server)
    yield made
    await made.aclose()


@pytest.fixture
def task() -> Callable[[str], str]:
    """Task names no other test uses: the servers live for the whole session."""
    run = uuid.uuid4().hex[:12]
    return lambda label: f"rec-{run}-{label}"


def returns_at_once(coro: Any) -> bool:
    """Whether the coroutine ends without waiting for anything (no round trip)."""
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


# -- one round trip for the records of one turn --------------------------------------------


async def test_a_thousand_records_of_one_turn_take_two_round_trips_and_are_all_kept(
    server: Server, task: Callable[[str], str]
) -> None:
    store = server.store()
    await store.record_run(task("warm"), 0, time.time(), 0.0)  # connected, script loaded
    await server.start_counting()
    now = time.time()
    # A thousand tasks ending in the same turn: the first record is sent at once and waited
    # for; the 999 others are queued meanwhile and sent together at the end of the turn.
    await asyncio.gather(
        *(
            store.record_run(task(f"job{n:04}"), 7, now, 0.002, None if n % 3 else "boom")
            for n in range(1000)
        )
    )
    kept = {s.task: s for s in await store.statuses() if s.task.startswith(task("job"))}

    # Redis: one EVALSHA for the first; the 999 others are five script calls (200 records
    # each) in one pipeline. PostgreSQL: one statement for the first, one for the 999 others.
    assert await server.writes() == (1 + 5 if server.kind == "redis" else 1 + 1)
    assert len(kept) == 1000
    for n in range(1000):
        status = kept[task(f"job{n:04}")]
        run = status.last_success if n % 3 else status.last_failure
        other = status.last_failure if n % 3 else status.last_success
        assert run is not None
        assert other is None
        assert (run.tick, run.worker, run.duration) == (7, owner(), 0.002)
        assert abs(run.started_at.timestamp() - now) < 1e-5
        assert run.error == (None if n % 3 else "boom")


async def test_a_record_given_while_another_is_under_way_is_queued_without_a_round_trip(
    server: Server, task: Callable[[str], str]
) -> None:
    store = server.store()
    await store.claim(task("warm"), 0, 60.0)
    now = time.time()
    first = asyncio.ensure_future(store.record_run(task("first"), 1, now, 0.1))
    await asyncio.sleep(0)  # the first record is on its way to the server
    assert returns_at_once(store.record_run(task("queued"), 1, now, 0.1))
    assert returns_at_once(store.record_run(task("queued-too"), 1, now, 0.1, "failed"))
    # status() right away sees the queued record: the store writes its queue first.
    queued = await store.status(task("queued"))
    assert queued.last_success is not None
    assert queued.last_success.tick == 1
    assert (await store.status(task("queued-too"))).last_failure is not None
    await first
    assert (await store.status(task("first"))).last_success is not None


async def test_a_lone_record_is_written_before_record_run_returns(
    server: Server, task: Callable[[str], str]
) -> None:
    store, reader = server.store(), server.store()
    await store.record_run(task("alone"), 3, time.time(), 0.5)
    # Another worker (its own client) sees it: nothing was left queued.
    seen = await reader.status(task("alone"))
    assert seen.last_success is not None
    assert seen.last_success.tick == 3


# -- the newest record wins ----------------------------------------------------------------


async def test_an_older_record_does_not_replace_a_newer_one_batched_or_not(
    server: Server, task: Callable[[str], str]
) -> None:
    store = server.store()
    now = time.time()
    await store.record_run(task("alone"), 2, now, 0.2)
    await store.record_run(task("alone"), 1, now - 10, 0.1)  # older, written alone
    # The same, the older one in a batch of its own after the newer one was written.
    await store.record_run(task("batched"), 2, now, 0.2, "new failure")
    await asyncio.gather(
        store.record_run(task("warm"), 1, now, 0.1),
        store.record_run(task("batched"), 1, now - 10, 0.1, "old failure"),
    )
    alone, batched = await store.status(task("alone")), await store.status(task("batched"))
    assert alone.last_success is not None
    assert (alone.last_success.tick, alone.last_success.duration) == (2, 0.2)
    assert batched.last_failure is not None
    assert (batched.last_failure.tick, batched.last_failure.error) == (2, "new failure")


async def test_a_task_twice_in_one_batch_keeps_its_newer_success_and_failure(
    server: Server, task: Callable[[str], str]
) -> None:
    store, reader = server.store(), server.store()
    now = time.time()
    await store.record_run(task("kept"), 1, now - 100, 0.1)  # older than the whole batch
    await store.record_run(task("stays"), 9, now + 100, 0.9, "kept failure")  # newer than it
    records = [
        (task("newer-first"), 5, now, 0.5, None),
        (task("newer-first"), 4, now - 1, 0.4, None),
        (task("newer-last"), 4, now - 1, 0.4, None),
        (task("newer-last"), 5, now, 0.5, None),
        (task("both"), 6, now - 2, 0.6, "first failure"),
        (task("both"), 7, now - 1, 0.7, None),
        (task("both"), 8, now, 0.8, "second failure"),
        (task("both"), 3, now - 3, 0.3, None),
        (task("same-instant"), 1, now, 0.1, None),
        (task("same-instant"), 2, now, 0.2, None),  # given later: kept, as written in turn
        (task("kept"), 9, now, 0.9, None),
        (task("stays"), 1, now, 0.1, "older failure"),  # does not replace the kept one...
        (task("stays"), 2, now, 0.2, None),  # ...while its success, the first, is written
    ]
    first = asyncio.ensure_future(store.record_run(task("warm"), 1, now, 0.1))
    await asyncio.sleep(0)  # under way: every record below joins one batch
    for name, tick, started, duration, error in records:
        assert returns_at_once(store.record_run(name, tick, started, duration, error))
    await first
    await store.aclose()  # written before the store closes

    def success(name: str) -> int | None:
        run = statuses[task(name)].last_success
        return None if run is None else run.tick

    statuses = {s.task: s for s in await reader.statuses()}
    assert success("newer-first") == success("newer-last") == 5
    assert success("both") == 7
    failure = statuses[task("both")].last_failure
    assert failure is not None
    assert (failure.tick, failure.error, failure.duration) == (8, "second failure", 0.8)
    assert success("same-instant") == 2
    assert success("kept") == 9
    assert success("stays") == 2
    stays = statuses[task("stays")].last_failure
    assert stays is not None
    assert (stays.tick, stays.error) == (9, "kept failure")


# -- failures and closing ------------------------------------------------------------------


async def test_a_queued_record_that_fails_is_logged_naming_its_tasks_and_never_raised(
    server: Server, task: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-pw-" + uuid.uuid4().hex[:6]
    store = server.unreachable(secret, timeout=2)
    caplog.set_level(logging.DEBUG)
    now = time.time()
    results = await asyncio.gather(
        *(store.record_run(task(f"job{n}"), 1, now, 0.1) for n in range(8)),
        return_exceptions=True,
    )
    await store.aclose()  # waits for the queued records' write

    # The first record was waited for: its caller gets the error, as before.
    assert isinstance(results[0], Exception)
    # The queued ones: nothing raised into their tasks, one WARNING naming them.
    assert results[1:] == [None] * 7
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert message.startswith(
        f"could not write the run records of {task('job1')}, {task('job2')}, {task('job3')}, "
        f"{task('job4')}, {task('job5')} and 2 more to {type(store).__name__}("
    )
    assert task("job0") not in message
    assert secret not in caplog.text


async def test_queued_records_give_up_after_the_stores_timeout_when_the_server_never_answers(
    server: Server, task: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    async with silent_server() as port:  # a hung or overloaded server
        store: Store = (
            RedisClaimStore(f"redis://127.0.0.1:{port}/0", timeout=0.2)
            if server.kind == "redis"
            else PostgresClaimStore(f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=0.2)
        )
        started = time.monotonic()
        try:
            results = await asyncio.gather(
                *(store.record_run(task(f"job{n}"), 1, time.time(), 0.1) for n in range(3)),
                return_exceptions=True,
            )
            await store.aclose()
            assert time.monotonic() - started < 3  # not the drivers' defaults (none, or 60 s)
            assert results[1:] == [None, None]
            assert any(
                r.levelno == logging.WARNING and task("job2") in r.getMessage()
                for r in caplog.records
            )
        finally:
            await store.aclose()


async def test_aclose_writes_the_queued_records_first(
    server: Server, task: Callable[[str], str]
) -> None:
    store, reader = server.store(), server.store()
    await store.claim(task("warm"), 0, 60.0)
    now = time.time()
    first = asyncio.ensure_future(store.record_run(task("first"), 1, now, 0.1))
    await asyncio.sleep(0)
    for n in range(50):
        assert returns_at_once(store.record_run(task(f"job{n}"), 1, now, 0.1))
    await store.aclose()
    await first
    names = {s.task for s in await reader.statuses() if s.last_success is not None}
    assert {task("first"), *(task(f"job{n}") for n in range(50))} <= names


# -- through the task loop -----------------------------------------------------------------


async def test_a_hundred_tasks_due_together_send_their_run_records_together(
    server: Server, task: Callable[[str], str]
) -> None:
    store = server.store()
    await store.record_run(task("warm"), 0, time.time(), 0.0)  # connected, script loaded
    start = dt.datetime(2031, 3, 4, 5, 6, 0, tzinfo=dt.timezone.utc)
    with FakeClock(start=start) as clock:
        handles = []
        for n in range(100):

            def make(name: str) -> Any:
                @repeat_every(seconds=10, store=store, name=name)
                async def job() -> None:
                    pass

                return job

            handles.append(make(task(f"job{n:03}"))())
        # At 0 s each task, just started, claims and records on its own; from the next
        # instant on, they claim together (claim_many), run, and record together.
        await clock.advance(5)
        await server.start_counting()
        await clock.advance(20)  # two instants: 10 s and 20 s
        for handle in handles:
            await handle.aclose()
    statuses = {s.task: s for s in await store.statuses()}
    writes = await server.writes()

    last_tick = int((start.timestamp() + 20) // 10)
    for n in range(100):
        success = statuses[task(f"job{n:03}")].last_success
        assert success is not None
        assert success.tick == last_tick
        assert success.started_at == start + dt.timedelta(seconds=20)
    # 200 records (and two claim_many calls, which Redis counts too) were 200 writes and
    # more; now the records of each turn of the event loop share one: the first record of
    # an instant goes alone, the others in the few turns in which the runs end.
    assert writes <= 20


# -- shutdown --------------------------------------------------------------------------------


async def test_run_tasks_writes_the_queued_records_before_its_event_loop_ends(
    server: Server, task: Callable[[str], str]
) -> None:
    # A worker's whole life in another thread's event loop: 50 tasks run once together,
    # their records are queued behind the first, and the loop ends right after run_tasks
    # exits (asyncio.run cancels what is left). run_tasks flushes the stores first.
    names = [task(f"last-{i}") for i in range(50)]
    start = dt.datetime(2031, 3, 4, 5, 6, tzinfo=dt.timezone.utc)

    def worker() -> None:
        async def main() -> None:
            store = server.store()

            def make(name: str) -> Any:
                @repeat_every(seconds=60, store=store, name=name)
                async def job() -> None:
                    pass

                return job

            with FakeClock(start=start) as clock:
                async with run_tasks(*(make(name) for name in names)):
                    await clock.advance(0)

        asyncio.run(main())

    await asyncio.to_thread(worker)
    statuses = {s.task: s for s in await server.store().statuses()}
    assert [n for n in names if statuses.get(n) is None or statuses[n].last_success is None] == []
