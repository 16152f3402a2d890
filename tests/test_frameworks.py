"""Beyond FastAPI: Starlette, Litestar, Quart and Django (through ``with_tasks``); uvloop.

Each framework's example of docs/frameworks.md (``docs/src/*_app.py``, ``docs/src/mysite``)
runs here under a ``FakeClock``; the Django project is also served by a real uvicorn process,
with ``--lifespan on`` and with uvicorn's default ``--lifespan auto`` (on uvloop, which uvicorn
picks when it is installed, as the ``test`` extra does outside Windows).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, MutableMapping
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from litestar import Litestar
from servers import free_port
from starlette.testclient import TestClient

from repeat_every import repeat_every, run_tasks, with_tasks
from repeat_every.asgi import TasksApp
from repeat_every.testing import FakeClock

SRC = Path(__file__).resolve().parent.parent / "docs" / "src"
Message = MutableMapping[str, Any]

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # the examples import ``mysite`` as a project's code would


def load(name: str) -> ModuleType:
    """A fresh copy of ``docs/src/<name>.py`` (its module-level state is new each time)."""
    spec = importlib.util.spec_from_file_location(f"docs_src_{name}", SRC / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[list[Message]]:
    """Run ``app``'s ASGI lifespan as a server does: startup on entry, shutdown on exit.

    Yields the messages the app sent to the server (``lifespan.startup.complete``, ...).
    """
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []
    answered = asyncio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        answered.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    server = asyncio.create_task(app(scope, inbox.get, send))
    inbox.put_nowait({"type": "lifespan.startup"})
    answer = asyncio.create_task(answered.wait())
    await asyncio.wait([server, answer], timeout=5, return_when=asyncio.FIRST_COMPLETED)
    answer.cancel()
    try:
        yield sent
    finally:
        if not server.done():
            inbox.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(server, timeout=5)


def types(messages: list[Message]) -> list[str]:
    return [message["type"] for message in messages]


# -- Starlette, Litestar, Quart: their own lifespans ----------------------------------------------


def test_starlette_lifespan_refreshes_the_rates_every_30_seconds(fake_clock: FakeClock) -> None:
    example = load("starlette_app")
    with TestClient(example.app) as client:
        fake_clock.run_due_blocking()
        assert client.get("/rates").json() == {"EUR": 1.0, "USD": 1.08}
        fake_clock.advance_blocking(60)
        handle = example.refresh_rates.handle
    assert handle.done  # stopped at shutdown
    assert fake_clock.history.started(example.refresh_rates) == [0, 30, 60]


def test_litestar_lifespan_list_refreshes_the_rates_and_stops_at_shutdown(
    fake_clock: FakeClock,
) -> None:
    example = load("litestar_app")
    with TestClient(example.app) as client:
        fake_clock.run_due_blocking()
        assert client.get("/rates").json() == {"EUR": 1.0, "USD": 1.08}
        fake_clock.advance_blocking(60)
        handle = example.refresh_rates.handle
    assert handle.done
    assert fake_clock.history.started(example.refresh_rates) == [0, 30, 60]


async def test_litestar_on_startup_starts_the_job_but_shutdown_never_stops_it(
    fake_clock: FakeClock,
) -> None:
    # What docs/frameworks.md warns about: on_startup calls the task, which starts it, and
    # nothing stops it at shutdown; lifespan=[...] stops it.
    example = load("litestar_app")
    async with served(Litestar(on_startup=[example.refresh_rates])) as sent:
        await fake_clock.advance(30)
    assert types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    handle = example.refresh_rates.handle
    assert handle.running  # the app has shut down, the job still runs
    await fake_clock.advance(30)
    assert handle.runs == 3
    handle.cancel()
    await asyncio.wait([asyncio.ensure_future(handle.aclose())])

    async with served(example.app) as sent:
        await fake_clock.advance(30)
    assert types(sent) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert example.refresh_rates.handle.done


async def test_quart_while_serving_refreshes_the_rates_and_stops_after_serving(
    fake_clock: FakeClock,
) -> None:
    example = load("quart_app")
    async with example.app.test_app() as test_app:
        await fake_clock.run_due()
        response = await test_app.test_client().get("/rates")
        assert await response.get_json() == {"EUR": 1.0, "USD": 1.08}
        await fake_clock.advance(60)
        handle = example.refresh_rates.handle
        assert handle.running
    assert handle.done
    assert fake_clock.history.started(example.refresh_rates) == [0, 30, 60]


# -- with_tasks: the lifespan for apps that have none ---------------------------------------------


def django_asgi() -> ModuleType:
    """The Django project's ``asgi`` module, set up in this process.

    Setting Django up sets the process's time zone (``TZ``) to ``settings.TIME_ZONE``, and
    ``asgi.py`` sets ``DJANGO_SETTINGS_MODULE``: both are put back so that the tests after this
    one see the process as they would alone.
    """
    tz = os.environ.get("TZ")
    try:
        return importlib.import_module("mysite.asgi")
    finally:
        os.environ.pop("DJANGO_SETTINGS_MODULE", None)
        if tz is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = tz
        if hasattr(time, "tzset"):  # not on Windows
            time.tzset()


def test_django_project_with_tasks_refreshes_the_rates_and_serves_the_job_state(
    fake_clock: FakeClock,
) -> None:
    project = django_asgi()
    with TestClient(project.application, base_url="http://localhost") as client:
        fake_clock.run_due_blocking()
        assert client.get("/rates").json() == {"EUR": 1.0, "USD": 1.08}
        fake_clock.advance_blocking(60)
        state = client.get("/tasks").json()
        handle = project.refresh_rates.handle
    assert (state["runs"], state["running"]) == (3, True)
    assert handle.done
    assert fake_clock.history.started(project.refresh_rates) == [0, 30, 60]


async def test_with_tasks_passes_every_other_scope_to_the_app_untouched(
    fake_clock: FakeClock,
) -> None:
    seen: list[tuple[Message, Any, Any]] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    @repeat_every(seconds=60)
    async def job() -> None: ...

    wrapped = with_tasks(app, job)
    assert isinstance(wrapped, TasksApp)
    assert (wrapped.app, wrapped.tasks) == (app, (job,))
    scope = {"type": "http", "path": "/"}
    await wrapped(scope, len, print)  # any callables: they are passed on, not called
    assert seen == [(scope, len, print)]
    assert job.handle is None  # an http request does not start the tasks


async def test_with_tasks_reports_a_task_that_cannot_start_as_startup_failed(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    @repeat_every(seconds=60)
    async def job() -> None: ...

    async def app(scope: Message, receive: Any, send: Any) -> None: ...

    async with served(with_tasks(app, job, job)) as sent:  # the second start refuses
        pass
    (message,) = sent
    assert message["type"] == "lifespan.startup.failed"
    assert "already running" in message["message"]
    assert job.handle is not None
    assert job.handle.done  # the first start was undone
    assert "failed at startup" in caplog.text


async def test_with_tasks_reports_a_failing_shutdown_as_shutdown_failed(
    fake_clock: FakeClock,
) -> None:
    @repeat_every(seconds=60)
    async def job() -> None: ...

    async def app(scope: Message, receive: Any, send: Any) -> None: ...

    replies: list[Message] = []
    messages = iter([{"type": "lifespan.startup"}])

    async def receive() -> Message:
        for message in messages:
            return message
        raise OSError("the server's channel broke")  # a fault injected where shutdown comes

    async def send(message: Message) -> None:
        replies.append(message)

    await with_tasks(app, job)({"type": "lifespan"}, receive, send)
    assert types(replies) == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert replies[1]["message"] == "OSError: the server's channel broke"
    assert job.handle is not None
    assert job.handle.done  # the tasks were stopped all the same


def test_with_tasks_refuses_what_is_not_an_app_or_a_task() -> None:
    @repeat_every(seconds=60)
    async def job() -> None: ...

    async def app(scope: Message, receive: Any, send: Any) -> None: ...

    with pytest.raises(TypeError, match=r"with_tasks takes an ASGI application first"):
        with_tasks(job.handle, job)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"with_tasks takes tasks decorated with @repeat_every"):
        with_tasks(app, app)  # type: ignore[arg-type]


# -- the Django project under a real uvicorn ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_django_under_uvicorn_runs_the_job_every_period_and_stops_cleanly_on_sigterm(
    tmp_path: Path, mode: str
) -> None:
    port = free_port()
    period = 0.2
    log_path = tmp_path / "uvicorn.log"
    env = {**os.environ, "RATES_REFRESH_SECONDS": str(period), "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "uvicorn", "mysite.asgi:application"]
    command += ["--port", str(port), "--lifespan", mode]
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=SRC, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    first = httpx.get(f"{base}/tasks", timeout=1).json()
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            else:
                pytest.fail(f"the Django app did not answer in 30 s:\n{log_path.read_text()}")
            time.sleep(10 * period)
            later = httpx.get(f"{base}/tasks", timeout=5).json()
            rates = httpx.get(f"{base}/rates", timeout=5).json()
        finally:
            server.send_signal(signal.SIGTERM)
            returncode = server.wait(timeout=30)

    text = log_path.read_text()
    assert first["running"] is True, text
    assert later["runs"] - first["runs"] >= 3, text  # ~10 periods passed; generous bound
    assert later["failures"] == 0
    assert rates == {"EUR": 1.0, "USD": 1.08}
    # uvicorn shuts down, then re-raises the signal it caught so that its exit says why.
    assert returncode in (0, -signal.SIGTERM), text
    assert "Application startup complete" in text
    assert "Application shutdown complete" in text
    assert "Finished server process" in text
    for trouble in ("unsupported", "Traceback", "Task was destroyed", "never retrieved"):
        assert trouble not in text


# -- a plain asyncio script ------------------------------------------------------------------------


@pytest.mark.slow
def test_plain_asyncio_script_logs_its_heartbeat_and_stops_quietly_on_ctrl_c() -> None:
    with subprocess.Popen(
        [sys.executable, str(SRC / "plain_asyncio.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as script:
        assert script.stdout is not None
        first = script.stdout.readline()  # the first heartbeat is due at once
        script.send_signal(signal.SIGINT)  # Ctrl+C
        rest = script.stdout.read()
        assert script.wait(timeout=30) == 0, first + rest
    assert first.endswith("__main__: still alive, 0 messages processed\n")
    assert rest.endswith("__main__: stopped\n")
    assert "Traceback" not in rest


# -- uvloop ----------------------------------------------------------------------------------------


def on_uvloop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop = pytest.importorskip("uvloop")  # not on Windows: uvloop does not support it
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_tasks_run_on_uvloop_in_real_time() -> None:
    starts: list[float] = []

    @repeat_every(seconds=0.02, max_repetitions=3)
    async def job() -> None:
        starts.append(time.monotonic())

    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with run_tasks(job) as (handle,):
            await asyncio.wait_for(handle.wait(), timeout=10)

    on_uvloop(main)
    assert len(starts) == 3
    assert all(later > earlier for earlier, later in itertools.pairwise(starts))


def test_fake_clock_steps_tasks_on_uvloop() -> None:
    @repeat_every(seconds=60)
    def job() -> None: ...

    async def main() -> None:
        with FakeClock() as clock:
            async with run_tasks(job):
                await clock.advance(180)
        assert clock.history.started(job) == [0, 60, 120, 180]

    on_uvloop(main)
