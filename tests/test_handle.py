"""The handle of a running loop: stop, cancel, wait, state, strong references, restarts."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import threading
import weakref
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from repeat_every import Retry, TaskHandle, TaskState, lifespan, repeat_every, running_handles
from repeat_every.testing import FakeClock


class Boom(Exception):
    """The failure jobs raise in these tests."""


# -- stop ------------------------------------------------------------------------------------------


async def test_stop_lets_the_current_run_finish_then_calls_on_complete(
    fake_clock: FakeClock,
) -> None:
    events: list[tuple[str, float]] = []

    @repeat_every(seconds=10, on_complete=lambda: events.append(("complete", fake_clock.now)))
    async def job() -> None:
        events.append(("start", fake_clock.now))
        await fake_clock.sleep(4)
        events.append(("end", fake_clock.now))

    handle = job()
    await fake_clock.advance(12)  # run 1 started at 10 and is in progress until 14
    handle.stop()
    assert handle.running
    await fake_clock.advance(100)
    await handle.wait()
    assert events == [
        ("start", 0.0),
        ("end", 4.0),
        ("start", 10.0),
        ("end", 14.0),
        ("complete", 14.0),
    ]
    assert handle.runs == 2
    assert not handle.cancelled
    assert fake_clock.history.outcomes(job) == ["ok", "ok"]


async def test_stop_while_sleeping_ends_the_loop_at_once(fake_clock: FakeClock) -> None:
    completed: list[float] = []

    @repeat_every(seconds=3600, on_complete=lambda: completed.append(fake_clock.now))
    async def job() -> None:
        pass

    handle = job()
    await fake_clock.advance(60)
    assert fake_clock.deadlines == [3600.0]
    handle.stop()
    await handle.wait()  # no advance needed: the sleep is interrupted
    assert handle.done
    assert not handle.cancelled
    assert completed == [60.0]
    assert fake_clock.deadlines == []
    assert handle.runs == 1


async def test_stop_before_the_first_run_runs_nothing(fake_clock: FakeClock) -> None:
    calls: list[int] = []

    @repeat_every(seconds=1, on_complete=lambda: calls.append(0))
    async def job() -> None:
        calls.append(1)

    handle = job()
    handle.stop()
    await handle.wait()
    assert calls == [0]


async def test_stop_before_the_first_wait_ends_at_once_and_calls_on_complete(
    fake_clock: FakeClock,
) -> None:
    calls: list[int] = []

    @repeat_every(seconds=1, wait_first=True, on_complete=lambda: calls.append(0))
    async def job() -> None:
        calls.append(1)

    handle = job()
    handle.stop()  # before the loop's first step: it never starts its first wait
    await handle.wait()
    assert calls == [0]
    assert not handle.cancelled
    assert fake_clock.deadlines == []


async def test_cancel_during_a_retry_wait_cancels_the_loop(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=60, retry=Retry(attempts=3, backoff=5))
    async def job() -> None:
        raise Boom("down")

    handle = job()
    await fake_clock.advance(1)  # the first attempt failed; the retry waits until 5
    handle.cancel()
    await handle.wait()
    assert handle.cancelled
    assert (handle.runs, handle.failures, handle.retries) == (0, 0, 1)


async def test_state_of_a_task_on_the_real_clock_reads_real_time() -> None:
    @repeat_every(seconds=60)
    async def job() -> None:
        pass

    before = dt.datetime.now(dt.timezone.utc)
    handle = job()
    await asyncio.sleep(0.01)
    state = handle.state
    handle.cancel()
    await handle.wait()
    assert state.runs == 1
    assert state.last_started_at is not None
    assert state.next_run_at is not None
    after = dt.datetime.now(dt.timezone.utc)
    slack = dt.timedelta(seconds=5)  # generous: the machine may be busy
    assert before - slack <= state.last_started_at <= after + slack
    assert before + dt.timedelta(seconds=60) - slack <= state.next_run_at
    assert state.next_run_at <= after + dt.timedelta(seconds=60) + slack


async def test_stop_from_another_thread(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=5)
    async def job() -> None:
        pass

    handle = job()
    await fake_clock.advance(12)
    thread = threading.Thread(target=handle.stop)
    thread.start()
    thread.join()
    await handle.wait()
    assert handle.runs == 3
    assert not handle.cancelled


async def test_stop_from_inside_a_sync_job_ends_after_that_run(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    def job() -> None:
        if job.handle is not None and job.handle.runs == 2:
            job.handle.stop()

    handle = job()
    await fake_clock.advance(10)
    await handle.wait()
    assert handle.runs == 3


async def test_stop_is_idempotent_and_harmless_after_the_end(fake_clock: FakeClock) -> None:
    completed: list[int] = []

    @repeat_every(seconds=1, max_repetitions=1, on_complete=lambda: completed.append(1))
    async def job() -> None:
        pass

    handle = job()
    handle.stop()
    handle.stop()
    await handle.wait()
    handle.stop()
    handle.cancel()
    await handle.wait()
    assert completed == [1]
    assert not handle.cancelled


async def test_aclose_stops_and_waits_without_raising(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1, raise_exceptions=True)
    async def job() -> None:
        raise Boom

    handle = job()
    waiter = asyncio.ensure_future(handle.wait())
    await fake_clock.run_due()
    await handle.aclose()  # the failure was already reported to the waiter
    with pytest.raises(Boom):
        await waiter


# -- cancel ----------------------------------------------------------------------------------------


async def test_cancel_interrupts_an_async_run_in_progress(fake_clock: FakeClock) -> None:
    events: list[str] = []

    @repeat_every(seconds=10, on_complete=lambda: events.append("complete"))
    async def job() -> None:
        events.append("start")
        try:
            await fake_clock.sleep(5)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        events.append("end")

    handle = job()
    await fake_clock.advance(1)
    handle.cancel()
    await handle.wait()  # returns normally after a cancel
    assert events == ["start", "cancelled"]
    assert handle.cancelled
    assert handle.done
    assert handle.exception is None
    assert fake_clock.deadlines == []


async def test_cancel_from_another_thread(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10)
    async def job() -> None:
        pass

    handle = job()
    await fake_clock.advance(1)
    await asyncio.to_thread(handle.cancel)
    await handle.wait()
    assert handle.cancelled


async def test_cancelling_a_waiter_does_not_cancel_the_loop(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        pass

    handle = job()
    waiter = asyncio.ensure_future(handle.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await fake_clock.advance(3)
    assert handle.running
    assert handle.runs == 4
    handle.cancel()


# -- state -----------------------------------------------------------------------------------------


async def test_state_is_a_snapshot_of_counters_error_and_next_run(fake_clock: FakeClock) -> None:
    count = 0

    @repeat_every(seconds=60, name="digest")
    async def job() -> None:
        nonlocal count
        count += 1
        if count == 2:
            raise Boom("smtp down")

    handle = job()
    await fake_clock.advance(90)
    state = handle.state
    assert isinstance(state, TaskState)
    assert state.name == "digest"
    assert state.running
    assert (state.runs, state.failures, state.retries, state.skipped) == (2, 1, 0, 0)
    assert isinstance(state.last_exception, Boom)
    assert state.next_run == 120.0 == handle.next_run
    assert state.next_run_at is not None
    expected_next = fake_clock.now_datetime + dt.timedelta(seconds=30)
    assert abs(state.next_run_at - expected_next) < dt.timedelta(milliseconds=1)
    assert state.last_started_at is not None
    expected_last = fake_clock.now_datetime - dt.timedelta(seconds=30)
    assert abs(state.last_started_at - expected_last) < dt.timedelta(milliseconds=1)
    as_dict = json.loads(json.dumps(state.as_dict()))
    assert as_dict["last_error"] == "Boom('smtp down')"
    assert as_dict["runs"] == 2

    await fake_clock.advance(60)
    assert state.runs == 2  # a snapshot: it does not move with the task
    assert handle.state.runs == 3

    handle.stop()
    await handle.wait()
    final = handle.state
    assert not final.running
    assert final.next_run is None
    assert final.next_run_at is None


async def test_next_run_is_none_while_a_run_is_in_progress(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10)
    async def job() -> None:
        await fake_clock.sleep(3)

    handle = job()
    await fake_clock.advance(1)
    assert handle.next_run is None
    await fake_clock.advance(3)
    assert handle.next_run == 10.0
    handle.cancel()


# -- references, restarts, starting --------------------------------------------------------------


async def test_library_keeps_running_loops_alive_without_user_references(
    fake_clock: FakeClock,
) -> None:
    calls: list[float] = []

    def start_and_forget() -> weakref.ref[Any]:
        @repeat_every(seconds=1, name="forgotten")
        async def job() -> None:
            calls.append(fake_clock.now)

        job()
        return weakref.ref(job)

    task_ref = start_and_forget()
    gc.collect()
    await fake_clock.advance(5)
    gc.collect()
    await fake_clock.advance(5)
    assert calls == [float(t) for t in range(11)]
    assert task_ref() is not None
    (handle,) = [h for h in running_handles() if h.name == "forgotten"]
    handle.cancel()
    await handle.wait()
    assert handle not in running_handles()


async def test_running_handles_lists_live_loops_only(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1, max_repetitions=2)
    async def job() -> None:
        pass

    handle = job()
    assert handle in running_handles()
    await fake_clock.advance(5)
    assert handle.done
    assert handle not in running_handles()


async def test_starting_twice_in_the_same_loop_is_refused(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        pass

    handle = job()
    with pytest.raises(RuntimeError, match=r"already running.*stop it first"):
        job()
    assert job.handle is handle
    handle.cancel()


async def test_restarting_after_stop_starts_a_fresh_loop(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10)
    async def job() -> None:
        pass

    first = job()
    await fake_clock.advance(25)
    first.stop()
    await first.wait()
    await fake_clock.advance(3)
    second = job()
    await fake_clock.advance(25)
    assert second is not first
    assert job.handle is second
    assert (first.runs, second.runs) == (3, 3)
    assert fake_clock.history.started(job) == [0.0, 10.0, 20.0, 28.0, 38.0, 48.0]
    second.cancel()


def test_calling_a_task_without_a_running_loop_explains_where_to_start_it() -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        pass

    with pytest.raises(RuntimeError, match=r"running event loop.*lifespan"):
        job()
    assert job.handle is None


async def test_awaiting_the_call_returns_the_handle(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        pass

    handle = await job()  # the fastapi-utils startup-handler form
    assert isinstance(handle, TaskHandle)
    assert handle is job.handle
    assert handle.running
    handle.cancel()
    await handle.wait()


async def test_same_task_cannot_run_in_two_event_loops_at_once(fake_clock: FakeClock) -> None:
    # Names of tasks without a store are unique per process (issue 13): a second loop of the
    # same job, in another event loop, would overlap the first one's runs.
    @repeat_every(seconds=1, wait_first=True)
    async def job() -> None: ...

    async def in_other_loop() -> bool:
        handle = job()
        handle.stop()
        await handle.wait()
        return handle.done

    here = job()
    with pytest.raises(RuntimeError, match="is already running in this process"):
        await asyncio.to_thread(asyncio.run, in_other_loop())
    await here.aclose()
    assert await asyncio.to_thread(asyncio.run, in_other_loop())  # once the first has ended


def test_stop_and_cancel_after_the_apps_loop_closed_do_nothing(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=60)
    def job() -> None:
        pass

    with TestClient(FastAPI(lifespan=lifespan(job))):
        handle = job.handle
    assert handle is not None
    assert handle.done
    handle.stop()  # from a sync test, after TestClient closed the event loop
    handle.cancel()
    assert not handle.cancelled


class _BrokenClock:
    """An injected clock that fails after a few readings: a fault in the loop itself."""

    def __init__(self, readings: int) -> None:
        self.left = readings
        self.now = 0.0

    def monotonic(self) -> float:
        self.left -= 1
        if self.left < 0:
            raise OSError("clock source gone")
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def test_a_crash_of_the_loop_itself_is_raised_by_wait_and_logged(
    caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    broken = _BrokenClock(readings=6)

    @repeat_every(seconds=1, clock=broken.monotonic, sleep=broken.sleep, name="broken")
    async def job() -> None:
        pass

    handle = job()
    with pytest.raises(OSError, match="clock source gone"):
        await asyncio.wait_for(handle.wait(), 5)
    assert handle.runs >= 1
    assert handle.exception is not None
    assert any("broken: the loop crashed" in r.getMessage() for r in caplog.records)
    assert loop_errors == []  # the waiter got it


async def test_a_crash_nobody_awaits_reaches_the_loop_handler_once(
    loop_errors: list[dict[str, Any]],
) -> None:
    broken = _BrokenClock(readings=3)

    @repeat_every(seconds=1, clock=broken.monotonic, sleep=broken.sleep, name="broken")
    async def job() -> None:
        pass

    handle = job()
    for _ in range(50):
        if not handle.running:
            break
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the done callback runs one step after the end
    del handle
    gc.collect()
    assert [type(c["exception"]) for c in loop_errors] == [OSError]
    assert "periodic task 'broken' ended" in loop_errors[0]["message"]
