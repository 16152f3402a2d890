"""SQLiteClaimStore under many tasks at once: the writes of one turn of the event loop share
one transaction, run records are written soon and never waited for, nothing queued is lost.

Transactions are counted on the store's real connection: ``sqlite3.connect`` is wrapped to
install a trace callback that notes each ``COMMIT``. Another process's write lock is a second
connection holding ``BEGIN IMMEDIATE``. Task loops run under a FakeClock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from repeat_every import repeat_every
from repeat_every.stores import SQLiteClaimStore
from repeat_every.testing import FakeClock

START = dt.datetime(2031, 3, 4, 5, 6, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread of each ``COMMIT`` the stores' connections make."""
    import threading

    seen: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(
            lambda sql: seen.append(threading.current_thread().name) if sql == "COMMIT" else None
        )
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    return seen


def _holder(path: Path) -> sqlite3.Connection:
    """Another process's connection; ``BEGIN IMMEDIATE`` on it takes the write lock."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


async def _together(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in its own task, all started in the same turn of the event loop."""
    return await asyncio.gather(*(call() for call in calls))


async def test_claims_of_many_tasks_in_one_turn_share_one_transaction(
    tmp_path: Path, commits: list[str]
) -> None:
    async with SQLiteClaimStore(tmp_path / "claims.db") as store:
        assert await store.claim("warm-up", 0, 60)  # opens the file
        before = len(commits)
        won = await _together(*(lambda i=i: store.claim(f"job-{i}", 1, 60) for i in range(100)))
        # The first claim of the turn runs at once; the 99 others wait for the end of the
        # turn and are written together.
        assert won == [True] * 100
        assert len(commits) - before == 2
        again = await _together(*(lambda i=i: store.claim(f"job-{i}", 1, 60) for i in range(100)))
        assert again == [False] * 100
        statuses = await store.statuses()
    assert sorted(s.task for s in statuses if s.last_claim) == sorted(
        ["warm-up", *(f"job-{i}" for i in range(100))]
    )


async def test_a_claim_that_waits_past_its_deadline_in_a_batch_loses_and_writes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "claims.db"
    holder = _holder(path)
    async with SQLiteClaimStore(path) as store, SQLiteClaimStore(path) as other:
        assert await store.claim("warm-up", 0, 60)
        holder.execute("BEGIN IMMEDIATE")
        soon = time.time() - 60 + 0.1  # its claim window ends 0.1 s from now
        claims = _together(
            lambda: store.claim("late", 1, 60, deadline=soon),
            lambda: store.claim("in-time", 1, 60, deadline=time.time()),
        )
        await asyncio.sleep(0.3)  # both wait for the lock, in the store's thread
        holder.execute("ROLLBACK")
        assert await claims == [False, True]
        assert (await other.status("late")).last_claim is None
        assert await other.claim("late", 1, 60)  # nothing was written for it
    holder.close()


async def test_run_records_of_many_tasks_are_queued_with_their_turn_and_seen_by_status(
    tmp_path: Path, commits: list[str]
) -> None:
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path) as store, SQLiteClaimStore(path) as other:
        assert await store.claim("warm-up", 0, 60)
        assert await other.claim("warm-up", 1, 60)
        before = len(commits)
        now = time.time()
        read: list[Any] = []

        async def look() -> None:  # in the same turn, after the 50 records were made
            read.append(len(commits) - before)
            read.append((await other.status("job-0")).last_success is not None)
            read.append((await other.status("job-49")).last_success is not None)
            # This store's own reads write what is queued first.
            read.append((await store.status("job-49")).last_success is not None)
            read.append(len(commits) - before)

        await _together(
            *(lambda i=i: store.record_run(f"job-{i}", 1, now, 0.01) for i in range(50)), look
        )
        # The first record of the turn was written at once, the 49 others were queued and
        # their callers went on; another store does not see them before the end of the turn.
        assert read == [1, True, False, True, 2]
        seen = [s for s in await other.statuses() if s.task.startswith("job-")]
        assert len(seen) == 50
        assert all(s.last_success is not None for s in seen)


