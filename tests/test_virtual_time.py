"""Time inside runs under a FakeClock: the job's own sleeps, timeouts, timers, threads, retries."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest
import tenacity
import time_machine
from fastapi import FastAPI
from fastapi.testclient import TestClient
from freezegun import freeze_time

from repeat_every import lifespan, repeat_every
from repeat_every.testing import FakeClock, RunStalledError

UTC = dt.timezone.utc


class Upstream(Exception):
    """What a flaky upstream raises in these tests."""


# -- the job's own asyncio waits ------------------------------------------------------------------


async def test_an_hour_of_a_job_that_sleeps_three_times_inside(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def poll() -> None:
        for _ in range(3):
            await asyncio.sleep(0.1)

    handle = poll()
    await fake_clock.advance(3600)
    assert handle.runs == 3600  # the run started at 3600 s still sleeps: left mid-run
    await fake_clock.advance(0.3)  # ...and the next advance finishes it
    handle.cancel()
    records = fake_clock.history.of(poll)
    assert handle.runs == len(records) == 3601
    assert [r.started for r in records] == [float(k) for k in range(3601)]
    assert all(round(r.ended - r.started, 9) == 0.3 for r in records)
    assert records[-1].ended == 3600.3


async def test_a_run_left_mid_run_is_continued_and_covered_ticks_are_skipped(
    fake_clock: FakeClock,
) -> None:
    ends: list[float] = []

    @repeat_every(seconds=10)
    async def slow() -> None:
        await asyncio.sleep(25)
        ends.append(fake_clock.now)

    handle = slow()
    await fake_clock.advance(10)
    assert (handle.runs, ends) == (0, [])  # mid-run, waiting on its own sleep
    await fake_clock.advance(20)
    assert ends == [25.0]
    assert handle.runs == 1
    assert handle.skipped == 2  # ticks 10 and 20 were covered by the run, as in real time
    await fake_clock.advance(30)
    assert ends == [25.0, 55.0]  # the next run started on the grid at 30
    handle.cancel()


async def test_wait_for_times_out_in_virtual_time(fake_clock: FakeClock) -> None:
    outcomes: list[tuple[str, float]] = []
    never = asyncio.Event()

    @repeat_every(seconds=60)
    async def guarded() -> None:
        try:
            await asyncio.wait_for(never.wait(), timeout=10)
        except asyncio.TimeoutError:
            outcomes.append(("timeout", fake_clock.now))

    handle = guarded()
    await fake_clock.advance(9.999)
    assert outcomes == []
    await fake_clock.advance(0.001)
    assert outcomes == [("timeout", 10.0)]
    await fake_clock.advance(60)
    assert outcomes == [("timeout", 10.0), ("timeout", 70.0)]
    handle.cancel()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
async def test_asyncio_timeout_and_timeout_at_take_virtual_time(fake_clock: FakeClock) -> None:
    seen: list[tuple[str, float]] = []

    @repeat_every(seconds=100)
    async def job() -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(5):
                await asyncio.sleep(60)
        except TimeoutError:
            seen.append(("timeout", loop.time()))
        try:
            async with asyncio.timeout_at(loop.time() + 2):
                await asyncio.sleep(1)  # finishes first: the timer is cancelled
            seen.append(("in time", loop.time()))
        except TimeoutError:  # pragma: no cover - the failure this test exists to catch
            seen.append(("late", loop.time()))

    handle = job()
    await fake_clock.advance(10)
    assert seen == [("timeout", 5.0), ("in time", 6.0)]
    assert fake_clock.deadlines == [100.0]  # the cancelled timeout left nothing behind
    handle.cancel()


async def test_loop_timers_and_loop_time_inside_a_run_are_virtual(fake_clock: FakeClock) -> None:
    fired: list[tuple[str, float]] = []

    @repeat_every(seconds=50)
    async def job() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.call_later(3, lambda: fired.append(("later", loop.time())))
        loop.call_at(loop.time() + 4, done.set_result, None)
        await done
        fired.append(("done", loop.time()))

    handle = job()
    await fake_clock.advance(5)
    assert fired == [("later", 3.0), ("done", 4.0)]
    handle.cancel()


async def test_child_tasks_a_run_spawns_take_virtual_time(fake_clock: FakeClock) -> None:
    log: list[tuple[str, float]] = []

    async def child(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        log.append((name, fake_clock.now))

    @repeat_every(seconds=100)
    async def fan_out() -> None:
        await asyncio.gather(child("a", 2), child("b", 1))
        log.append(("gathered", fake_clock.now))
        # A background task the run does not wait for keeps virtual time too.
        asyncio.get_running_loop().create_task(child("background", 30))

    handle = fan_out()
    await fake_clock.advance(10)
    assert log == [("b", 1.0), ("a", 2.0), ("gathered", 2.0)]
    await fake_clock.advance(30)
    assert log[-1] == ("background", 32.0)
    handle.cancel()


async def test_the_tests_own_sleep_stays_real(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        await asyncio.sleep(0.5)

    handle = job()
    loop = asyncio.get_running_loop()
    real_before, loop_before = time.monotonic(), loop.time()
    await asyncio.sleep(0.01)  # the test's own code: real time
    assert time.monotonic() - real_before >= 0.009
    assert loop.time() - loop_before >= 0.009
    assert fake_clock.now == 0.0
    handle.cancel()


async def test_anyio_sleep_and_fail_after_inside_a_run(fake_clock: FakeClock) -> None:
    seen: list[tuple[str, float]] = []

    @repeat_every(seconds=100)
    async def job() -> None:
        await anyio.sleep(2)
        seen.append(("slept", anyio.current_time()))
        with anyio.move_on_after(3):
            await anyio.sleep(50)
        seen.append(("moved on", anyio.current_time()))

    handle = job()
    await fake_clock.advance(10)
    assert seen == [("slept", 2.0), ("moved on", 5.0)]
    handle.cancel()


async def test_a_tenacity_retry_fails_twice_then_succeeds_in_virtual_time(
    fake_clock: FakeClock,
) -> None:
    calls: list[float] = []

    async def fetch() -> str:
        calls.append(fake_clock.now)
        if len(calls) < 3:
            raise Upstream("503")
        return "ok"

    @repeat_every(seconds=3600)
    async def sync_upstream() -> None:
        async for attempt in tenacity.AsyncRetrying(
            wait=tenacity.wait_fixed(20), stop=tenacity.stop_after_attempt(3)
        ):
            with attempt:
                await fetch()

    handle = sync_upstream()
    await fake_clock.advance(60)
    assert calls == [0.0, 20.0, 40.0]
    assert fake_clock.history.outcomes(sync_upstream) == ["ok"]
    handle.cancel()


# -- def jobs: time.sleep in the worker thread -----------------------------------------------------


async def test_time_sleep_in_a_def_job_is_virtual(fake_clock: FakeClock) -> None:
    ends: list[float] = []

    @repeat_every(seconds=60)
    def export() -> None:
        time.sleep(5)
        time.sleep(5)
        ends.append(fake_clock.now)

    handle = export()
    await fake_clock.advance(9)
    assert ends == []
    await fake_clock.advance(1)
    assert ends == [10.0]
    records = fake_clock.history.of(export)
    assert (records[0].started, records[0].ended) == (0.0, 10.0)
    handle.cancel()
    await fake_clock.advance(60)  # the cancelled loop starts no run; the clock stays usable


async def test_to_thread_sleep_in_an_async_run_is_virtual(fake_clock: FakeClock) -> None:
    ends: list[float] = []

    @repeat_every(seconds=60)
    async def job() -> None:
        await asyncio.to_thread(time.sleep, 7)
        ends.append(fake_clock.now)

    handle = job()
    await fake_clock.advance(7)
    assert ends == [7.0]
    handle.cancel()


async def test_time_sleep_outside_runs_stays_real(fake_clock: FakeClock) -> None:
    started = time.monotonic()
    await asyncio.to_thread(time.sleep, 0.01)  # the test's thread: no task scope
    assert time.monotonic() - started >= 0.009
    assert fake_clock.now == 0.0


def test_testclient_app_whose_job_sleeps_inside(fake_clock: FakeClock) -> None:
    done: list[float] = []

    @repeat_every(seconds=10)
    async def refresh() -> None:
        await asyncio.sleep(4)
        done.append(fake_clock.now)

    app = FastAPI(lifespan=lifespan(refresh))
    with TestClient(app):
        fake_clock.advance_blocking(3)
        assert done == []
        fake_clock.advance_blocking(1)
        assert done == [4.0]
        fake_clock.advance_blocking(10)
        assert done == [4.0, 14.0]


# -- what cannot progress ------------------------------------------------------------------------


async def test_a_run_waiting_on_an_event_nobody_sets_is_reported_with_its_wait() -> None:
    never = asyncio.Event()

    @repeat_every(seconds=1, name="waits-forever")
    async def job() -> None:
        await never.wait()

    with FakeClock(timeout=0.2) as clock:
        job()
        with pytest.raises(RunStalledError) as stalled:
            await clock.advance(1)
    message = str(stalled.value)
    assert "waits-forever" in message
    assert "Event.wait" in message
    assert "no virtual timer pending" in message
    job.handle.cancel()  # type: ignore[union-attr]


async def test_a_run_doing_real_blocking_work_in_a_thread_is_reported() -> None:
    release = threading.Event()

    @repeat_every(seconds=1, name="blocked-thread")
    def job() -> None:
        release.wait(10)

    with FakeClock(timeout=0.2) as clock:
        job()
        try:
            with pytest.raises(RunStalledError, match="worker thread"):
                await clock.advance(0)
        finally:
            release.set()
            job.handle.cancel()  # type: ignore[union-attr]


async def test_two_concurrent_advances_are_refused(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    def slow() -> None:
        threading.Event().wait(0.05)  # real work: the first advance is still settling

    handle = slow()
    first = asyncio.ensure_future(fake_clock.advance(5))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="another advance is in progress"):
        await fake_clock.advance(1)
    await first
    assert fake_clock.now == 5.0
    handle.cancel()


def test_advancing_from_two_threads_is_refused(fake_clock: FakeClock) -> None:
    release = threading.Event()
    errors: list[BaseException] = []

    @repeat_every(seconds=1)
    def slow() -> None:
        release.wait(5)

    async def main() -> None:
        handle = slow()
        await asyncio.sleep(0)

        def second() -> None:
            try:
                fake_clock.advance_blocking(1)
            except RuntimeError as exc:
                errors.append(exc)
            finally:
                release.set()

        thread = threading.Thread(target=second)
        advancing = asyncio.ensure_future(fake_clock.advance(1))
        await asyncio.sleep(0)
        thread.start()
        await advancing
        thread.join()
        handle.cancel()

    asyncio.run(main())
    assert len(errors) == 1
    assert "another advance is in progress" in str(errors[0])


async def test_a_pending_timer_of_a_run_becomes_real_when_the_clock_is_removed() -> None:
    fired = asyncio.Event()

    @repeat_every(seconds=100)
    async def job() -> None:
        await asyncio.sleep(0.02)
        fired.set()

    with FakeClock() as clock:
        handle = job()
        await clock.advance(0.01)  # 0.01 s of virtual time left on the run's sleep
    await asyncio.wait_for(fired.wait(), 5)  # fires in real time once the clock is gone
    handle.cancel()


# -- wall clock: travels started after the clock ---------------------------------------------------


async def test_a_time_machine_travel_started_in_the_test_body_is_adopted(
    fake_clock: FakeClock,
) -> None:
    seen: list[dt.datetime] = []

    @repeat_every(seconds=3600)
    async def job() -> None:
        seen.append(dt.datetime.now(UTC))

    with time_machine.travel(dt.datetime(2030, 5, 1, 8, tzinfo=UTC), tick=False):
        handle = job()
        await fake_clock.advance(2 * 3600)
        handle.cancel()
    assert seen == [dt.datetime(2030, 5, 1, h, tzinfo=UTC) for h in (8, 9, 10)]


async def test_a_freezegun_freeze_started_in_the_test_body_is_adopted(
    fake_clock: FakeClock,
) -> None:
    seen: list[dt.datetime] = []

    @repeat_every(seconds=60)
    async def job() -> None:
        seen.append(dt.datetime.now(UTC))

    with freeze_time("2031-01-01 00:00:00", real_asyncio=True):
        handle = job()
        await fake_clock.advance(120)
        handle.cancel()
    assert seen == [dt.datetime(2031, 1, 1, 0, m, tzinfo=UTC) for m in (0, 1, 2)]


@pytest.mark.parametrize("clock_first", [True, False])
async def test_the_time_machine_fixture_in_either_order(
    request: pytest.FixtureRequest, clock_first: bool
) -> None:
    names = ["fake_clock", "time_machine"] if clock_first else ["time_machine", "fake_clock"]
    fixtures = {name: request.getfixturevalue(name) for name in names}
    clock: FakeClock = fixtures["fake_clock"]
    fixtures["time_machine"].move_to(dt.datetime(2032, 3, 3, 12, tzinfo=UTC), tick=False)
    seen: list[dt.datetime] = []

    @repeat_every(seconds=30)
    async def job() -> None:
        seen.append(dt.datetime.now(UTC))

    handle = job()
    await clock.advance(60)
    handle.cancel()
    assert seen == [dt.datetime(2032, 3, 3, 12, 0, s, tzinfo=UTC) for s in (0, 30)] + [
        dt.datetime(2032, 3, 3, 12, 1, tzinfo=UTC)
    ]


# -- marker and history ----------------------------------------------------------------------------


@pytest.mark.fake_clock(start=dt.datetime(2029, 2, 3, 4, 5, tzinfo=UTC), timeout=1.5)
async def test_the_marker_configures_the_fixture(fake_clock: FakeClock) -> None:
    assert fake_clock.now_datetime == dt.datetime(2029, 2, 3, 4, 5, tzinfo=UTC)
    assert fake_clock.timeout == 1.5
    assert dt.datetime.now(UTC) == dt.datetime(2029, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.fake_clock(history=3)
async def test_history_keeps_the_last_records_and_exact_counts(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def tick() -> None:
        if fake_clock.now % 2:
            raise Upstream("odd")

    handle = tick()
    await fake_clock.advance(9)
    handle.cancel()
    history = fake_clock.history
    assert history.limit == 3
    assert history.started(tick) == [7.0, 8.0, 9.0]
    assert (history.total, history.dropped) == (10, 7)
    assert history.count_of(tick) == 10
    assert history.count_of(tick, "failed") == 5
    assert history.count_of("another") == 0


async def test_history_by_default_is_bounded_and_can_keep_all_or_none() -> None:
    assert FakeClock().history.limit == 10_000
    with FakeClock(history=None) as keep_all:

        @repeat_every(seconds=1)
        async def job() -> None:
            pass

        handle = job()
        await keep_all.advance(10_500)
        handle.cancel()
        await handle.wait()
    assert len(keep_all.history) == keep_all.history.total == 10_501
    with FakeClock(history=0) as keep_none:
        handle = job()
        await keep_none.advance(5)
        handle.cancel()
    assert (len(keep_none.history), keep_none.history.total) == (0, 6)
    with pytest.raises(ValueError, match="history must be"):
        FakeClock(history=-1)


# -- the marker's mistakes ---------------------------------------------------------------------


def test_the_marker_refuses_positional_and_unknown_arguments(tmp_path: Path) -> None:
    (tmp_path / "test_marker.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.fake_clock(5)
            def test_positional(fake_clock):
                pass

            @pytest.mark.fake_clock(strat=None)
            def test_unknown(fake_clock):
                pass
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "2 errors" in result.stdout, result.stdout
    assert "takes keyword arguments only" in result.stdout
    assert "unknown argument(s) strat; it takes start" in result.stdout


async def test_a_clock_installed_inside_another_gives_the_outer_ones_timers_back() -> None:
    ends: list[tuple[str, float]] = []

    @repeat_every(seconds=100, name="inner")
    async def inner_job() -> None:
        await asyncio.sleep(5)
        ends.append(("inner", asyncio.get_running_loop().time()))

    @repeat_every(seconds=100, wait_first=10, name="outer")
    async def outer_job() -> None:  # its run, and its sleep, begin after the inner clock left
        await asyncio.sleep(5)
        ends.append(("outer", asyncio.get_running_loop().time()))

    with FakeClock(timeout=1) as outer:
        outer_handle = outer_job()
        with FakeClock() as inner:
            inner_handle = inner_job()
            await inner.advance(5)
            inner_handle.cancel()
        await outer.advance(15)
        outer_handle.cancel()
    assert ends == [("inner", 5.0), ("outer", 15.0)]


async def test_a_thread_future_cancelled_while_its_thread_sleeps_leaves_the_clock_usable(
    fake_clock: FakeClock,
) -> None:
    outcomes: list[tuple[str, float]] = []

    @repeat_every(seconds=60)
    async def job() -> None:
        try:  # the thread sleeps 100 virtual seconds; its future is cancelled at 5
            await asyncio.wait_for(asyncio.to_thread(time.sleep, 100), timeout=5)
        except asyncio.TimeoutError:
            outcomes.append(("timeout", fake_clock.now))

    handle = job()
    await fake_clock.advance(5)
    assert outcomes == [("timeout", 5.0)]
    await fake_clock.advance(115)  # the parked thread wakes at 100 and counts for nothing
    assert outcomes == [("timeout", 5.0), ("timeout", 65.0)]
    assert handle.runs == 2
    handle.cancel()
    # The third run's thread is parked until 220 when the test ends: pytest-asyncio shuts the
    # loop's executor down before the clock fixture is torn down, and that must not hang.
