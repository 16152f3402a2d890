"""The loop: fixed rate, overruns, fixed delay, wait_first, hooks, failures, threads, time."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from repeat_every import repeat_every
from repeat_every.testing import FakeClock


class Boom(Exception):
    """The failure jobs raise in these tests."""


# -- fixed rate ------------------------------------------------------------------------------


async def test_fixed_rate_grid_never_drifts_when_runs_take_time(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        await fake_clock.sleep(0.3)

    handle = job()
    await fake_clock.advance(100.5)
    handle.cancel()
    assert fake_clock.history.started(job) == [float(k) for k in range(101)]
    assert {round(r.ended - r.started, 9) for r in fake_clock.history.of(job)} == {0.3}
    assert handle.skipped == 0


async def test_fixed_rate_sync_job_runs_on_the_grid(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=0.25)
    def job() -> None:
        pass

    handle = job()
    await fake_clock.advance(2)
    handle.cancel()
    assert fake_clock.history.started(job) == [k * 0.25 for k in range(9)]


async def test_overrun_skips_covered_ticks_without_overlap_or_burst(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    durations = iter([2.5, 0.1, 0.1, 1.0, 0.1])

    @repeat_every(seconds=1, name="slow")
    async def job() -> None:
        await fake_clock.sleep(next(durations, 0.1))

    handle = job()
    await fake_clock.advance(7.5)
    handle.cancel()
    records = fake_clock.history.of(job)
    # 0 → 2.5 (covers ticks 1 and 2: skipped), 3 → 3.1, 4 → 4.1, 5 → 6.0 (ends exactly on
    # tick 6, which still runs), 6 → 6.1, 7 → 7.1.
    assert [r.started for r in records] == [0.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert handle.skipped == 2
    for earlier, later in itertools.pairwise(records):
        assert earlier.ended <= later.started
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.message
    ]
    assert [r.name for r in warnings] == ["repeat_every"]
    assert "slow" in warnings[0].message
    assert "skipped 2 tick(s)" in warnings[0].message


async def test_overrun_of_many_periods_counts_each_skipped_tick(fake_clock: FakeClock) -> None:
    first = True

    @repeat_every(seconds=1)
    async def job() -> None:
        nonlocal first
        if first:
            first = False
            await fake_clock.sleep(10.5)

    handle = job()
    await fake_clock.advance(12)
    handle.cancel()
    assert fake_clock.history.started(job) == [0.0, 11.0, 12.0]
    assert handle.skipped == 10
    assert handle.runs + handle.skipped == 13  # ticks 0..12: each one run or counted skipped


async def test_skipped_ticks_are_logged_at_most_once_a_minute_and_counted_exactly(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    @repeat_every(seconds=1, name="always_late")
    async def job() -> None:
        await fake_clock.sleep(1.5)  # every run covers the next tick

    handle = job()
    await fake_clock.advance(150)
    handle.cancel()
    # Runs start at 0, 2, 4, ... and each skips one tick: 75 runs, 75 skips by t = 150.
    assert handle.skipped == 75
    warnings = [r.message for r in caplog.records if "skipped" in r.message]
    # Logged at t = 1.5, then at the first skip a minute later or more (61.5, 121.5), with
    # the ticks skipped in between.
    assert warnings == [
        "always_late: the run took longer than its period; skipped 1 tick(s)",
        "always_late: the run took longer than its period; skipped 1 tick(s)"
        " (30 since the last report a minute ago or more)",
        "always_late: the run took longer than its period; skipped 1 tick(s)"
        " (30 since the last report a minute ago or more)",
    ]


async def test_fixed_delay_drifts_by_the_run_time_like_fastapi_utils(
    fake_clock: FakeClock,
) -> None:
    @repeat_every(seconds=1, fixed_delay=True)
    async def job() -> None:
        await fake_clock.sleep(0.25)

    handle = job()
    await fake_clock.advance(5.5)
    handle.cancel()
    assert fake_clock.history.started(job) == [0.0, 1.25, 2.5, 3.75, 5.0]
    assert handle.skipped == 0


# -- wait_first ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wait_first", "starts"),
    [
        (False, [0.0, 10.0, 20.0, 30.0]),
        (None, [0.0, 10.0, 20.0, 30.0]),
        (True, [10.0, 20.0, 30.0]),  # one period, as documented (fastapi-utils waits 1 s)
        (2.5, [2.5, 12.5, 22.5]),
        (0, [0.0, 10.0, 20.0, 30.0]),
    ],
)
async def test_wait_first_delays_the_first_run(
    fake_clock: FakeClock, wait_first: Any, starts: list[float]
) -> None:
    @repeat_every(seconds=10, wait_first=wait_first)
    async def job() -> None:
        pass

    handle = job()
    await fake_clock.advance(30)
    handle.cancel()
    assert fake_clock.history.started(job) == starts


async def test_wait_first_with_fixed_delay_delays_the_first_run(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10, wait_first=True, fixed_delay=True)
    async def job() -> None:
        await fake_clock.sleep(1)

    handle = job()
    await fake_clock.advance(30)
    handle.cancel()
    assert fake_clock.history.started(job) == [10.0, 21.0]


# -- max_repetitions and on_complete ---------------------------------------------------------------


@pytest.mark.parametrize("hook_is_async", [False, True])
async def test_on_complete_runs_right_after_the_last_repetition(
    fake_clock: FakeClock, hook_is_async: bool
) -> None:
    completed: list[float] = []

    def on_complete() -> None:
        completed.append(fake_clock.now)

    async def on_complete_async() -> None:
        completed.append(fake_clock.now)

    @repeat_every(
        seconds=60,
        max_repetitions=3,
        on_complete=on_complete_async if hook_is_async else on_complete,
    )
    async def job() -> None:
        await fake_clock.sleep(5)

    handle = job()
    await fake_clock.advance(1000)
    assert handle.done
    assert handle.runs == 3
    assert fake_clock.history.started(job) == [0.0, 60.0, 120.0]
    # The same virtual instant as the end of the last run, not one period later.
    assert completed == [125.0]
    assert fake_clock.deadlines == []
    await handle.wait()


async def test_max_repetitions_counts_failed_runs(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1, max_repetitions=2)
    def job() -> None:
        raise Boom

    handle = job()
    await fake_clock.advance(10)
    assert handle.done
    assert (handle.runs, handle.failures) == (2, 2)
    await handle.wait()  # failures without raise_exceptions do not end the loop with an error


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("hook_is_async", [False, True])
async def test_on_exception_is_called_for_each_failure(
    fake_clock: FakeClock, hook_is_async: bool
) -> None:
    seen: list[tuple[float, str]] = []
    count = 0

    def on_exception(exc: BaseException) -> None:
        seen.append((fake_clock.now, str(exc)))

    async def on_exception_async(exc: BaseException) -> None:
        await asyncio.sleep(0)
        seen.append((fake_clock.now, str(exc)))

    @repeat_every(seconds=1, on_exception=on_exception_async if hook_is_async else on_exception)
    def job() -> None:
        nonlocal count
        count += 1
        if count % 2 == 0:
            raise Boom(f"run {count}")

    handle = job()
    await fake_clock.advance(5)
    handle.cancel()
    assert seen == [(1.0, "run 2"), (3.0, "run 4"), (5.0, "run 6")]
    assert handle.failures == 3
    assert str(handle.last_exception) == "run 6"
    assert fake_clock.history.outcomes(job) == ["ok", "failed"] * 3


async def test_on_exception_that_raises_ends_the_loop_and_wait_raises_it(
    fake_clock: FakeClock, loop_errors: list[dict[str, Any]]
) -> None:
    def on_exception(exc: BaseException) -> None:
        raise RuntimeError("alerting is down") from exc

    @repeat_every(seconds=1, on_exception=on_exception)
    def job() -> None:
        raise Boom

    handle = job()
    waiter = asyncio.ensure_future(handle.wait())
    await fake_clock.advance(5)
    assert handle.done
    assert handle.runs == 0  # the loop ended inside run 0, before counting it
    with pytest.raises(RuntimeError, match="alerting is down"):
        await waiter
    assert isinstance(handle.exception, RuntimeError)
    assert loop_errors == []  # somebody awaited it: the loop's handler is not bothered


async def test_raise_exceptions_ends_the_loop_and_wait_raises(fake_clock: FakeClock) -> None:
    count = 0

    @repeat_every(seconds=1, raise_exceptions=True)
    async def job() -> None:
        nonlocal count
        count += 1
        if count == 3:
            raise Boom("third")

    handle = job()
    waiter = asyncio.ensure_future(handle.wait())
    await fake_clock.advance(10)
    with pytest.raises(Boom, match="third"):
        await waiter
    assert fake_clock.history.outcomes(job) == ["ok", "ok", "failed"]
    assert fake_clock.deadlines == []
    # Awaiting again still raises: the ending is kept.
    with pytest.raises(Boom, match="third"):
        await handle.wait()


async def test_raise_exceptions_nobody_awaits_reaches_the_loop_exception_handler(
    fake_clock: FakeClock, loop_errors: list[dict[str, Any]]
) -> None:
    @repeat_every(seconds=1, raise_exceptions=True, name="fragile")
    def job() -> None:
        raise Boom("unseen in fastapi-utils")

    handle = job()
    await fake_clock.advance(3)
    assert handle.done
    del handle
    gc.collect()
    await asyncio.sleep(0)
    # Exactly one report, the one with the exception: no "exception was never retrieved".
    assert len(loop_errors) == 1, loop_errors
    context = loop_errors[0]
    assert isinstance(context["exception"], Boom)
    assert "fragile" in context["message"]


@pytest.mark.parametrize("use_own_logger", [False, True])
async def test_failures_are_always_logged_with_traceback(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture, use_own_logger: bool
) -> None:
    own = logging.getLogger("myapp.jobs")

    @repeat_every(seconds=1, logger=own if use_own_logger else None, name="tokens")
    def job() -> None:
        raise Boom("db down")

    handle = job()
    with caplog.at_level(logging.ERROR):
        await fake_clock.advance(1)
    handle.cancel()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2
    for record in errors:
        assert record.name == ("myapp.jobs" if use_own_logger else "repeat_every")
        assert "tokens" in record.getMessage()
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], Boom)
        assert "raise Boom" in caplog.text  # the traceback reaches the output


async def test_failing_run_does_not_stop_the_loop(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        raise Boom

    handle = job()
    await fake_clock.advance(9)
    handle.cancel()
    assert (handle.runs, handle.failures) == (10, 10)


# -- threads and contexts ------------------------------------------------------------------------


async def test_def_job_runs_in_a_worker_thread_and_does_not_block_the_loop(
    fake_clock: FakeClock,
) -> None:
    gate = threading.Event()
    started = threading.Event()
    threads: list[int] = []

    @repeat_every(seconds=1, max_repetitions=1)
    def blocking_job() -> None:
        threads.append(threading.get_ident())
        started.set()
        assert gate.wait(5), "the event loop never set the gate: it was blocked"

    handle = blocking_job()
    while not started.is_set():  # the loop keeps turning while the job blocks
        await asyncio.sleep(0.001)
    await asyncio.sleep(0)
    assert not handle.done
    gate.set()  # set from the loop: only possible because the loop is free
    await fake_clock.run_due()
    await handle.wait()
    assert threads
    assert threads[0] != threading.get_ident()
    assert handle.failures == 0


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


async def test_contextvars_propagate_to_sync_and_async_jobs(fake_clock: FakeClock) -> None:
    seen: list[str] = []

    @repeat_every(seconds=1, max_repetitions=2)
    def sync_job() -> None:
        seen.append("sync:" + request_id.get())

    @repeat_every(seconds=1, max_repetitions=2)
    async def async_job() -> None:
        seen.append("async:" + request_id.get())

    token = request_id.set("startup")
    try:
        handles = [sync_job(), async_job()]
    finally:
        request_id.reset(token)
    await fake_clock.advance(1)
    for handle in handles:
        await handle.wait()
    assert sorted(seen) == ["async:startup"] * 2 + ["sync:startup"] * 2


# -- the time source ---------------------------------------------------------------------------


class _ManualClock:
    """A hand-driven clock and sleep, to check that a task uses the ones it was given."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_injected_clock_and_sleep_are_used_instead_of_the_default(
    fake_clock: FakeClock,
) -> None:
    manual = _ManualClock()
    starts: list[float] = []

    @repeat_every(seconds=30, max_repetitions=4, clock=manual.monotonic, sleep=manual.sleep)
    async def job() -> None:
        starts.append(manual.now)
        manual.now += 1  # the run takes one second of the injected clock

    handle = job()
    await handle.wait()  # no fake-clock advance: the injected sleep drives this task
    assert starts == [100.0, 130.0, 160.0, 190.0]
    assert manual.slept == [29.0, 29.0, 29.0]
    assert fake_clock.history.of(job) == []  # the fake clock never saw it
    assert fake_clock.now == 0.0