async def test_queued_run_records_are_written_at_the_end_of_their_turn(tmp_path: Path) -> None:
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path) as store, SQLiteClaimStore(path) as other:
        assert await store.claim("warm-up", 0, 60)
        assert await other.claim("warm-up", 1, 60)
        now = time.time()
        await _together(
            lambda: store.claim("job", 1, 60),  # goes first, at once
            lambda: store.record_run("job", 1, now, 0.5, "boom"),  # queued
        )
        await asyncio.sleep(0)  # the end of the turn that queued it
        failure = (await other.status("job")).last_failure
    assert failure is not None
    assert failure.error == "boom"


async def test_aclose_writes_the_queued_run_records(tmp_path: Path) -> None:
    path = tmp_path / "claims.db"
    store = SQLiteClaimStore(path)
    assert await store.claim("warm-up", 0, 60)

    async def record_and_close() -> None:
        await store.record_run("job", 1, time.time(), 0.25)  # queued behind the claim below
        await store.aclose()  # in the same turn: before the end-of-turn write

    await _together(lambda: store.claim("job", 1, 60), record_and_close)
    async with SQLiteClaimStore(path) as other:
        success = (await other.status("job")).last_success
    assert success is not None
    assert success.duration == 0.25


async def test_a_run_record_never_waits_for_another_processs_lock(tmp_path: Path) -> None:
    path = tmp_path / "claims.db"
    holder = _holder(path)
    async with SQLiteClaimStore(path) as store:
        assert await store.claim("warm-up", 0, 60)
        holder.execute("BEGIN IMMEDIATE")
        # A record meeting the lock is queued, and record_run returns at once.
        await asyncio.wait_for(store.record_run("job", 0, time.time(), 0.1), 1)
        claim = asyncio.ensure_future(store.claim("job", 1, 60))  # waits for the lock
        await asyncio.sleep(0.05)
        # So is a record made while the store's thread waits for the lock.
        await asyncio.wait_for(store.record_run("job", 1, time.time(), 0.1), 1)
        assert not claim.done()
        holder.execute("ROLLBACK")
        assert await claim
        status = await store.status("job")  # after the queued writes, in the store's thread
    holder.close()
    assert status.last_claim is not None
    assert status.last_success is not None


async def test_flush_waits_for_the_records_queued_behind_another_processs_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "claims.db"
    store = SQLiteClaimStore(path)
    await store.flush()  # never used: nothing to write, and no file is made
    assert not path.exists()
    holder = _holder(path)
    assert await store.claim("warm-up", 0, 60)
    holder.execute("BEGIN IMMEDIATE")
    await asyncio.wait_for(store.record_run("job", 0, time.time(), 0.1), 1)  # queued
    await asyncio.sleep(0)  # the end of the turn: the record goes to the store's thread
    flushed = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0.05)
    assert not flushed.done()  # the thread waits for the lock, and flush() for the thread
    holder.execute("ROLLBACK")
    await asyncio.wait_for(flushed, 5)
    with sqlite3.connect(path) as reader:  # another process's view: written
        rows = reader.execute(
            "SELECT ok_tick FROM repeat_every_claims_tasks WHERE task = 'job'"
        ).fetchall()
    reader.close()
    holder.close()
    await store.aclose()
    assert rows == [(0,)]


async def test_a_run_record_that_opens_the_file_is_written_before_record_run_returns(
    tmp_path: Path, commits: list[str]
) -> None:
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path) as store:
        # The file is not open yet: the store's thread opens it and writes the record, and
        # record_run waits for both (an unusable file is reported to the caller).
        await store.record_run("job", 1, time.time(), 0.1)
        assert commits == ["repeat_every-sqlite_0"]
        with sqlite3.connect(path) as reader:
            rows = reader.execute("SELECT ok_tick FROM repeat_every_claims_tasks").fetchall()
        reader.close()
    assert rows == [(1,)]


async def test_a_run_record_that_cannot_open_the_file_is_raised_once_not_also_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteClaimStore(tmp_path / "missing-folder" / "claims.db")
    with (
        caplog.at_level(logging.WARNING, logger="repeat_every"),
        pytest.raises(sqlite3.OperationalError, match="unable to open"),
    ):
        await store.record_run("job", 1, time.time(), 0.1)
    await store.aclose()
    # Its caller has the error (the task loop logs it once, as "could not write the run
    # record of tick 1"); the store does not log it a second time as a lost queued record.
    assert [r.getMessage() for r in caplog.records] == []


