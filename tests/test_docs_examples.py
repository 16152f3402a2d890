"""Every code example of the docs (docs/src/*.py) runs here, so the docs cannot rot.

The testing guide's examples are pytest tests themselves (``docs/src/testing_*.py``, testing
the stand-in application ``docs/src/myapp``): they are collected into this module and run as
they would in a user's suite. The other examples are modules that the tests below load fresh
and drive with a ``FakeClock``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import importlib.util
import inspect
import json
import logging
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select

from repeat_every.testing import FakeClock

SRC = Path(__file__).resolve().parent.parent / "docs" / "src"
UTC = dt.timezone.utc
HOUR = 60 * 60


def load(name: str) -> ModuleType:
    """A fresh copy of ``docs/src/<name>.py`` (its module-level state is new each time)."""
    spec = importlib.util.spec_from_file_location(f"docs_src_{name}", SRC / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pydantic look their module up
    spec.loader.exec_module(module)
    return module


# -- the testing guide: tests collected as they are ------------------------------------------------

sys.path.insert(0, str(SRC))  # so that they import ``myapp`` as a user's tests would
_TESTING_MODULES = [
    "testing_async",
    "testing_app",
    "testing_wall_clock",
    "testing_failures",
    "testing_anyio",
    "cron_testing",
]
if sys.version_info >= (3, 11):  # its example uses asyncio.timeout
    _TESTING_MODULES.append("testing_inside_runs")
_TESTING_MODULES.append("router_testing")  # docs/operating.md: the status router's tests
for _module_name in _TESTING_MODULES:
    for _name, _test in vars(importlib.import_module(_module_name)).items():
        if _name.startswith("test_") and inspect.isfunction(_test):
            assert _name not in globals(), f"two docs examples are named {_name}"
            globals()[_name] = _test


# -- the fastapi-utils documentation example, adapted ----------------------------------------------


def test_fastapi_utils_documentation_example_removes_expired_tokens_every_hour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the example keeps its database in ./test.db
    with pytest.warns(DeprecationWarning, match="on_event is deprecated"):
        example = load("repeated_tasks1")  # @app.on_event is deprecated by FastAPI
    start = dt.datetime(2025, 1, 6, 8, tzinfo=UTC)
    naive = start.replace(tzinfo=None)
    example.Base.metadata.create_all(example.engine)
    with example.engine.begin() as db:
        db.execute(
            insert(example.Token),
            [{"expires_at": naive + dt.timedelta(minutes=m)} for m in (-1, 30, 90)],
        )

    def remaining() -> int:
        with example.SessionLocal() as db:
            return int(db.scalar(select(func.count()).select_from(example.Token)) or 0)

    with FakeClock(start=start) as clock, TestClient(example.app):
        clock.run_due_blocking()
        assert remaining() == 2  # the run at startup removed the token that had expired
        clock.advance_blocking(HOUR - 1)
        assert remaining() == 2
        clock.advance_blocking(1)
        assert remaining() == 1  # 09:00: the 30-minute token is gone
        clock.advance_blocking(HOUR)
        assert remaining() == 0
    example.engine.dispose()
    assert clock.history.outcomes(example.remove_expired_tokens_task) == ["ok", "ok", "ok"]
    assert (tmp_path / "test.db").exists()


# -- quick start and lifespan ----------------------------------------------------------------------


def test_quickstart_refreshes_the_rates_every_30_seconds(fake_clock: FakeClock) -> None:
    example = load("quickstart")
    with TestClient(example.app) as client:
        fake_clock.run_due_blocking()
        assert client.get("/rates").json() == {"EUR": 1.0, "USD": 1.08}
        fake_clock.advance_blocking(60)
    assert fake_clock.history.started(example.refresh_rates) == [0, 30, 60]


def test_lifespan_composition_runs_tasks_inside_the_apps_own_lifespan(
    fake_clock: FakeClock,
) -> None:
    example = load("lifespan_compose")
    with TestClient(example.app):
        fake_clock.advance_blocking(120)
        assert example.pool.open
        handle = example.purge_sessions.handle
        assert handle.running
    assert not example.pool.open
    assert handle.done
    assert fake_clock.history.outcomes(example.purge_sessions) == ["ok", "ok", "ok"]
    assert example.pool.queries == 3


def test_run_tasks_in_your_own_lifespan_exposes_the_handles(fake_clock: FakeClock) -> None:
    example = load("lifespan_run_tasks")
    with TestClient(example.app) as client:
        fake_clock.advance_blocking(HOUR)
        states = client.get("/tasks").json()
    assert states["cache"]["runs"] == 61
    assert states["tokens"]["runs"] == 2
    assert all(handle.done for handle in example.handles.values())


async def test_plain_asyncio_program_runs_the_heartbeat_while_it_consumes(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    example = load("plain_asyncio")
    queue: asyncio.Queue[str] = asyncio.Queue()
    program = asyncio.create_task(example.main(queue))
    await fake_clock.advance(25)
    for message in ("a", "b", "quit"):
        queue.put_nowait(message)
    await program
    assert example.processed == ["a", "b"]
    assert example.heartbeat.handle.done
    beats = [r.getMessage() for r in caplog.records if r.name == example.__name__]
    assert beats == ["still alive, 0 messages processed"] * 3  # at 0, 10 and 20 s


async def test_def_jobs_run_in_a_worker_thread_and_async_def_jobs_on_the_loop(
    fake_clock: FakeClock,
) -> None:
    example = load("sync_async")
    handles = [example.compact_files(), example.ping_upstream()]
    await fake_clock.run_due()
    for handle in handles:
        await handle.aclose()
    assert example.seen["ping_upstream"] == threading.get_ident()
    assert example.seen["compact_files"] != threading.get_ident()


# -- cron and time zones --------------------------------------------------------------------------


def test_cron_zones_example_fires_in_the_zone_each_task_names() -> None:
    example = load("cron_zones")
    friday_noon = dt.datetime(2026, 3, 27, 12, tzinfo=UTC)  # Paris moves to summer time Sunday
    monday = example.send_digest.schedule.next_after(friday_noon)
    assert monday.astimezone(UTC) == dt.datetime(2026, 3, 30, 7, tzinfo=UTC)  # 09:00 CEST
    first = example.close_the_month.schedule.next_after(dt.datetime(2026, 1, 15, tzinfo=UTC))
    assert first.astimezone(UTC) == dt.datetime(2026, 2, 1, 5, tzinfo=UTC)  # 00:00 EST
    quarter = example.poll_the_feed.schedule.next_after(dt.datetime(2026, 1, 15, 12, 7, tzinfo=UTC))
    assert quarter.astimezone(UTC) == dt.datetime(2026, 1, 15, 12, 15, tzinfo=UTC)


# -- exceptions and hooks --------------------------------------------------------------------------


async def test_failures_are_logged_and_passed_to_on_exception_and_the_loop_goes_on(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    example = load("exceptions_hooks")
    handle = example.sync_orders()
    await fake_clock.advance(5 * 60)
    await handle.aclose()
    assert (handle.runs, handle.failures) == (2, 2)
    assert example.alerts == ["sync_orders failed: ConnectionError('partner API unreachable')"] * 2
    logged = [r for r in caplog.records if r.name == "myapp.jobs"]
    assert len(logged) == 2
    assert all(r.levelno == logging.ERROR and r.exc_info for r in logged)


async def test_raise_exceptions_ends_the_loop_and_raises_to_whoever_waits(
    fake_clock: FakeClock,
) -> None:
    example = load("exceptions_hooks")
    handle = example.check_config()
    with pytest.raises(RuntimeError, match="config file is corrupt"):
        await handle.wait()
    assert handle.done
    assert handle.failures == 1


async def test_raise_exceptions_reaches_the_loops_handler_when_nobody_waits(
    fake_clock: FakeClock, loop_errors: list[dict[str, Any]]
) -> None:
    example = load("exceptions_hooks")
    handle = example.check_config()
    await fake_clock.run_due()
    await asyncio.sleep(0)
    assert handle.done
    assert [type(context["exception"]) for context in loop_errors] == [RuntimeError]


async def test_on_complete_runs_right_after_the_last_repetition(fake_clock: FakeClock) -> None:
    example = load("exceptions_hooks")
    handle = example.warm_cache()
    await fake_clock.advance(20)  # runs at 0, 10 and 20 s
    await asyncio.sleep(0)
    assert example.warm == ["batch", "batch", "batch", "done"]
    assert handle.done


def test_migration_to_lifespan_cleans_up_every_hour_and_stops_before_the_engine_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the example keeps its database in ./test.db
    example = load("migration_lifespan")
    start = dt.datetime(2025, 1, 6, 8, tzinfo=UTC)
    naive = start.replace(tzinfo=None)
    with FakeClock(start=start) as clock, TestClient(example.app):
        clock.run_due_blocking()  # the tables exist before the first run
        with example.engine.begin() as db:
            db.execute(
                insert(example.Token),
                [{"expires_at": naive + dt.timedelta(minutes=m)} for m in (30, 90)],
            )
        clock.advance_blocking(HOUR)
        with example.SessionLocal() as db:
            assert db.scalar(select(func.count()).select_from(example.Token)) == 1
        handle = example.remove_expired_tokens_task.handle
        assert handle.running
    assert handle.done  # stopped by the lifespan, before the engine was disposed
    assert clock.history.outcomes(example.remove_expired_tokens_task) == ["ok", "ok"]


# -- operating: events, structured logs, metrics ---------------------------------------------------


def test_events_example_pages_on_each_failed_run_while_the_app_runs(
    fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = load("operating_events")

    async def partner_down() -> list[str]:
        raise ConnectionError("partner API unreachable")

    with TestClient(example.app):
        fake_clock.advance_blocking(60)  # runs at 0 and 60 s: both fine
        monkeypatch.setattr(example, "fetch_new_orders", partner_down)
        fake_clock.advance_blocking(120)  # runs at 120 and 180 s: both fail
    assert example.synced == ["order-1", "order-1"]
    assert example.pages == ["sync-orders: run failed after 1 attempt(s)"] * 2
    from repeat_every import _events

    assert _events.listeners == []  # the listener left with the app


def test_events_example_warns_of_a_late_start(caplog: pytest.LogCaptureFixture) -> None:
    from repeat_every import AttemptStarted

    example = load("operating_events")
    on_time = AttemptStarted("sync-orders", 0.0, 0, 1, 60.0, 60.5, False)
    late = AttemptStarted("sync-orders", 0.0, 1, 1, 120.0, 127.5, False)
    example.on_event(on_time)
    example.on_event(late)
    assert [r.getMessage() for r in caplog.records] == ["sync-orders started 7.5 s late"]


def test_metrics_example_serves_the_series_of_its_job_at_metrics(fake_clock: FakeClock) -> None:
    import prometheus_client

    example = load("operating_metrics")
    with TestClient(example.app) as client:
        fake_clock.advance_blocking(HOUR)
        text = client.get("/metrics").text
    assert 'repeat_every_runs_total{outcome="ok",task="export-orders"} 2.0' in text
    assert 'repeat_every_runs_in_progress{task="export-orders"} 0.0' in text
    assert "repeat_every_last_success_timestamp_seconds" in text
    # Uninstalled at shutdown: the default registry is free for the next app.
    assert "repeat_every_runs_total" not in prometheus_client.generate_latest().decode()


async def test_json_logs_example_shows_the_task_tick_attempt_and_outcome(
    fake_clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    from repeat_every import repeat_every

    example = load("operating_logs")
    example.configure_logging()
    try:

        @repeat_every(seconds=60, max_repetitions=1, name="sync-orders")
        async def sync_orders() -> None:
            raise ConnectionError("partner API unreachable")

        await sync_orders().wait()
    finally:
        library = logging.getLogger("repeat_every")
        for handler in library.handlers[:]:
            if isinstance(handler.formatter, example.JsonFormatter):
                library.removeHandler(handler)
    [line] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert (
        line["message"] == "sync-orders: run 0 failed: ConnectionError('partner API unreachable')"
    )
    assert line["repeat_every_task"] == "sync-orders"
    assert (
        line["repeat_every_tick"] == dt.datetime.fromtimestamp(fake_clock.wall(), UTC).isoformat()
    )
    assert (line["repeat_every_run"], line["repeat_every_attempt"]) == (0, 1)
    assert line["repeat_every_outcome"] == "failed"
    assert "ConnectionError" in line["exc_info"]
