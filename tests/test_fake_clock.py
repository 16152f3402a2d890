"""FakeClock: exact virtual time, deterministic steps, history, stalls, threads and wall clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import pytest
import time_machine
from fastapi import FastAPI
from fastapi.testclient import TestClient
from freezegun import freeze_time

from repeat_every import RunRecord, lifespan, repeat_every
from repeat_every.testing import FakeClock, RunHistory, RunStalledError, real_time

UTC = dt.timezone.utc


class Boom(Exception):
    """The failure jobs raise in these tests."""


# -- exactness -------------------------------------------------------------------------------------


async def test_thousand_tenth_second_advances_give_exactly_101_runs(
    fake_clock: FakeClock,
) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        pass

    handle = job()
    for _ in range(1000):
        await fake_clock.advance(0.1)
    handle.cancel()
    assert fake_clock.now == 100.0
    assert handle.runs == 101
    assert fake_clock.history.started(job) == [float(k) for k in range(101)]


async def test_a_day_of_one_second_advances_lands_exactly_on_86400(
    fake_clock: FakeClock,
) -> None:
    @repeat_every(seconds=3600)
    async def job() -> None:
        pass

    start = fake_clock.now_datetime
    handle = job()
    for _ in range(86_400):
        await fake_clock.advance(1)
    handle.cancel()
    assert fake_clock.now == 86_400.0
    assert fake_clock.now_datetime == start + dt.timedelta(days=1)
    assert handle.runs == 25


async def test_advance_accepts_a_timedelta(fake_clock: FakeClock) -> None:
    await fake_clock.advance(dt.timedelta(hours=1))
    assert fake_clock.now == 3600.0


@pytest.mark.parametrize("seconds", [-1, -0.001, float("nan"), float("inf")])
async def test_advance_refuses_going_backwards_or_forever(
    fake_clock: FakeClock, seconds: float
) -> None:
    with pytest.raises(ValueError, match=r"time can't go backwards"):
        await fake_clock.advance(seconds)
    assert fake_clock.now == 0.0


def test_advance_blocking_refuses_a_negative_step(fake_clock: FakeClock) -> None:
    with pytest.raises(ValueError, match=r"time can't go backwards"):
        fake_clock.advance_blocking(-5)


# -- order -----------------------------------------------------------------------------------------


async def test_deadlines_run_in_order_and_ties_in_start_order(fake_clock: FakeClock) -> None:
    order: list[tuple[float, str]] = []

    def make(name: str, period: float) -> object:
        @repeat_every(seconds=period, name=name)
        async def job() -> None:
            order.append((fake_clock.now, name))

        return job

    tasks = [make("c", 6), make("a", 2), make("b", 3)]
    handles = [task() for task in tasks]  # type: ignore[operator]
    await fake_clock.advance(6)
    for handle in handles:
        handle.cancel()
    assert order == [
        (0.0, "c"),
        (0.0, "a"),
        (0.0, "b"),
        (2.0, "a"),
        (3.0, "b"),
        (4.0, "a"),
        (6.0, "c"),
        (6.0, "a"),
        (6.0, "b"),
    ]


# -- a task alone jumps to its next tick -----------------------------------------------------------


async def test_a_task_alone_sees_every_instant_and_wall_time_of_a_long_advance() -> None:
    # One task and nothing else: it goes from run to run without a step of advance() between
    # them (FakeClock._jump). Each run still sees its own virtual instant and wall time.
    start = dt.datetime(2030, 1, 1, tzinfo=UTC)
    seen: list[tuple[float, dt.datetime]] = []
    with FakeClock(start=start) as clock:

        @repeat_every(seconds=1)
        async def job() -> None:
            seen.append((clock.now, dt.datetime.now(UTC)))

        handle = job()
        await clock.advance(2000)
        handle.cancel()
    assert [now for now, _ in seen] == [float(k) for k in range(2001)]
    assert [wall for _, wall in seen] == [start + dt.timedelta(seconds=k) for k in range(2001)]
    assert clock.history.total == 2001


async def test_what_a_run_leaves_ready_runs_at_the_run_s_instant(fake_clock: FakeClock) -> None:
    # A callback the run schedules must run before time moves on, as it would in real time.
    loop = asyncio.get_running_loop()
    seen: list[tuple[float, float]] = []

    @repeat_every(seconds=1)
    async def job() -> None:
        at = fake_clock.now
        loop.call_soon(lambda: seen.append((at, fake_clock.now)))

    handle = job()
    await fake_clock.advance(500)
    handle.cancel()
    assert len(seen) == 501
    assert all(run_at == called_at for run_at, called_at in seen)


async def test_the_event_loop_still_polls_while_a_task_runs_tick_after_tick(
    fake_clock: FakeClock,
) -> None:
    # A real-time callback made due during a long advance runs within a few hundred runs: the
    # task jumps at most _MAX_JUMPS times in a row before it really waits once.
    loop = asyncio.get_running_loop()
    runs_when_fired: list[int] = []
    runs = 0

    @repeat_every(seconds=1)
    async def job() -> None:
        nonlocal runs
        runs += 1
        if runs == 10:
            with real_time():
                loop.call_later(0, lambda: runs_when_fired.append(runs))

    handle = job()
    await fake_clock.advance(5000)
    handle.cancel()
    assert runs == 5001
    assert runs_when_fired
    assert runs_when_fired[0] <= 10 + 256 + 1


# -- threads ---------------------------------------------------------------------------------------


async def test_advance_waits_for_sync_runs_in_threads(fake_clock: FakeClock) -> None:
    finished: list[float] = []

    @repeat_every(seconds=10)
    def slow_sync_job() -> None:
        threading.Event().wait(0.02)  # real blocking work in the worker thread
        finished.append(fake_clock.now)

    handle = slow_sync_job()
    await fake_clock.advance(20)
    assert finished == [0.0, 10.0, 20.0]  # every run finished before advance returned
    handle.cancel()


async def test_advance_waits_for_a_task_stopped_while_asleep_to_finish_off_the_clock(
    fake_clock: FakeClock,
) -> None:
    # A job stops another task that sleeps on the clock: that task wakes outside the clock,
    # and its on_complete waits in a thread (time.sleep, virtual inside a task's scope). The
    # next deadline must wait until it has finished.
    events: list[tuple[str, float]] = []

    async def close_exporter() -> None:
        await asyncio.to_thread(time.sleep, 0.02)
        events.append(("exporter closed", fake_clock.now))

    @repeat_every(seconds=100, wait_first=True, on_complete=close_exporter, name="exporter")
    async def exporter() -> None:
        events.append(("exporter", fake_clock.now))

    @repeat_every(seconds=10, name="shutdown-switch")
    async def switch() -> None:
        events.append(("switch", fake_clock.now))
        if fake_clock.now == 10:
            exporter_handle.stop()

    exporter_handle = exporter()
    switch_handle = switch()
    await fake_clock.advance(20)
    assert events == [
        ("switch", 0.0),
        ("switch", 10.0),
        ("exporter closed", 10.02),
        ("switch", 20.0),
    ]
    assert exporter_handle.done
    switch_handle.cancel()


# -- step, run_due, deadlines, now -----------------------------------------------------------------


async def test_step_moves_to_the_next_deadline(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=7, wait_first=2)
    async def job() -> None:
        pass

    assert await fake_clock.step() is None  # nothing pending: time does not move
    assert fake_clock.now == 0.0
    handle = job()
    await fake_clock.run_due()
    assert fake_clock.deadlines == [2.0]
    assert fake_clock.history.of(job) == []
    assert await fake_clock.step() == 2.0
    assert fake_clock.deadlines == [9.0]
    assert await fake_clock.step() == 9.0
    assert fake_clock.history.started(job) == [2.0, 9.0]
    handle.cancel()


async def test_run_due_runs_only_what_is_due_now(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=5)
    async def job() -> None:
        pass

    handle = job()
    await fake_clock.run_due()
    await fake_clock.run_due()
    assert fake_clock.now == 0.0
    assert fake_clock.history.started(job) == [0.0]
    assert fake_clock.deadlines == [5.0]
    handle.cancel()


async def test_deadlines_list_every_pending_sleep_sorted(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=30)
    async def slow() -> None:
        pass

    @repeat_every(seconds=10)
    async def fast() -> None:
        await fake_clock.sleep(4)

    handles = [slow(), fast()]
    await fake_clock.run_due()
    assert fake_clock.deadlines == [4.0, 30.0]
    await fake_clock.advance(4)
    assert fake_clock.deadlines == [10.0, 30.0]
    for handle in handles:
        handle.cancel()


async def test_now_datetime_follows_the_virtual_time() -> None:
    start = dt.datetime(2030, 1, 1, 8, 0, tzinfo=UTC)
    with FakeClock(start=start, travel=False) as clock:
        assert clock.now == 0.0
        assert clock.now_datetime == start
        await clock.advance(90.5)
        assert clock.now_datetime == start + dt.timedelta(seconds=90.5)


def test_installing_a_clock_twice_is_refused() -> None:
    clock = FakeClock()
    with clock, pytest.raises(RuntimeError, match="already installed"):
        clock.install()


@pytest.mark.parametrize("timeout", [0, -1, True])
def test_fake_clock_refuses_a_bad_timeout(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        FakeClock(timeout=timeout)


# -- history ---------------------------------------------------------------------------------------


async def test_history_records_every_attempt_with_its_times_and_outcome() -> None:
    start = dt.datetime(2030, 6, 1, tzinfo=UTC)
    count = 0
    with FakeClock(start=start, travel=False) as clock:

        @repeat_every(seconds=60, name="sync-users")
        async def job() -> None:
            nonlocal count
            count += 1
            await clock.sleep(2)
            if count == 2:
                raise Boom("ldap down")

        @repeat_every(seconds=100, name="other")
        async def other() -> None:
            pass

        handles = [job(), other()]
        await clock.advance(125)
        for handle in handles:
            handle.cancel()

    history = clock.history
    assert isinstance(history, RunHistory)
    records = history.of("sync-users")
    assert [r[:5] for r in records] == [
        ("sync-users", 0, 1, 0.0, 0.0),
        ("sync-users", 1, 1, 60.0, 60.0),
        ("sync-users", 2, 1, 120.0, 120.0),
    ]
    first, second, third = records
    assert isinstance(first, RunRecord)
    assert (first.ended, first.outcome, first.exception, first.ok) == (2.0, "ok", None, True)
    assert second.outcome == "failed"
    assert not second.ok
    assert isinstance(second.exception, Boom)
    assert second.wall_started == start + dt.timedelta(seconds=60)
    assert third.wall == (start + dt.timedelta(seconds=120)).timestamp()

    assert history.of(job) == records == history.of(handles[0])
    assert history.outcomes("sync-users") == ["ok", "failed", "ok"]
    assert history.started("sync-users") == [0.0, 60.0, 120.0]
    assert history.failures("sync-users") == [second]
    assert history.outcomes("other") == ["ok", "ok"]
    assert len(history) == 5 == len(history.of())
    assert history[-1] is history.of()[-1]
    assert [r.task for r in history[:2]] == ["other", "sync-users"]  # in the order they ended
    history.clear()
    assert len(history) == 0


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["plain", "with-timeout"])
async def test_a_run_cancelled_midway_is_recorded_as_cancelled(
    fake_clock: FakeClock, timeout: float | None
) -> None:
    @repeat_every(seconds=60, timeout=timeout, name="slow-export")
    async def job() -> None:
        await fake_clock.sleep(10)

    handle = job()
    await fake_clock.advance(61)  # run 0 ended at 10; run 1 began at 60 and is midway
    handle.cancel()
    await handle.wait()
    assert handle.cancelled
    records = fake_clock.history.of(job)
    assert [(r.index, r.outcome, r.started, r.ended) for r in records] == [
        (0, "ok", 0.0, 10.0),
        (1, "cancelled", 60.0, 61.0),
    ]
    assert isinstance(records[1].exception, asyncio.CancelledError)
    assert (handle.runs, handle.failures) == (1, 0)  # a cancelled run is neither


# -- stalls ----------------------------------------------------------------------------------------


async def test_a_run_that_never_finishes_raises_run_stalled_error_naming_it() -> None:
    never = asyncio.Event()
    with FakeClock(timeout=0.1) as clock:

        @repeat_every(seconds=10, name="stuck-job")
        async def job() -> None:
            if clock.now >= 20:
                await never.wait()  # waits on something that is not the fake clock

        handle = job()
        with pytest.raises(RunStalledError, match=r"at virtual instant 20 s.*stuck-job"):
            await clock.advance(60)
        assert clock.now == 20.0
        assert fake_runs(clock, "stuck-job") == [0.0, 10.0]
        handle.cancel()
        await handle.wait()


def fake_runs(clock: FakeClock, name: str) -> list[float]:
    return clock.history.started(name)


async def test_waiting_for_a_stopping_loop_under_a_standing_clock_raises() -> None:
    with FakeClock(timeout=0.1) as clock:

        @repeat_every(seconds=10, name="mid-run")
        async def job() -> None:
            await clock.sleep(5)

        handle = job()
        await clock.run_due()
        handle.stop()  # the run in progress needs virtual time to finish
        with pytest.raises(RunStalledError, match=r"mid-run.*advance the clock"):
            await handle.wait()
        await clock.advance(5)
        await handle.wait()
        assert handle.runs == 1


# -- sync tests and other threads ------------------------------------------------------------------


def test_advance_blocking_drives_an_app_running_in_testclients_thread(
    fake_clock: FakeClock,
) -> None:
    threads: set[int] = set()

    @repeat_every(seconds=60)
    async def job() -> None:
        threads.add(threading.get_ident())
        await fake_clock.sleep(10)

    with TestClient(FastAPI(lifespan=lifespan(job))):
        fake_clock.advance_blocking(125)
        assert fake_clock.history.started(job) == [0.0, 60.0]  # the one at 120 is mid-run
        assert fake_clock.step_blocking() == 130.0
        assert fake_clock.history.started(job) == [0.0, 60.0, 120.0]
        fake_clock.run_due_blocking()
    assert threads
    assert threading.get_ident() not in threads


@pytest.mark.parametrize("method", ["advance_blocking", "step_blocking", "run_due_blocking"])
async def test_blocking_methods_inside_a_running_loop_are_refused(
    fake_clock: FakeClock, method: str
) -> None:
    args = (1,) if method == "advance_blocking" else ()
    with pytest.raises(RuntimeError, match=r"would block the event loop.*await clock\."):
        getattr(fake_clock, method)(*args)


def test_fixture_in_a_sync_test_with_asyncio_run(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=15, max_repetitions=3)
    def job() -> None:
        pass

    async def main() -> None:
        handle = job()
        await fake_clock.advance(60)
        await handle.wait()

    asyncio.run(main())
    assert fake_clock.history.started(job) == [0.0, 15.0, 30.0]


# -- the wall clock --------------------------------------------------------------------------------


async def _wall_clock_seen_by_runs(clock: FakeClock) -> list[dt.datetime]:
    """What ``datetime.now()`` said in each run, in a worker thread and on the event loop."""
    in_thread: list[dt.datetime] = []
    on_loop: list[dt.datetime] = []

    @repeat_every(seconds=60)
    def job() -> None:
        in_thread.append(dt.datetime.now(UTC))

    @repeat_every(seconds=60)
    async def async_job() -> None:
        on_loop.append(dt.datetime.now(UTC))

    handles = [job(), async_job()]
    await clock.advance(120)
    for handle in handles:
        handle.cancel()
    assert in_thread == on_loop
    return in_thread


async def test_freezegun_default_freeze_time_follows_the_clock() -> None:
    start = dt.datetime(2030, 1, 1, tzinfo=UTC)
    # Default settings: time.monotonic is frozen too.
    with freeze_time(start), FakeClock() as clock:
        seen = await _wall_clock_seen_by_runs(clock)
    assert seen == [start + dt.timedelta(minutes=k) for k in range(3)]


async def test_time_machine_travel_follows_the_clock() -> None:
    start = dt.datetime(2031, 3, 1, 12, tzinfo=UTC)
    with time_machine.travel(start, tick=False), FakeClock() as clock:
        seen = await _wall_clock_seen_by_runs(clock)
    assert seen == [start + dt.timedelta(minutes=k) for k in range(3)]


async def test_start_travels_by_itself_and_ends_the_travel_on_exit() -> None:
    start = dt.datetime(2032, 2, 29, 23, 59, tzinfo=UTC)
    with FakeClock(start=start) as clock:
        assert dt.datetime.now(UTC) == start
        seen = await _wall_clock_seen_by_runs(clock)
        assert dt.datetime.now(UTC) == start + dt.timedelta(minutes=2)
    assert seen == [start + dt.timedelta(minutes=k) for k in range(3)]
    assert dt.datetime.now(UTC).year < 2032


async def test_naive_start_is_taken_as_utc() -> None:
    with FakeClock(start=dt.datetime(2030, 1, 1), travel=False) as clock:
        assert clock.now_datetime == dt.datetime(2030, 1, 1, tzinfo=UTC)


def test_start_must_be_a_datetime() -> None:
    with pytest.raises(TypeError, match="start must be a datetime"):
        FakeClock(start="2030-01-01")  # type: ignore[arg-type]


# -- the fixture -----------------------------------------------------------------------------------


async def test_fixture_is_installed_for_async_tests(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        pass

    handle = job()
    await fake_clock.advance(2)
    handle.cancel()
    assert fake_clock.history.started(job) == [0.0, 1.0, 2.0]


async def test_tasks_started_outside_the_clock_do_not_use_it() -> None:
    @repeat_every(seconds=3600)
    async def job() -> None:
        pass

    handle = job()  # no clock installed: real time
    with FakeClock() as clock:
        await clock.advance(7200)
        await asyncio.sleep(0)
        assert handle.runs == 1
        assert clock.history.of(job) == []
    handle.cancel()
    await handle.wait()