async def test_a_failing_batch_reaches_the_store_error_policy_of_every_waiting_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "claims.db"
    store = SQLiteClaimStore(path)
    assert await store.claim("warm-up", 0, 60)
    ran: list[str] = []

    def make(name: str, policy: Any) -> Any:
        @repeat_every(seconds=10, store=store, name=name, on_store_error=policy)
        async def job() -> None:
            ran.append(name)
            if name == "first":
                # The first task of the turn claimed at once and runs now; the others'
                # claims wait for the end of the turn, and meet a file without its table.
                with sqlite3.connect(path, isolation_level=None) as other:
                    other.execute("DROP TABLE repeat_every_claims")
                other.close()

        return job

    with FakeClock(start=START) as clock:
        handles = [
            make("first", "skip")(),
            make("skipper-1", "skip")(),
            make("skipper-2", "skip")(),
            make("runner", "run")(),
        ]
        await clock.advance(0)
        for handle in handles:
            await handle.aclose()
    await store.aclose()
    assert ran == ["first", "runner"]
    failed = [r.getMessage() for r in caplog.records if "claim store failed" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in failed) == ["runner", "skipper-1", "skipper-2"]
    assert [h.skipped for h in handles] == [0, 1, 1, 0]


async def test_a_queued_run_record_that_cannot_be_written_is_logged_with_its_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path) as store:
        assert await store.claim("warm-up", 0, 60)

        async def claim_then_drop() -> None:
            assert await store.claim("fine", 1, 60)  # the first write of the turn: at once
            with sqlite3.connect(path, isolation_level=None) as other:
                other.execute("DROP TABLE repeat_every_claims_tasks")
            other.close()

        with caplog.at_level(logging.WARNING, logger="repeat_every"):
            await _together(
                claim_then_drop,
                lambda: store.record_run("lost-job", 1, time.time(), 0.1),  # queued: returns
            )
            await asyncio.sleep(0)  # the end of the turn: the queued record fails
        # The tables are made again by the next connection: records work again.
        await store.record_run("lost-job", 2, time.time(), 0.1)
        assert (await store.status("lost-job")).last_success.tick == 2  # type: ignore[union-attr]
    lost = [r for r in caplog.records if "could not write the run record" in r.getMessage()]
    assert len(lost) == 1
    assert lost[0].levelno == logging.WARNING
    assert "lost-job" in lost[0].getMessage()


async def test_records_of_many_tasks_due_together_are_seen_right_after_their_runs(
    tmp_path: Path, commits: list[str]
) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")

    def make(i: int) -> Any:
        @repeat_every(seconds=10, store=store, name=f"job-{i}")
        async def job() -> None:
            pass

        return job

    with FakeClock(start=START) as clock:
        handles = [make(i)() for i in range(30)]
        await clock.advance(0)
        assert [h.runs for h in handles] == [1] * 30
        statuses = await store.statuses()
        for handle in handles:
            await handle.aclose()
    await store.aclose()
    assert len(statuses) == 30
    assert all(s.last_claim is not None and s.last_success is not None for s in statuses)
    # 30 claims and 30 records in a handful of transactions, not 60.
    assert len(commits) <= 6


async def test_a_claim_cancelled_while_it_waits_leaves_the_others_of_its_batch_answered(
    tmp_path: Path,
) -> None:
    async with SQLiteClaimStore(tmp_path / "claims.db") as store:
        assert await store.claim("warm-up", 0, 60)
        first, second, third = (
            asyncio.ensure_future(store.claim(name, 1, 60)) for name in ("a", "b", "c")
        )
        await asyncio.sleep(0)  # all three ran: "a" at once, "b" and "c" wait for the turn's end
        assert first.done()
        second.cancel()
        assert await first
        assert await third
        with pytest.raises(asyncio.CancelledError):
            await second
        # Its claim was written with the batch: a cancelled wait does not undo it (the tick
        # is missed by its caller, never run twice).
        assert not await store.claim("b", 1, 60)


async def test_a_status_read_that_fails_reconnects_and_the_next_one_works(tmp_path: Path) -> None:
    path = tmp_path / "claims.db"
    async with SQLiteClaimStore(path) as store:
        assert await store.claim("job", 1, 60)
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("DROP TABLE repeat_every_claims_tasks")
        other.close()
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await store.status("job")
        status = await store.status("job")  # reconnected: the table is made again, empty
    assert status.last_claim is None