async def test_injected_sleep_alone_is_used_with_the_real_clock(
    fake_clock: FakeClock,
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(seconds)

    starts: list[float] = []

    @repeat_every(seconds=0.02, wait_first=True, max_repetitions=2, sleep=sleep)
    async def job() -> None:
        starts.append(time.monotonic())

    before = time.monotonic()
    handle = job()
    await asyncio.wait_for(handle.wait(), 5)
    assert handle.runs == 2
    assert slept
    assert all(0 < s <= 0.02 for s in slept)
    # The real clock decided when the runs were due: 0.02 s and 0.04 s after the start (on a
    # loaded machine the second sleep is shorter, the fixed rate making up for a late run).
    assert starts[0] - before >= 0.02 - 0.001
    assert starts[1] - before >= 0.04 - 0.001
    assert fake_clock.history.of(job) == []


_module_level_calls: list[float] = []


@repeat_every(seconds=5)
async def _decorated_at_import() -> None:
    _module_level_calls.append(0.0)


async def test_default_time_source_is_read_at_start_not_at_decoration(
    fake_clock: FakeClock,
) -> None:
    handle = _decorated_at_import()  # decorated at import, before the fake clock existed
    await fake_clock.advance(3600)
    handle.cancel()
    assert fake_clock.history.started(_decorated_at_import) == [5.0 * k for k in range(721)]


async def test_on_exception_that_raises_with_nobody_waiting_reaches_the_loop_handler(
    fake_clock: FakeClock, loop_errors: list[dict[str, Any]]
) -> None:
    async def on_exception(exc: BaseException) -> None:
        raise RuntimeError("alerting is down")

    @repeat_every(seconds=1, on_exception=on_exception, name="alerts")
    async def job() -> None:
        raise Boom

    handle = job()
    await fake_clock.advance(2)
    assert handle.done
    assert [type(c["exception"]) for c in loop_errors] == [RuntimeError]
    assert "alerts" in loop_errors[0]["message"]


async def test_on_complete_that_raises_is_logged_and_ends_the_loop_with_it(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def on_complete() -> None:
        raise RuntimeError("cannot report completion")

    @repeat_every(seconds=1, max_repetitions=1, on_complete=on_complete)
    async def job() -> None:
        pass

    handle = job()
    waiter = asyncio.ensure_future(handle.wait())
    await fake_clock.advance(1)
    with pytest.raises(RuntimeError, match="cannot report completion"):
        await waiter
    assert any("on_complete raised" in r.getMessage() for r in caplog.records)


async def test_sync_job_raising_stop_iteration_fails_the_run_instead_of_hanging(
    fake_clock: FakeClock,
) -> None:
    exhausted: Iterator[int] = iter([])

    @repeat_every(seconds=1)
    def job() -> None:
        next(exhausted)  # a Future cannot carry StopIteration: it must not hang the loop

    handle = job()
    await fake_clock.advance(2)
    handle.cancel()
    assert (handle.runs, handle.failures) == (3, 3)
    assert isinstance(handle.last_exception, RuntimeError)
    assert isinstance(handle.last_exception.__cause__, StopIteration)


@pytest.mark.parametrize("hook", ["on_exception", "on_complete"])
async def test_sync_hooks_run_in_a_worker_thread_like_fastapi_utils(
    fake_clock: FakeClock, hook: str
) -> None:
    threads: list[int] = []

    def record(*args: object) -> None:
        threads.append(threading.get_ident())

    @repeat_every(seconds=1, max_repetitions=2, **{hook: record})
    def job() -> None:
        raise Boom

    handle = job()
    await fake_clock.advance(1)
    await handle.wait()
    assert len(threads) == (2 if hook == "on_exception" else 1)
    assert threading.get_ident() not in threads  # a blocking hook never blocks the loop


@pytest.mark.skipif(sys.version_info < (3, 11), reason="needs Task.cancelling() (Python 3.11)")
async def test_job_raising_cancelled_error_is_a_failed_run_not_a_silent_end(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    @repeat_every(seconds=1, name="shared-future")
    async def job() -> None:
        shared = asyncio.get_running_loop().create_future()
        shared.cancel()  # cancelled by someone else
        await shared

    @repeat_every(seconds=1, name="sync-cancelled")
    def sync_job() -> None:
        raise asyncio.CancelledError

    handles = [job(), sync_job()]
    await fake_clock.advance(2)
    for handle in handles:
        assert handle.running
        assert (handle.runs, handle.failures) == (3, 3)
        assert isinstance(handle.last_exception, asyncio.CancelledError)
        handle.cancel()
        await handle.wait()
        assert handle.cancelled  # a real cancel() still ends the loop
    assert {r.name for r in caplog.records if r.levelno == logging.ERROR} == {"repeat_every"}


async def test_failures_outside_the_fake_clock_take_the_same_path(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # With its own clock and sleep the task keeps no run records (no FakeClock behind it);
    # a plain async job's failures must count, log and reach hooks all the same.
    manual = _ManualClock()
    seen: list[BaseException] = []
    calls = itertools.count()

    @repeat_every(
        seconds=10,
        max_repetitions=4,
        clock=manual.monotonic,
        sleep=manual.sleep,
        on_exception=seen.append,
    )
    async def job() -> None:
        n = next(calls)
        if n == 1:
            raise ValueError("second run")
        if n == 2 and sys.version_info >= (3, 11):
            shared = asyncio.get_running_loop().create_future()
            shared.cancel()  # cancelled by someone else: a failed run, not the loop's end
            await shared

    handle = job()
    await handle.wait()
    expected = 2 if sys.version_info >= (3, 11) else 1
    assert (handle.runs, handle.failures, handle.cancelled) == (4, expected, False)
    assert isinstance(seen[0], ValueError)
    assert len(seen) == expected
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == expected
    assert fake_clock.history.of(job) == []
