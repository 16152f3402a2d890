"""Operating a running job: bounded shutdown, unique names, pause and resume, the state.

Everything runs under a ``FakeClock`` except the shutdown of a real uvicorn process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
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
from servers import free_port

from repeat_every import get_handle, lifespan, repeat_every, run_tasks, with_tasks
from repeat_every.stores import SQLiteClaimStore
from repeat_every.testing import FakeClock


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

    first, second = worker(), worker()
    handles = [first(), second()]  # type: ignore[operator]
    assert get_handle("job") is handles[1]
    await handles[1].aclose()
    assert get_handle("job") is handles[0]
    await handles[0].aclose()
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
