"""Operating a running job: bounded shutdown, unique names, pause and resume, the state.

Everything runs under a ``FakeClock`` except the shutdown of a real uvicorn process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from servers import free_port

from repeat_every import (
    Retry,
    get_handle,
    lifespan,
    repeat_at,
    repeat_every,
    run_tasks,
    with_tasks,
)
from repeat_every.stores import SQLiteClaimStore
from repeat_every.testing import FakeClock, RunStalledError

SRC = Path(__file__).resolve().parent.parent / "docs" / "src"


class Boom(Exception):
    """The failure jobs raise in these tests."""


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


# -- bounded shutdown ------------------------------------------------------------------------------


async def test_aclose_with_a_timeout_cancels_an_async_run_that_outlives_it(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "repeat_every")

    @repeat_every(seconds=10, name="stuck")
    async def stuck() -> None:
        await asyncio.sleep(1000)

    handle = stuck()
    await fake_clock.advance(1)  # the first run started at 0 and sleeps until 1000
    closing = asyncio.create_task(handle.aclose(timeout=5))
    await fake_clock.advance(5)
    await closing
    assert handle.done
    assert handle.cancelled
    assert fake_clock.now == 6.0
    assert fake_clock.history.outcomes(stuck) == ["cancelled"]
    assert messages(caplog) == [
        "stuck: waiting up to 5 s for its run in progress to finish",
        "stuck: still running 5 s after it was asked to stop; cancelling it",
    ]


async def test_aclose_with_a_timeout_waits_for_a_run_that_ends_in_time(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    @repeat_every(seconds=10, name="slow")
    async def slow() -> None:
        await asyncio.sleep(3)

    handle = slow()
    await fake_clock.advance(1)
    closing = asyncio.create_task(handle.aclose(timeout=dt.timedelta(seconds=5)))
    await fake_clock.advance(5)
    await closing
    assert not handle.cancelled
    assert fake_clock.history.outcomes(slow) == ["ok"]
    assert not any("still running" in m for m in messages(caplog))


async def test_aclose_with_a_timeout_abandons_a_def_run_in_its_daemon_thread(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    threads: list[threading.Thread] = []

    @repeat_every(seconds=10, name="stuck")
    def stuck() -> None:
        threads.append(threading.current_thread())
        time.sleep(1000)  # virtual inside a run: it returns when the clock reaches 1000

    handle = stuck()
    await fake_clock.advance(1)
    closing = asyncio.create_task(handle.aclose(timeout=2))
    await fake_clock.advance(2)
    await closing
    assert handle.done
    assert fake_clock.now == 3.0
    assert [thread.daemon for thread in threads] == [True]
    assert threads[0].is_alive()  # abandoned, not waited for
    assert messages(caplog)[-1] == (
        "stuck: still running 2 s after it was asked to stop; abandoning its run in its worker "
        "thread (a def job cannot be interrupted; the daemon thread finishes in the background "
        "or ends with the process)"
    )


async def test_aclose_without_a_timeout_waits_as_long_as_the_run_takes(
    fake_clock: FakeClock,
) -> None:
    @repeat_every(seconds=10, name="slow")
    async def slow() -> None:
        await asyncio.sleep(100)

    handle = slow()
    await fake_clock.advance(1)
    closing = asyncio.create_task(handle.aclose())
    await fake_clock.advance(99)
    await closing
    assert fake_clock.now == 100.0
    assert fake_clock.history.outcomes(slow) == ["ok"]


async def test_run_tasks_names_the_tasks_it_waits_for_and_gives_up_after_shutdown_timeout(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "repeat_every")

    @repeat_every(seconds=10, name="stuck")
    async def stuck() -> None:
        await asyncio.sleep(1000)

    @repeat_every(seconds=10, name="quick")
    async def quick() -> None:
        await asyncio.sleep(1)

    @repeat_every(seconds=10, wait_first=5, name="idle")
    async def idle() -> None:
        pass

    leave = asyncio.Event()

    async def app() -> None:
        async with run_tasks(stuck, quick, idle, shutdown_timeout=3):
            await leave.wait()

    serving = asyncio.create_task(app())
    await fake_clock.advance(0.5)
    leave.set()
    await fake_clock.advance(3)
    await serving
    assert fake_clock.history.outcomes(stuck) == ["cancelled"]
    assert fake_clock.history.outcomes(quick) == ["ok"]
    assert fake_clock.history.outcomes(idle) == []
    assert messages(caplog) == [
        "shutdown: waiting up to 3 s for the run in progress of: stuck, quick",
        "stuck: still running 3 s after it was asked to stop; cancelling it",
    ]


async def test_run_tasks_shutdown_timeout_none_waits_for_every_run(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10, name="slow")
    async def slow() -> None:
        await asyncio.sleep(300)

    leave = asyncio.Event()

    async def app() -> None:
        async with run_tasks(slow, shutdown_timeout=None):
            await leave.wait()

    serving = asyncio.create_task(app())
    await fake_clock.advance(1)
    leave.set()
    await fake_clock.advance(299)
    await serving
    assert fake_clock.history.outcomes(slow) == ["ok"]


@pytest.mark.fake_clock(timeout=0.2)
async def test_run_tasks_under_a_clock_nobody_advances_raises_run_stalled_and_cancels_the_task(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The shutdown waits on virtual time that never comes: the test sees RunStalledError (it
    # used to be swallowed, the task left running), and the task is not left behind.
    @repeat_every(seconds=10, name="napping")
    async def napping() -> None:
        await asyncio.sleep(100)

    with pytest.raises(RunStalledError, match="has not ended"):
        async with run_tasks(napping, shutdown_timeout=3) as (handle,):
            await fake_clock.advance(1)
    await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(handle.wait())), 1)
    assert not handle.running
    assert "shutdown: could not wait for napping to stop" in caplog.text
    async with run_tasks(napping, shutdown_timeout=None):  # its name is free again
        pass


async def test_the_default_shutdown_timeout_is_20_seconds(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10, name="stuck")
    async def stuck() -> None:
        await asyncio.sleep(1000)

    leave = asyncio.Event()

    async def app() -> None:
        async with run_tasks(stuck):
            await leave.wait()

    serving = asyncio.create_task(app())
    await fake_clock.advance(1)
    leave.set()
    await fake_clock.advance(20)
    await serving
    assert fake_clock.now == 21.0
    assert fake_clock.history.outcomes(stuck) == ["cancelled"]


@pytest.mark.parametrize(
    ("value", "error", "text"),
    [
        (-1, ValueError, "shutdown_timeout must be finite and ≥ 0, got -1"),
        ("30", TypeError, "shutdown_timeout must be a number of seconds or a datetime.timedelta"),
    ],
)
def test_a_bad_shutdown_timeout_is_refused_when_the_lifespan_is_made(
    value: object, error: type[Exception], text: str
) -> None:
    @repeat_every(seconds=10)
    async def job() -> None: ...

    async def app(scope: object, receive: object, send: object) -> None: ...

    with pytest.raises(error, match=text):
        lifespan(job, shutdown_timeout=value)  # type: ignore[arg-type]
    with pytest.raises(error, match=text):
        run_tasks(job, shutdown_timeout=value)  # type: ignore[arg-type]
    with pytest.raises(error, match=text):
        with_tasks(app, job, shutdown_timeout=value)  # type: ignore[arg-type]


async def test_aclose_refuses_a_bad_timeout(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10)
    async def job() -> None: ...

    handle = job()
    with pytest.raises(ValueError, match="timeout must be finite and ≥ 0, got -2"):
        await handle.aclose(timeout=-2)
    await handle.aclose()


# -- unique names ----------------------------------------------------------------------------------


async def test_a_second_task_under_a_running_name_is_refused_naming_it(
    fake_clock: FakeClock,
) -> None:
    @repeat_every(seconds=10, name="sync-orders")
    async def first() -> None: ...

    @repeat_every(seconds=10, name="sync-orders")
    async def second() -> None: ...

    handle = first()
    with pytest.raises(RuntimeError, match="a task named 'sync-orders' is already running"):
        second()
    assert get_handle("sync-orders") is handle
    await handle.aclose()
    assert get_handle("sync-orders") is None
    again = second()  # the name is free once the first loop has ended
    assert get_handle("sync-orders") is again
    await again.aclose()


async def test_tasks_sharing_a_claim_store_may_share_a_name(
    fake_clock: FakeClock, tmp_path: Path
) -> None:
    def worker() -> object:
        @repeat_every(seconds=1, store=SQLiteClaimStore(tmp_path / "claims.db"), name="job")
        async def job() -> None: ...

        return job

    handles = [worker()(), worker()(), worker()()]  # type: ignore[operator]
    assert get_handle("job") is handles[2]
    await handles[2].aclose()
    assert get_handle("job") is handles[1]
    await handles[0].aclose()
    assert get_handle("job") is handles[1]
    await handles[1].aclose()
    assert get_handle("job") is None


def test_get_handle_of_a_name_nothing_runs_is_none() -> None:
    assert get_handle("never-started") is None


# -- pause and resume ------------------------------------------------------------------------------


async def test_paused_ticks_are_counted_and_not_run_until_resume(fake_clock: FakeClock) -> None:
    ran: list[float] = []

    @repeat_every(seconds=10)
    async def job() -> None:
        ran.append(fake_clock.now)

    handle = job()
    await fake_clock.advance(5)
    handle.pause()
    assert handle.paused
    assert handle.state.paused
    await fake_clock.advance(30)  # ticks at 10, 20, 30 come while paused
    assert ran == [0.0]
    assert handle.paused_ticks == 3
    assert handle.state.paused_ticks == 3
    assert handle.running
    handle.resume()
    assert not handle.paused
    await fake_clock.advance(10)
    assert ran == [0.0, 40.0]
    assert handle.runs == 2
    assert handle.skipped == 0
    await handle.aclose()


async def test_pause_lets_the_run_in_progress_finish(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10)
    async def job() -> None:
        await asyncio.sleep(4)

    handle = job()
    await fake_clock.advance(1)
    handle.pause()
    await fake_clock.advance(20)
    assert fake_clock.history.outcomes(job) == ["ok"]
    assert handle.paused_ticks == 2
    await handle.aclose()


# -- state -----------------------------------------------------------------------------------------


@pytest.mark.fake_clock(start=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))
async def test_state_tells_the_last_success_the_last_duration_and_consecutive_failures(
    fake_clock: FakeClock,
) -> None:
    failing = [False, True, True, False]

    @repeat_every(seconds=10)
    async def job() -> None:
        await asyncio.sleep(2)
        if failing.pop(0):
            raise Boom

    handle = job()
    state = handle.state
    assert state.last_success_at is None
    assert state.last_duration is None
    assert state.consecutive_failures == 0
    await fake_clock.advance(25)  # ok at 0-2, failed at 10-12, failed at 20-22
    state = handle.state
    assert state.last_success_at == dt.datetime(2030, 1, 1, 0, 0, 2, tzinfo=dt.timezone.utc)
    assert state.last_duration == 2.0
    assert state.consecutive_failures == 2
    assert handle.consecutive_failures == 2
    assert state.as_dict()["consecutive_failures"] == 2
    assert state.as_dict()["last_success_at"] == "2030-01-01T00:00:02+00:00"
    await fake_clock.advance(10)  # ok at 30-32
    state = handle.state
    assert state.consecutive_failures == 0
    assert state.last_success_at == dt.datetime(2030, 1, 1, 0, 0, 32, tzinfo=dt.timezone.utc)
    assert state.failures == 2
    await handle.aclose()


# -- a real uvicorn process sent SIGTERM -----------------------------------------------------------

STUCK_APP = """
import asyncio
import logging
import time

