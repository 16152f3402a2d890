"""Failure policies and timing options: retry, timeout, jitter, alignment to the wall clock.

What a failure, a retry, a timeout and a skipped tick look like (log lines, handle state) is
pinned here, because docs/failures.md shows the same lines to users.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import pytest

from repeat_every import Retry, RunTimeoutError, repeat_every
from repeat_every.testing import FakeClock

UTC = dt.timezone.utc

# FakeClock counts a task inside timebase.waiting() as quiet even after the child it waits on
# has finished (asyncio has not resumed the task yet), so advance() moves on and returns before
# a run with a timeout has recorded its end. Strict: remove once the FakeClock fix (report of
# issue 4: a waiting task is busy as soon as one of its tracked children is done) has landed.


class Boom(Exception):
    """The failure jobs raise in these tests."""


def flaky(failures: int) -> tuple[list[int], Callable[[], Awaitable[None]]]:
    """A job that raises Boom on its first ``failures`` calls, then returns."""
    calls: list[int] = []

    async def job() -> None:
        calls.append(len(calls))
        if len(calls) <= failures:
            raise Boom(f"call {len(calls)}")

    return calls, job


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# -- Retry: the policy object ------------------------------------------------------------------


def test_retry_delays_grow_exponentially_up_to_the_cap() -> None:
    assert Retry(attempts=6, backoff=1, multiplier=3, max_backoff=20).delays() == [
        1.0,
        3.0,
        9.0,
        20.0,
        20.0,
    ]
    assert Retry(attempts=1).delays() == []


def test_retry_jitter_adds_a_bounded_seeded_extra_wait() -> None:
    import random

    policy = Retry(attempts=4, backoff=2, jitter=0.5)
    first = [policy.delay(n, random.Random(3)) for n in (1, 2, 3)]
    again = [policy.delay(n, random.Random(3)) for n in (1, 2, 3)]
    assert first == again
    for delay, base in zip(first, policy.delays(), strict=True):
        assert base <= delay < base + 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"attempts": 0}, ValueError, r"Retry\(attempts=\.\.\.\) must be an int ≥ 1"),
        ({"attempts": True}, ValueError, r"Retry\(attempts=\.\.\.\) must be an int ≥ 1"),
        ({"backoff": -1}, ValueError, r"Retry\(backoff=\.\.\.\) must be finite and ≥ 0"),
        ({"multiplier": 0.5}, ValueError, r"Retry\(multiplier=\.\.\.\) must be a number ≥ 1"),
        ({"jitter": float("inf")}, ValueError, r"Retry\(jitter=\.\.\.\) must be finite"),
        ({"on": "Exception"}, TypeError, r"Retry\(on=\.\.\.\) must be an exception class"),
        ({"on": ()}, TypeError, r"Retry\(on=\.\.\.\) must be an exception class"),
    ],
)
def test_retry_refuses_bad_arguments_naming_them(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_retry_on_accepts_one_exception_class() -> None:
    assert Retry(on=KeyError).on == (KeyError,)


# -- retries in the loop --------------------------------------------------------------------


async def test_a_job_failing_twice_then_succeeding_shows_three_attempts_in_history(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    _, job = flaky(2)
    task = repeat_every(seconds=60, retry=Retry(attempts=3, backoff=1, multiplier=2), name="sync")(
        job
    )
    handle = task()
    await fake_clock.advance(10)
    handle.cancel()
    records = fake_clock.history.of("sync")
    # Attempt 1 at 0 fails; 1 s later attempt 2 fails; 2 s later attempt 3 succeeds.
    assert [(r.index, r.attempt, r.scheduled, r.started, r.outcome) for r in records] == [
        (0, 1, 0.0, 0.0, "failed"),
        (0, 2, 0.0, 1.0, "failed"),
        (0, 3, 0.0, 3.0, "ok"),
    ]
    assert [str(r.exception) for r in records] == ["call 1", "call 2", "None"]
    assert (handle.runs, handle.failures, handle.retries) == (1, 0, 2)
    assert handle.last_exception is None
    assert messages(caplog, logging.WARNING) == [
        "sync: attempt 1 failed (Boom('call 1')); retrying in 1 s",
        "sync: attempt 2 failed (Boom('call 2')); retrying in 2 s",
    ]
    assert messages(caplog, logging.ERROR) == []


async def test_a_run_that_exhausts_its_attempts_fails_once_with_the_last_error(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    _, job = flaky(99)
    seen: list[BaseException] = []
    task = repeat_every(
        seconds=60, retry=Retry(attempts=3, backoff=1), on_exception=seen.append, name="sync"
    )(job)
    handle = task()
    await fake_clock.advance(10)
    handle.cancel()
    assert fake_clock.history.outcomes("sync") == ["failed"] * 3
    assert (handle.runs, handle.failures, handle.retries) == (1, 1, 2)
    assert str(handle.last_exception) == "call 3"
    assert [str(e) for e in seen] == ["call 3"]  # on_exception once per failed run
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "sync: run 0 failed: Boom('call 3')"
    assert error.exc_info is not None
    assert error.exc_info[1] is handle.last_exception


async def test_a_retry_never_runs_past_the_next_regular_tick(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    _, job = flaky(99)
    task = repeat_every(seconds=10, retry=Retry(attempts=5, backoff=4, multiplier=2), name="t")(job)
    handle = task()
    await fake_clock.advance(15)
    handle.cancel()
    # Run 0: attempts at 0 and 4; the next wait (8 s) would end at 12, after the tick at 10.
    # Run 1 starts on its tick, at 10, and retries at 14.
    assert [(r.index, r.attempt, r.started) for r in fake_clock.history.of("t")] == [
        (0, 1, 0.0),
        (0, 2, 4.0),
        (1, 1, 10.0),
        (1, 2, 14.0),
    ]
    assert (
        messages(caplog, logging.WARNING).count(
            "t: no retry of attempt 2: the next tick comes first"
        )
        == 2
    )
    assert (handle.runs, handle.failures, handle.retries) == (2, 2, 2)


async def test_with_fixed_delay_a_retry_stops_before_the_next_tick_and_the_delay_follows_it(
    fake_clock: FakeClock,
) -> None:
    _, job = flaky(99)
    task = repeat_every(
        seconds=10, fixed_delay=True, retry=Retry(attempts=5, backoff=4, multiplier=2), name="t"
    )(job)
    handle = task()
    await fake_clock.advance(20)
    handle.cancel()
    # Run 0: attempts at 0 and 4 (the wait of 8 s would end past 0 + 10); the run ends at 4,
    # so run 1 is due a full period later, at 14, and retries at 18.
    assert [(r.index, r.attempt, r.started) for r in fake_clock.history.of("t")] == [
        (0, 1, 0.0),
        (0, 2, 4.0),
        (1, 1, 14.0),
        (1, 2, 18.0),
    ]
    assert (handle.runs, handle.failures, handle.retries) == (2, 2, 2)


async def test_a_retry_due_exactly_on_the_next_tick_is_not_made(fake_clock: FakeClock) -> None:
    _, job = flaky(99)
    task = repeat_every(seconds=10, retry=Retry(attempts=3, backoff=10), name="t")(job)
    handle = task()
    await fake_clock.advance(10)
    handle.cancel()
    assert [(r.index, r.attempt, r.started) for r in fake_clock.history.of("t")] == [
        (0, 1, 0.0),
        (1, 1, 10.0),
    ]


async def test_only_the_exceptions_named_in_on_are_retried(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=60, retry=Retry(attempts=3, on=(ConnectionError,)), name="t")
    async def job() -> None:
        raise KeyError("not transient")

    handle = job()
    await fake_clock.advance(10)
    handle.cancel()
    assert fake_clock.history.outcomes("t") == ["failed"]
    assert (handle.failures, handle.retries) == (1, 0)


async def test_retry_waits_are_capped_and_seeded_jitter_makes_them_reproducible() -> None:
    results: list[list[float]] = []
    for _ in range(2):
        with FakeClock() as clock:
            _, job = flaky(99)
            policy = Retry(attempts=5, backoff=1, multiplier=10, max_backoff=5, jitter=0.5)
            handle = repeat_every(seconds=100, retry=policy, seed=42, name="t")(job)()
            await clock.advance(50)
            await handle.aclose()
        results.append(clock.history.started("t"))
    assert results[0] == results[1]
    waits = [b - a for a, b in itertools.pairwise(results[0])]
    for wait, base in zip(waits, [1.0, 5.0, 5.0, 5.0], strict=True):
        assert base <= wait < base + 0.5


async def test_stop_during_a_retry_wait_ends_the_loop_with_the_run_failed(
    fake_clock: FakeClock,
) -> None:
    completed: list[float] = []
    _, job = flaky(99)
    task = repeat_every(
        seconds=60,
        retry=Retry(attempts=3, backoff=5),
        on_complete=lambda: completed.append(fake_clock.now),
        name="t",
    )(job)
    handle = task()
    await fake_clock.advance(1)  # attempt 1 failed at 0; the retry waits until 5
    handle.stop()
    await handle.wait()
    assert fake_clock.history.outcomes("t") == ["failed"]
    assert (handle.runs, handle.failures) == (1, 1)
    assert completed == [1.0]


# -- timeouts ---------------------------------------------------------------------------------


async def test_an_async_run_past_its_timeout_is_cancelled_and_reported(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cancelled_at: list[float] = []

    @repeat_every(seconds=60, timeout=5, name="slow")
    async def slow() -> None:
        try:
            await fake_clock.sleep(10)
        except asyncio.CancelledError:
            cancelled_at.append(fake_clock.now)
            raise

    handle = slow()
    await fake_clock.advance(30)
    (record,) = fake_clock.history.of("slow")
    assert (record.started, record.ended, record.outcome) == (0.0, 5.0, "timeout")
    assert cancelled_at == [5.0]
    assert isinstance(record.exception, RunTimeoutError)
    assert isinstance(handle.last_exception, RunTimeoutError)
    assert str(handle.last_exception) == "slow: run exceeded its timeout of 5 s"
    assert (handle.runs, handle.failures) == (1, 1)
    assert fake_clock.deadlines == [60.0]  # nothing of the cancelled run is left waiting
    assert messages(caplog, logging.ERROR) == [
        "slow: run 0 failed: RunTimeoutError('slow: run exceeded its timeout of 5 s')"
    ]
    await fake_clock.advance(36)  # the next run starts on its tick and times out alike
    handle.cancel()
    assert fake_clock.history.started("slow") == [0.0, 60.0]


async def test_a_run_that_finishes_within_its_timeout_is_ok(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=60, timeout=5, name="quick")
    async def quick() -> None:
        await fake_clock.sleep(4.999)

    handle = quick()
    await fake_clock.advance(10)
    handle.cancel()
    assert fake_clock.history.outcomes("quick") == ["ok"]
    assert handle.failures == 0


async def test_a_timed_out_attempt_is_retried_like_any_failure(fake_clock: FakeClock) -> None:
    durations = iter([10.0, 1.0])

    @repeat_every(seconds=60, timeout=5, retry=Retry(attempts=2, backoff=1), name="t")
    async def job() -> None:
        await fake_clock.sleep(next(durations))

    handle = job()
    await fake_clock.advance(30)
    handle.cancel()
    assert [(r.attempt, r.started, r.ended, r.outcome) for r in fake_clock.history.of("t")] == [
        (1, 0.0, 5.0, "timeout"),
        (2, 6.0, 7.0, "ok"),
    ]
    assert (handle.failures, handle.retries) == (0, 1)


async def test_a_sync_run_past_its_timeout_is_reported_and_the_next_run_waits_for_its_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Real time: a def job blocks a worker thread, which virtual time cannot move past.
    release = threading.Event()
    spans: list[tuple[float, float]] = []

    @repeat_every(seconds=0.01, timeout=0.01, max_repetitions=2, name="blocking")
    def blocking() -> None:
        start = time.monotonic()
        release.wait(5)
        spans.append((start, time.monotonic()))
        if len(spans) == 1:
            raise Boom("after its deadline")

    handle = blocking()
    reported = "blocking: run exceeded its timeout of 0.01 s; a def job cannot be interrupted, "
    reported += "so the next run waits until its thread returns"
    give_up = time.monotonic() + 5
    while reported not in messages(caplog, logging.ERROR) and time.monotonic() < give_up:
        await asyncio.sleep(0.002)
    assert reported in messages(caplog, logging.ERROR)
    assert spans == []  # the thread still runs, and no second run has started beside it
    assert handle.runs == 0
    release.set()
    await handle.wait()
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0]  # no overlap
    assert handle.runs == 2
    assert isinstance(handle.last_exception, RunTimeoutError)
    errors = messages(caplog, logging.ERROR)
    # Run 1 returns at once, but on a loaded machine its thread hop alone may take 10 ms and
    # time it out too: only run 0's lines are pinned.
    assert errors[1:3] == [
        "blocking: the timed-out run later raised",
        "blocking: run 0 failed: RunTimeoutError('blocking: run exceeded its timeout of 0.01 s')",
    ]
    assert handle.failures == 1 + any(e.startswith("blocking: run 1 failed") for e in errors)


# -- jitter -------------------------------------------------------------------------------------


async def _jittered_starts(seed: int | None) -> list[tuple[float, float]]:
    with FakeClock() as clock:

        @repeat_every(seconds=10, jitter=3, seed=seed, name="j")
        async def job() -> None:
            pass

        handle = job()
        await clock.advance(200)
        await handle.aclose()
    return [(r.scheduled, r.started) for r in clock.history.of("j")]


async def test_jitter_delays_each_run_within_bounds_and_keeps_the_grid() -> None:
    runs = await _jittered_starts(seed=1)
    assert [scheduled for scheduled, _ in runs] == [10.0 * k for k in range(20)]
    offsets = [started - scheduled for scheduled, started in runs]
    assert all(0 <= offset < 3 for offset in offsets)
    assert len(set(offsets)) == len(offsets)  # a fresh draw for every run


async def test_jitter_with_a_seed_is_reproducible_and_seeds_differ() -> None:
    assert await _jittered_starts(seed=1) == await _jittered_starts(seed=1)
    assert await _jittered_starts(seed=1) != await _jittered_starts(seed=2)


# -- alignment to the wall clock ------------------------------------------------------------


async def test_align_runs_on_the_minute_of_the_virtual_wall_clock() -> None:
    seen_now: list[dt.datetime] = []

    @repeat_every(seconds=60, align=True, name="minutely")
    async def minutely() -> None:
        seen_now.append(dt.datetime.now(UTC))

    with FakeClock(start=dt.datetime(2026, 1, 5, 12, 0, 17, 250_000, tzinfo=UTC)) as clock:
        handle = minutely()
        await clock.advance(200)
        handle.cancel()
    records = clock.history.of("minutely")
    assert [dt.datetime.fromtimestamp(r.wall, UTC).strftime("%H:%M:%S.%f") for r in records] == [
        "12:01:00.000000",
        "12:02:00.000000",
        "12:03:00.000000",
    ]
    assert [r.started for r in records] == [42.75, 102.75, 162.75]
    assert [t.strftime("%H:%M:%S") for t in seen_now] == ["12:01:00", "12:02:00", "12:03:00"]


async def test_align_with_jitter_spreads_runs_after_each_aligned_instant() -> None:
    @repeat_every(seconds=3600, align=True, jitter=60, seed=5, name="hourly")
    async def hourly() -> None:
        pass

    with FakeClock(start=dt.datetime(2026, 1, 5, 12, 30, tzinfo=UTC)) as clock:
        handle = hourly()
        await clock.advance(3 * 3600)
        handle.cancel()
    for record in clock.history.of("hourly"):
        started = dt.datetime.fromtimestamp(record.wall, UTC)
        assert started.minute == 0
        assert 0 <= started.second + started.microsecond / 1e6 < 60
    assert len(clock.history.of("hourly")) == 3


# -- skipped ticks ---------------------------------------------------------------------------


async def test_a_skipped_tick_is_counted_logged_and_visible_in_state(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    @repeat_every(seconds=10, name="report")
    async def report() -> None:
        if fake_clock.now == 0:
            await fake_clock.sleep(25)

    handle = report()
    await fake_clock.advance(35)
    handle.cancel()
    assert fake_clock.history.started("report") == [0.0, 30.0]
    assert handle.skipped == 2
    assert handle.state.skipped == 2
    assert messages(caplog, logging.WARNING) == [
        "report: the run took longer than its period; skipped 2 tick(s)"
    ]
