"""Events and structured logs: what listeners are told, and the fields of every log record.

Everything runs under a ``FakeClock``: the times in the events are exact virtual seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import repeat_every._events as events_module
from repeat_every import (
    AttemptEnded,
    AttemptStarted,
    ClaimedElsewhere,
    Retry,
    RunEnded,
    RunTimeoutError,
    TaskEvent,
    TicksSkipped,
    add_listener,
    repeat_every,
    run_tasks,
)
from repeat_every.stores import SQLiteClaimStore
from repeat_every.testing import FakeClock

START = dt.datetime(2031, 3, 4, 5, 6, 0, tzinfo=dt.timezone.utc)
START_KEY = int(START.timestamp())  # the key of the 1-second tick at START


class Boom(Exception):
    """The failure jobs raise in these tests."""


@pytest.fixture
def events() -> Iterator[list[TaskEvent]]:
    """Every event of the test, in order (a listener added for the test, removed after it)."""
    seen: list[TaskEvent] = []
    with add_listener(seen.append):
        yield seen
    assert events_module.listeners == []  # nothing left installed by the test


def brief(event: TaskEvent) -> tuple[Any, ...]:
    """The event as a short tuple: its kind and the fields a test compares."""
    if isinstance(event, AttemptStarted):
        return ("start", event.run, event.attempt, event.scheduled, event.started, event.manual)
    if isinstance(event, AttemptEnded):
        return ("end", event.run, event.attempt, event.outcome, event.duration, event.manual)
    if isinstance(event, RunEnded):
        return ("run", event.run, event.attempts, event.outcome, event.duration, event.manual)
    if isinstance(event, TicksSkipped):
        return ("skip", event.reason, event.ticks)
    assert isinstance(event, ClaimedElsewhere)
    return ("elsewhere", event.key - START_KEY)


# -- attempts and runs -----------------------------------------------------------------------------


async def test_each_attempt_start_and_end_and_each_run_end_are_told_in_order(
    fake_clock: FakeClock, events: list[TaskEvent]
) -> None:
    outcomes = iter(["fail", "ok", "slow"])

    @repeat_every(seconds=60, retry=Retry(attempts=2, backoff=5), timeout=10, name="sync")
    async def job() -> None:
        what = next(outcomes)
        await asyncio.sleep(2)
        if what == "fail":
            raise Boom("partner down")
        if what == "slow":
            await asyncio.sleep(60)

    async with run_tasks(job):
        await fake_clock.advance(60 + 14)
        told = [brief(e) for e in events]
    assert told == [
        ("start", 0, 1, 0.0, 0.0, False),
        ("end", 0, 1, "failed", 2.0, False),
        ("start", 0, 2, 0.0, 7.0, False),  # the retry, 5 s after the failure
        ("end", 0, 2, "ok", 2.0, False),
        ("run", 0, 2, "ok", 9.0, False),  # first start to last end, backoff included
        ("start", 1, 1, 60.0, 60.0, False),
        ("end", 1, 1, "timeout", 10.0, False),
        # its retry would start at 75 s, after the advance
    ]
    timeout = events[6]
    assert isinstance(timeout, AttemptEnded)
    assert isinstance(timeout.exception, RunTimeoutError)
    assert events[1].exception.args == ("partner down",)  # type: ignore[attr-defined]
    assert all(e.task == "sync" for e in events)


async def test_events_carry_the_wall_clock_instant_and_the_lateness_of_each_start(
    events: list[TaskEvent],
) -> None:
    with FakeClock(start=START) as clock:

        @repeat_every(seconds=10, jitter=2, seed=1, name="jittered")
        async def job() -> None:
            await asyncio.sleep(1)

        async with run_tasks(job):
            await clock.advance(15)
    starts = [e for e in events if isinstance(e, AttemptStarted)]
    assert len(starts) == 2
    for start in starts:
        assert 0 <= start.late < 2  # the jitter delayed it
        assert start.started == start.scheduled + start.late
        assert start.wall == pytest.approx(START.timestamp() + start.started, abs=1e-6)
    ends = [e for e in events if isinstance(e, AttemptEnded)]
    assert [e.late for e in ends] == [s.late for s in starts]
    assert [e.wall for e in ends] == [s.wall + 1 for s in starts]


async def test_a_run_that_fails_all_its_attempts_ends_failed_with_its_last_exception(
    fake_clock: FakeClock, events: list[TaskEvent]
) -> None:
    @repeat_every(seconds=60, retry=Retry(attempts=3, backoff=1), max_repetitions=1)
    async def job() -> None:
        raise Boom(fake_clock.now)

    handle = job()
    await fake_clock.advance(10)
    await handle.wait()
    [run] = [e for e in events if isinstance(e, RunEnded)]
    assert (run.outcome, run.attempts, run.duration) == ("failed", 3, 3.0)
    assert isinstance(run.exception, Boom)
    assert run.exception.args == (3.0,)  # the third attempt's, at 1 + 2 s of backoff


async def test_a_cancelled_run_ends_with_a_cancelled_attempt_and_no_run_end(
    fake_clock: FakeClock, events: list[TaskEvent]
) -> None:
    @repeat_every(seconds=60)
    async def stuck() -> None:
        await asyncio.sleep(1000)

    handle = stuck()
    await fake_clock.advance(5)
    closing = asyncio.create_task(handle.aclose(timeout=5))
    await fake_clock.advance(5)
    await closing
    assert [brief(e)[:4] for e in events] == [
        ("start", 0, 1, 0.0),
        ("end", 0, 1, "cancelled"),
    ]
    assert handle.runs == 0  # not counted in the state either


async def test_a_def_job_is_told_like_an_async_one(
    fake_clock: FakeClock, events: list[TaskEvent]
) -> None:
    @repeat_every(seconds=1, max_repetitions=2)
    def job() -> None:
        pass

    handle = job()
    await fake_clock.advance(1)
    await handle.wait()
    assert [brief(e)[:5] for e in events] == [
        ("start", 0, 1, 0.0, 0.0),
        ("end", 0, 1, "ok", 0.0),
        ("run", 0, 1, "ok", 0.0),
        ("start", 1, 1, 1.0, 1.0),
        ("end", 1, 1, "ok", 0.0),
        ("run", 1, 1, "ok", 0.0),
    ]


async def test_run_now_runs_are_told_as_manual(
    fake_clock: FakeClock, events: list[TaskEvent]
) -> None:
    @repeat_every(seconds=3600, wait_first=True, retry=Retry(attempts=2, backoff=1))
    async def export() -> None:
        if fake_clock.now < 1:
            raise Boom("first attempt fails")

    async with run_tasks(export) as (handle,):
        running = asyncio.create_task(handle.run_now())
        await fake_clock.advance(1)
        record = await running
    assert record.ok
    assert [brief(e) for e in events] == [
        ("start", 0, 1, 0.0, 0.0, True),
        ("end", 0, 1, "failed", 0.0, True),
        ("start", 0, 2, 0.0, 1.0, True),
        ("end", 0, 2, "ok", 0.0, True),
        ("run", 0, 2, "ok", 1.0, True),
    ]
    first = events[0]
    assert isinstance(first, AttemptStarted)
    assert first.late == 0


async def test_run_now_cancelled_at_shutdown_is_told_as_a_cancelled_manual_attempt(
    fake_clock: FakeClock, events: list[TaskEvent]
) -> None:
    @repeat_every(seconds=3600, wait_first=True)
    async def export() -> None:
        await asyncio.sleep(1000)

    handle = export()
    running = asyncio.create_task(handle.run_now())
    await fake_clock.advance(1)
    closing = asyncio.create_task(handle.aclose(timeout=1))
    await fake_clock.advance(1)
    await closing
    with pytest.raises(asyncio.CancelledError):
        await running
    assert [brief(e)[:4] for e in events] == [
        ("start", 0, 1, 0.0),
        ("end", 0, 1, "cancelled"),
    ]
    assert all(e.manual for e in events)  # type: ignore[attr-defined]


# -- ticks that are not run ------------------------------------------------------------------------


def skips(events: list[TaskEvent]) -> list[tuple[str, int]]:
    return [(e.reason, e.ticks) for e in events if isinstance(e, TicksSkipped)]


async def test_ticks_an_overrun_covered_are_told_with_their_count(
    fake_clock: FakeClock, events: list[TaskEvent]
) -> None:
    @repeat_every(seconds=10, max_repetitions=2)
    async def slow() -> None:
        await asyncio.sleep(35)

    handle = slow()
    await fake_clock.advance(80)
    await handle.wait()
    assert skips(events) == [("overrun", 3)]  # ticks 10, 20, 30; the next run starts at 40
    assert handle.skipped == 3


async def test_paused_ticks_and_ticks_during_a_run_now_are_told_with_their_reason(
    fake_clock: FakeClock, events: list[TaskEvent]
) -> None:
    @repeat_every(seconds=10, wait_first=True)
    async def job() -> None:
        if fake_clock.now == 25:
            await asyncio.sleep(10)  # the run_now() run covers the tick at 30

    async with run_tasks(job) as (handle,):
        handle.pause()
        await fake_clock.advance(20)  # ticks at 10 and 20 come while paused
        handle.resume()
        await fake_clock.advance(5)
        running = asyncio.create_task(handle.run_now())
        await fake_clock.advance(10)
        await running
    assert skips(events) == [("paused", 1), ("paused", 1), ("run_now", 1)]
    assert (handle.paused_ticks, handle.skipped) == (2, 1)


async def test_a_tick_another_worker_claimed_is_told_as_claimed_elsewhere(
    tmp_path: Path, events: list[TaskEvent]
) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")

    def worker() -> Any:
        @repeat_every(seconds=1, store=store, name="shared")
        async def job() -> None:
            pass

        return job

    with FakeClock(start=START) as clock:
        handles = [worker()(), worker()()]
        await clock.advance(2)
        for handle in handles:
            await handle.aclose()
        await store.aclose()
    elsewhere = [e for e in events if isinstance(e, ClaimedElsewhere)]
    assert sorted(e.key - START_KEY for e in elsewhere) == [0, 1, 2]
    assert all(e.scheduled == e.key - START_KEY for e in elsewhere)
    assert len([e for e in events if isinstance(e, RunEnded)]) == 3
    assert sum(h.elsewhere for h in handles) == 3


async def test_ticks_skipped_because_the_store_failed_are_told(
    events: list[TaskEvent], caplog: pytest.LogCaptureFixture
) -> None:
    class Unreachable:
        async def claim(self, task: str, tick: int, ttl: float) -> bool:
            raise ConnectionError("store down")

    @repeat_every(seconds=1, store=Unreachable(), name="no-store")
    async def job() -> None:
        pass

    with FakeClock(start=START) as clock:
        handle = job()
        await clock.advance(1)
        await handle.aclose()
    assert skips(events) == [("store_error", 1), ("store_error", 1)]
    [first, _] = [r for r in caplog.records if "skipping tick" in r.getMessage()]
    assert first.repeat_every_task == "no-store"  # type: ignore[attr-defined]
    assert first.repeat_every_tick == START.isoformat()  # type: ignore[attr-defined]
    assert first.repeat_every_skip_reason == "store_error"  # type: ignore[attr-defined]
    assert first.repeat_every_skipped == 1  # type: ignore[attr-defined]


async def test_ticks_a_frozen_worker_slept_through_are_told_as_stale(
    tmp_path: Path, events: list[TaskEvent]
) -> None:
    oversleep = [0.0]
    store = SQLiteClaimStore(tmp_path / "claims.db")
    with FakeClock(start=START) as clock:

        def frozen_sleep(seconds: float) -> Any:
            extra, oversleep[0] = oversleep[0], 0.0
            return clock.sleep(seconds + extra)

        @repeat_every(
            seconds=1,
            store=store,
            claim_ttl=4,
            clock=clock.monotonic,
            sleep=frozen_sleep,
            name="frozen",
        )
        async def job() -> None:
            pass

        handle = job()
        deadline = time.monotonic() + 5
        while not clock.deadlines:  # the task's own sleep makes it known to the clock
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        await clock.advance(2)
        oversleep[0] = 10.0  # the sleep towards tick 4 ends at 14 s
        await clock.advance(13)
        await handle.aclose()
        await store.aclose()
    assert skips(events) == [("stale", 10)]


# -- listeners -------------------------------------------------------------------------------------


async def test_a_listener_that_raises_is_logged_once_and_breaks_neither_the_run_nor_the_others(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: TaskEvent) -> None:
        raise RuntimeError("listener bug")

    seen: list[TaskEvent] = []
    with add_listener(broken), add_listener(seen.append):

        @repeat_every(seconds=1, max_repetitions=3, name="steady")
        async def job() -> None:
            pass

        handle = job()
        await fake_clock.advance(2)
        await handle.wait()
    assert handle.runs == 3
    assert handle.failures == 0
    assert len(seen) == 9  # the listener after the broken one was told everything
    [record] = [r for r in caplog.records if "event listener" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith(f"event listener {broken!r} raised on AttemptStarted")
    assert "it stays installed" in record.getMessage()
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "listener bug"
    assert record.repeat_every_task == "steady"  # type: ignore[attr-defined]


async def test_later_failures_of_a_listener_are_summed_in_one_line_per_interval(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def flaky(event: TaskEvent) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError(f"failure {calls}")

    @repeat_every(seconds=1, max_repetitions=1)
    async def job() -> None:
        pass

    with add_listener(flaky):
        handle = job()  # three events: start, end, run end
        await handle.wait()
        assert len([r for r in caplog.records if "event listener" in r.getMessage()]) == 1
        monkeypatch.setattr(events_module, "_REPEAT_LOG_EVERY", 0.0)
        handle = job()
        await handle.wait()
    reports = [r.getMessage() for r in caplog.records if "event listener" in r.getMessage()]
    assert len(reports) == 4  # the first, then one per failure: the interval is now 0
    assert reports[1].startswith(
        f"event listener {flaky!r} raised 3 more time(s) since its last report; the last on "
        "AttemptStarted of "
    )
    assert "raised 1 more time(s)" in reports[2]


async def test_a_listener_returning_a_coroutine_is_reported_and_the_coroutine_closed(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def handle_event(event: TaskEvent) -> None:
        raise AssertionError("never awaited")

    @repeat_every(seconds=1, max_repetitions=1)
    async def job() -> None:
        pass

    # A lambda hides that the work is async: the coroutine it returns is closed, no
    # "never awaited" warning (which -W error would turn into a failure), and it is logged.
    with add_listener(lambda event: handle_event(event)):
        handle = job()
        await handle.wait()
    [record] = [r for r in caplog.records if "event listener" in r.getMessage()]
    assert "returned a coroutine" in str(record.exc_info[1])  # type: ignore[index]


def test_an_async_listener_is_refused_with_what_to_do_instead() -> None:
    async def on_event(event: TaskEvent) -> None:
        pass

    class AsyncCallable:
        async def __call__(self, event: TaskEvent) -> None:
            pass

    for listener in (on_event, AsyncCallable()):
        with pytest.raises(TypeError, match=r"is async, and nothing would await it.*put_nowait"):
            add_listener(listener)
    with pytest.raises(TypeError, match="takes a function of one argument"):
        add_listener("print")  # type: ignore[arg-type]
    assert events_module.listeners == []


async def test_a_removed_listener_is_told_nothing_more_and_removing_twice_is_harmless(
    fake_clock: FakeClock,
) -> None:
    seen: list[TaskEvent] = []
    remove = add_listener(seen.append)
    assert repr(remove) == f"<Subscription {seen.append!r} (active)>"

    @repeat_every(seconds=1)
    async def job() -> None:
        pass

    async with run_tasks(job):
        await fake_clock.advance(1)
        told = len(seen)
        remove()
        remove()
        await fake_clock.advance(5)
    assert told == 6
    assert len(seen) == told
    assert repr(remove) == f"<Subscription {seen.append!r} (removed)>"


async def test_a_listener_removed_by_an_earlier_one_is_not_called_for_that_event(
    fake_clock: FakeClock,
) -> None:
    later: list[TaskEvent] = []

    def remove_the_next(event: TaskEvent) -> None:
        dropping()

    remover = add_listener(remove_the_next)  # called first: listeners run in order
    dropping = add_listener(later.append)

    @repeat_every(seconds=1, max_repetitions=1)
    async def job() -> None:
        pass

    with remover:
        await job().wait()
    assert later == []
    assert events_module.listeners == []


async def test_the_same_function_added_twice_is_called_twice(fake_clock: FakeClock) -> None:
    seen: list[TaskEvent] = []

    @repeat_every(seconds=1, max_repetitions=1)
    async def job() -> None:
        pass

    with add_listener(seen.append), add_listener(seen.append):
        await job().wait()
    assert len(seen) == 6
    assert seen[0] is seen[1]  # the same event object, told to both


def test_events_are_immutable() -> None:
    event = TicksSkipped("job", 0.0, reason="paused", ticks=1)
    with pytest.raises(AttributeError):
        event.ticks = 2  # type: ignore[misc]


# -- structured logs -------------------------------------------------------------------------------


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k.startswith("repeat_every_")}


async def test_a_failure_log_record_carries_the_task_tick_run_attempt_and_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @repeat_every(seconds=60, retry=Retry(attempts=2, backoff=5), name="sync-orders")
    async def job() -> None:
        raise Boom("partner down")

    with FakeClock(start=START) as clock:
        async with run_tasks(job):
            await clock.advance(60)
    retry, failure, *_ = [r for r in caplog.records if r.name == "repeat_every"]
    tick = START.isoformat()
    assert fields(retry) == {
        "repeat_every_task": "sync-orders",
        "repeat_every_tick": tick,
        "repeat_every_run": 0,
        "repeat_every_attempt": 1,
        "repeat_every_outcome": "failed",
    }
    assert fields(failure) == {
        "repeat_every_task": "sync-orders",
        "repeat_every_tick": tick,
        "repeat_every_run": 0,
        "repeat_every_attempt": 2,
        "repeat_every_outcome": "failed",
    }


async def test_every_log_record_about_a_task_names_it_in_a_json_formatter(
    fake_clock: FakeClock,
) -> None:
    # A JSON formatter as python-json-logger's: the record's extra attributes become keys.
    class JsonFormatter(logging.Formatter):
        standard = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))

        def format(self, record: logging.LogRecord) -> str:
            extra = {k: v for k, v in vars(record).items() if k not in self.standard}
            return json.dumps({"message": record.getMessage(), **extra}, default=str)

    lines: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = ListHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test_events.app")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    library = logging.getLogger("repeat_every")
    library.addHandler(handler)
    previous_level = library.level
    library.setLevel(logging.DEBUG)
    try:

        @repeat_every(seconds=10, timeout=5, logger=logger, name="slow-export")
        async def slow() -> None:
            await asyncio.sleep(8 if fake_clock.now < 10 else 25)

        @repeat_every(seconds=10, name="stuck")
        async def stuck() -> None:
            await asyncio.sleep(1000)

        async with run_tasks(slow, shutdown_timeout=3):
            await fake_clock.advance(25)
        stop = asyncio.Event()

        async def serve() -> None:
            async with run_tasks(stuck, shutdown_timeout=1):
                await stop.wait()

        serving = asyncio.create_task(serve())
        await fake_clock.advance(1)
        stop.set()
        deadline = time.monotonic() + 5
        while not any("shutdown: waiting" in line for line in lines):
            assert time.monotonic() < deadline
            await asyncio.sleep(0)  # until the shutdown waits on the clock
        await fake_clock.advance(1)
        await serving
    finally:
        logger.removeHandler(handler)
        library.removeHandler(handler)
        library.setLevel(previous_level)
    records = [json.loads(line) for line in lines]
    assert records, "nothing was logged"
    for record in records:
        assert "repeat_every_task" in record or "repeat_every_tasks" in record, (
            f"no task named in {record}"
        )
    by_message = {r["message"]: r for r in records}
    assert (
        by_message[
            "slow-export: run 0 failed: RunTimeoutError('slow-export: run exceeded its "
            "timeout of 5 s')"
        ]["repeat_every_outcome"]
        == "timeout"
    )
    assert by_message["shutdown: waiting up to 1 s for the run in progress of: stuck"][
        "repeat_every_tasks"
    ] == ["stuck"]
    assert (
        by_message["stuck: still running 1 s after it was asked to stop; cancelling it"][
            "repeat_every_task"
        ]
        == "stuck"
    )