from fastapi import FastAPI

from repeat_every import lifespan, repeat_every

logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")


@repeat_every(seconds=1)
{kind} stuck():
    print("stuck: started", flush=True)
    {sleep}(1000)


app = FastAPI(lifespan=lifespan(stuck, shutdown_timeout={timeout}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "sleep", "gives_up"),
    [
        ("def", "time.sleep", "abandoning its run in its worker thread"),
        ("async def", "await asyncio.sleep", "cancelling it"),
    ],
)
def test_a_stuck_job_under_uvicorn_exits_within_shutdown_timeout_of_sigterm(
    tmp_path: Path, kind: str, sleep: str, gives_up: str
) -> None:
    timeout = 0.5
    (tmp_path / "stuck_app.py").write_text(
        textwrap.dedent(STUCK_APP).format(kind=kind, sleep=sleep, timeout=timeout)
    )
    log_path = tmp_path / "uvicorn.log"
    command = [sys.executable, "-m", "uvicorn", "stuck_app:app", "--port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 30
            while "stuck: started" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                assert server.poll() is None, log_path.read_text()
                time.sleep(0.05)
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            returncode = server.wait(timeout=30)
            took = time.monotonic() - signalled
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    text = log_path.read_text()
    assert took < timeout + 1, f"exited {took:.2f} s after SIGTERM\n{text}"
    assert returncode in (0, -signal.SIGTERM), text
    assert "shutdown: waiting up to 0.5 s for the run in progress of: stuck_app.stuck" in text
    assert f"stuck_app.stuck: still running 0.5 s after it was asked to stop; {gives_up}" in text
    assert "Application shutdown complete" in text
    assert "Traceback" not in text


# -- run_now ---------------------------------------------------------------------------------------


async def test_run_now_runs_at_once_outside_the_grid_and_counts_like_any_run(
    fake_clock: FakeClock,
) -> None:
    ran: list[float] = []

    @repeat_every(seconds=10, name="report")
    async def report() -> None:
        ran.append(fake_clock.now)

    handle = report()
    await fake_clock.advance(3)
    record = await handle.run_now()
    assert record.ok
    assert (record.task, record.index, record.attempt, record.started) == ("report", 1, 1, 3.0)
    assert ran == [0.0, 3.0]
    assert handle.runs == 2
    assert fake_clock.history.outcomes(report) == ["ok", "ok"]
    await fake_clock.advance(7)  # the grid is unchanged: the next tick is still at 10
    assert ran == [0.0, 3.0, 10.0]
    await handle.aclose()


async def test_run_now_waits_for_the_run_in_progress_instead_of_overlapping(
    fake_clock: FakeClock,
) -> None:
    spans: list[tuple[float, float]] = []

    @repeat_every(seconds=10, name="sync")
    async def sync() -> None:
        start = fake_clock.now
        await asyncio.sleep(4)
        spans.append((start, fake_clock.now))

    handle = sync()
    await fake_clock.advance(1)  # the tick-0 run is in progress until 4
    manual = asyncio.create_task(handle.run_now())
    await fake_clock.advance(9)  # the manual run starts at 4 and ends at 8
    record = await manual
    assert (record.started, record.ended) == (4.0, 8.0)
    assert spans == [(0.0, 4.0), (4.0, 8.0)]  # the tick-10 run is in progress
    handle.cancel()
    await handle.wait()


async def test_a_tick_that_comes_during_run_now_is_skipped_as_an_overrun(
    fake_clock: FakeClock,
) -> None:
    starts: list[float] = []

    @repeat_every(seconds=10, name="sync")
    async def sync() -> None:
        starts.append(fake_clock.now)
        await asyncio.sleep(4)

    handle = sync()
    await fake_clock.advance(8)
    manual = asyncio.create_task(handle.run_now())  # runs from 8 to 12: covers tick 10
    await fake_clock.advance(16)
    await manual
    assert starts == [0.0, 8.0, 20.0]
    assert handle.skipped == 1
    assert handle.runs == 3
    handle.cancel()
    await handle.wait()


async def test_run_now_applies_the_tasks_retry_and_reports_a_failure(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[float] = []

    @repeat_every(seconds=3600, name="flaky", wait_first=True, retry=Retry(attempts=3, backoff=2))
    async def flaky() -> None:
        calls.append(fake_clock.now)
        raise Boom

    handle = flaky()
    manual = asyncio.create_task(handle.run_now())
    await fake_clock.advance(10)
    record = await manual
    assert calls == [0.0, 2.0, 6.0]  # backoff 2, then 4
    assert (record.attempt, record.outcome) == (3, "failed")
    assert isinstance(record.exception, Boom)
    assert (handle.runs, handle.failures, handle.retries) == (1, 1, 2)
    assert handle.consecutive_failures == 1
    assert "flaky: run 0 failed: Boom()" in messages(caplog)
    await handle.aclose()


async def test_run_now_applies_the_tasks_timeout(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=3600, name="slow", wait_first=True, timeout=5)
    async def slow() -> None:
        await asyncio.sleep(60)

    handle = slow()
    manual = asyncio.create_task(handle.run_now())
    await fake_clock.advance(5)
    record = await manual
    assert (record.outcome, record.started, record.ended) == ("timeout", 0.0, 5.0)
    await handle.aclose()


async def test_run_now_runs_a_def_job_of_a_paused_task(fake_clock: FakeClock) -> None:
    ran: list[float] = []

    @repeat_every(seconds=10, name="export")
    def export() -> None:
        time.sleep(2)
        ran.append(fake_clock.now)

    handle = export()
    await fake_clock.advance(5)
    handle.pause()
    manual = asyncio.create_task(handle.run_now())
    await fake_clock.advance(2)
    record = await manual
    assert record.ok
    assert ran == [2.0, 7.0]
    assert handle.paused  # still paused: the grid's ticks are not run
    await fake_clock.advance(20)
    assert ran == [2.0, 7.0]
    await handle.aclose()


async def test_run_now_of_a_stopped_task_says_so(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=10, name="job")
    async def job() -> None: ...

    handle = job()
    await fake_clock.advance(1)
    await handle.aclose()
    with pytest.raises(RuntimeError, match=r"job: run_now\(\) needs a running task"):
        await handle.run_now()


async def test_shutdown_gives_up_on_a_run_now_run_past_the_timeout(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    @repeat_every(seconds=3600, name="stuck", wait_first=True)
    async def stuck() -> None:
        await asyncio.sleep(1000)

    handle = stuck()
    manual = asyncio.create_task(handle.run_now())
    await fake_clock.advance(1)
    closing = asyncio.create_task(handle.aclose(timeout=2))
    await fake_clock.advance(2)
    await closing
    with pytest.raises(asyncio.CancelledError):
        await manual
    assert fake_clock.history.outcomes(stuck) == ["cancelled"]
    assert "stuck: still running 2 s after it was asked to stop; cancelling it" in messages(caplog)


# -- the example of docs/operating.md --------------------------------------------------------------


def test_the_operating_example_runs_pauses_and_resumes_the_export(fake_clock: FakeClock) -> None:
    spec = importlib.util.spec_from_file_location(
        "docs_src_operating_app", SRC / "operating_app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with TestClient(example.app) as client:
        fake_clock.run_due_blocking()
        assert example.exported == [0]  # the run at startup
        assert client.post("/tasks/export-orders/run").json() == {"outcome": "ok", "seconds": 0.0}
        assert example.exported == [0, 1]
        paused = client.post("/tasks/export-orders/pause").json()
        assert (paused["paused"], paused["runs"]) == (True, 2)
        fake_clock.advance_blocking(2 * 3600)
        assert example.exported == [0, 1]
        state = client.post("/tasks/export-orders/resume").json()
        assert (state["paused"], state["paused_ticks"]) == (False, 2)
        fake_clock.advance_blocking(3600)
        assert example.exported == [0, 1, 2]
        assert client.get("/tasks/nightly").status_code == 404
    assert fake_clock.history.outcomes(example.export_orders) == ["ok", "ok", "ok"]


# -- reschedule ------------------------------------------------------------------------------------


async def test_reschedule_replaces_the_tick_waited_for_with_the_new_period(
    fake_clock: FakeClock,
) -> None:
    ran: list[float] = []

    @repeat_every(seconds=3600, name="poll")
    async def poll() -> None:
        ran.append(fake_clock.now)

    handle = poll()
    await fake_clock.advance(100)
    handle.reschedule(seconds=10)
    assert handle.schedule.describe() == "every 10 s (fixed rate)"
    await fake_clock.advance(30)
    assert ran == [0.0, 110.0, 120.0, 130.0]
    assert poll.schedule.describe() == "every 3600 s (fixed rate)"  # the decorator's is kept
    await handle.aclose()


async def test_reschedule_during_a_run_applies_after_it(fake_clock: FakeClock) -> None:
    ran: list[float] = []

    @repeat_every(seconds=10, name="poll", fixed_delay=True)
    async def poll() -> None:
        ran.append(fake_clock.now)
        await asyncio.sleep(2)

    handle = poll()
    await fake_clock.advance(1)
    handle.reschedule(seconds=5)
    await fake_clock.advance(13)  # run 0 ends at 2; then every 5 s after each run ends
    assert ran == [0.0, 7.0, 14.0]
    assert handle.schedule.describe().startswith("every 5 s")
    handle.cancel()
    await handle.wait()


@pytest.mark.fake_clock(start=dt.datetime(2030, 1, 7, 8, 0, tzinfo=dt.timezone.utc))
async def test_reschedule_at_the_instant_of_a_run_does_not_run_that_instant_again(
    fake_clock: FakeClock,
) -> None:
    # The aligned task ran at 60; rescheduled to a 30 s grid at that same instant, the grid's
    # multiple 60 is due now, but it has had its run: the next run is at 90.
    ran: list[float] = []

    @repeat_every(seconds=60, align=True, name="sync")
    async def sync() -> None:
        ran.append(fake_clock.now)

    handle = sync()
    await fake_clock.advance(60)
    handle.reschedule(seconds=30)
    await fake_clock.advance(60)
    assert ran == [0.0, 60.0, 90.0, 120.0]
    await handle.aclose()


class DeadlineStore:
    """A claim store that wins every claim and keeps the deadlines it was given."""

    def __init__(self) -> None:
        self.claims: list[tuple[int, float]] = []

    async def claim(self, task: str, tick: int, ttl: float, *, deadline: float) -> bool:
        self.claims.append((tick, deadline))
        return True


@pytest.mark.fake_clock(start=dt.datetime(2030, 1, 7, 8, 0, tzinfo=dt.timezone.utc))
async def test_a_rescheduled_task_claims_with_its_new_schedules_deadlines(
    fake_clock: FakeClock,
) -> None:
    # A claim's deadline is the tick's due instant in every worker: after reschedule() it must
    # come from the new schedule, or the store would take a late claim for a tick it thinks
    # is not due yet (the key of a 30 s grid read on the 60 s grid is twice as far away).
    store = DeadlineStore()

    @repeat_every(seconds=60, store=store, name="sync")
    async def sync() -> None:
        pass

    handle = sync()
    await fake_clock.advance(60)
    handle.reschedule(seconds=30)
    await fake_clock.advance(60)
    start = dt.datetime(2030, 1, 7, 8, 0, tzinfo=dt.timezone.utc).timestamp()
    assert [deadline - start for _, deadline in store.claims] == [0, 60, 90, 120]
    await handle.aclose()


@pytest.mark.fake_clock(start=dt.datetime(2030, 1, 7, 8, 0, tzinfo=dt.timezone.utc))
async def test_reschedule_a_cron_task_with_a_new_expression_or_zone(fake_clock: FakeClock) -> None:
    ran: list[dt.datetime] = []

    @repeat_at(cron="0 9 * * *", name="report")  # 09:00 UTC
    async def report() -> None:
        ran.append(fake_clock.now_datetime)

    handle = report()
    await fake_clock.advance(60)
    handle.reschedule(cron="30 8 * * *")
    await fake_clock.advance(3600)
    assert ran == [dt.datetime(2030, 1, 7, 8, 30, tzinfo=dt.timezone.utc)]
    handle.reschedule(tz="Europe/Paris")  # 08:30 in Paris: 07:30 UTC, tomorrow
    await fake_clock.advance(86400)
    assert ran[1:] == [dt.datetime(2030, 1, 8, 7, 30, tzinfo=dt.timezone.utc)]
    await handle.aclose()


async def test_reschedule_refuses_what_does_not_fit_the_task(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=60, name="poll", jitter=20)
    async def poll() -> None: ...

    @repeat_at(cron="0 9 * * *", name="report")
    async def report() -> None: ...

    every, at = poll(), report()
    with pytest.raises(TypeError, match=r"poll runs every so many seconds: reschedule it with"):
        every.reschedule(cron="* * * * *")
    with pytest.raises(ValueError, match=r"seconds must be finite and > 0, got -1"):
        every.reschedule(seconds=-1)
    with pytest.raises(ValueError, match=r"the task's jitter \(20 s\) must stay shorter"):
        every.reschedule(seconds=10)
    with pytest.raises(TypeError, match=r"report runs on a cron expression"):
        at.reschedule(seconds=10)
    with pytest.raises(TypeError, match=r"report runs on a cron expression"):
        at.reschedule()
    assert every.schedule.describe() == "every 60 s (fixed rate)"
    await every.aclose()
    await at.aclose()


@pytest.mark.fake_clock(timeout=0.2)
async def test_a_bounded_aclose_that_needs_virtual_time_nobody_gives_says_so(
    fake_clock: FakeClock,
) -> None:
    @repeat_every(seconds=10, name="slow")
    async def slow() -> None:
        await asyncio.sleep(3)

    handle = slow()
    await fake_clock.advance(1)
    with pytest.raises(RunStalledError, match="'slow' has not ended"):
        await handle.aclose(timeout=10)  # the run waits for virtual time: advance the clock
    handle.cancel()
    await handle.wait()
