"""Tying tasks to a program's life: ``async with run_tasks(...)`` and FastAPI ``lifespan(...)``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from sqlalchemy import orm
from sqlalchemy.orm import Session

from repeat_every import lifespan, repeat_every, run_tasks, running_handles
from repeat_every.testing import FakeClock

# -- run_tasks -------------------------------------------------------------------------------------


async def test_run_tasks_starts_on_entry_and_stops_gracefully_on_exit(
    fake_clock: FakeClock,
) -> None:
    events: list[str] = []

    @repeat_every(seconds=10, on_complete=lambda: events.append("cache complete"))
    async def refresh_cache() -> None:
        events.append(f"cache {fake_clock.now:g}")

    @repeat_every(seconds=15, on_complete=lambda: events.append("tokens complete"))
    def drop_tokens() -> None:
        events.append(f"tokens {fake_clock.now:g}")

    async with run_tasks(refresh_cache, drop_tokens) as handles:
        assert [h.task for h in handles] == [refresh_cache, drop_tokens]
        assert all(h.running for h in handles)
        await fake_clock.advance(30)
    assert all(h.done and not h.cancelled for h in handles)
    assert sorted(events[-2:]) == ["cache complete", "tokens complete"]  # both stopped last
    assert sorted(events[:-2]) == sorted(
        ["cache 0", "cache 10", "cache 20", "cache 30", "tokens 0", "tokens 15", "tokens 30"]
    )
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert not set(handles) & running_handles()


async def test_run_tasks_exit_waits_for_the_run_in_progress(fake_clock: FakeClock) -> None:
    ended: list[float] = []
    block_entered = asyncio.Event()

    @repeat_every(seconds=60)
    async def job() -> None:
        block_entered.set()
        await fake_clock.sleep(5)
        ended.append(fake_clock.now)

    async def leave_while_running() -> None:
        async with run_tasks(job):
            await block_entered.wait()

    leaving = asyncio.ensure_future(leave_while_running())
    await fake_clock.run_due()
    await asyncio.sleep(0)
    assert not leaving.done()  # exit waits for the run to finish…
    await fake_clock.advance(5)  # …which needs virtual time
    await leaving
    assert ended == [5.0]
    assert job.handle is not None
    assert job.handle.runs == 1


async def test_run_tasks_cancelled_block_cancels_the_tasks(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=1)
    async def job() -> None:
        await fake_clock.sleep(0.5)

    async def body() -> None:
        async with run_tasks(job):
            await asyncio.Event().wait()

    runner = asyncio.ensure_future(body())
    await fake_clock.advance(0.25)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert job.handle is not None
    assert job.handle.cancelled
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_run_tasks_cancelled_during_shutdown_cancels_the_run_it_waited_for(
    fake_clock: FakeClock,
) -> None:
    entered = asyncio.Event()
    finished: list[float] = []

    @repeat_every(seconds=60)
    async def job() -> None:
        entered.set()
        await fake_clock.sleep(5)
        finished.append(fake_clock.now)

    async def leave_while_running() -> None:
        async with run_tasks(job):
            await entered.wait()

    leaving = asyncio.ensure_future(leave_while_running())
    await fake_clock.run_due()
    await asyncio.sleep(0)
    assert not leaving.done()  # shutting down: waiting for the run in progress
    leaving.cancel()  # the server gives up on a graceful shutdown
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert job.handle is not None
    assert job.handle.cancelled
    assert finished == []  # the run was cancelled, not awaited to its end
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_run_tasks_of_no_task_is_an_empty_block() -> None:
    async with run_tasks() as handles:
        assert handles == ()


async def test_run_tasks_refuses_what_is_not_a_task() -> None:
    async def job() -> None:
        pass

    with pytest.raises(TypeError, match=r"decorated with @repeat_every"):
        async with run_tasks(job):  # type: ignore[arg-type]
            pass


async def test_run_tasks_exit_does_not_raise_for_a_task_that_failed_earlier(
    fake_clock: FakeClock, loop_errors: list[dict[str, Any]]
) -> None:
    @repeat_every(seconds=1, raise_exceptions=True)
    async def job() -> None:
        raise ValueError("reported already")

    async with run_tasks(job) as (handle,):
        await fake_clock.advance(1)
        assert handle.done
    assert [type(c["exception"]) for c in loop_errors] == [ValueError]


# -- FastAPI lifespan under TestClient ----------------------------------------------------------


@repeat_every(seconds=60, name="app.refresh")
def refresh() -> None:
    pass


def _app_with_tasks() -> FastAPI:
    app = FastAPI(lifespan=lifespan(refresh))

    @app.get("/runs")
    def runs() -> dict[str, int]:
        assert refresh.handle is not None
        return {"runs": refresh.handle.runs}

    return app


@pytest.mark.parametrize("round_", [1, 2])
def test_lifespan_starts_and_stops_tasks_with_the_app(fake_clock: FakeClock, round_: int) -> None:
    # Parametrized: the app starts and shuts down twice in this module, with no warning.
    app = _app_with_tasks()
    with TestClient(app) as client:
        fake_clock.advance_blocking(180)
        assert client.get("/runs").json() == {"runs": 4}
        handle = refresh.handle
        assert handle is not None
        assert handle.running
    assert handle.done
    assert not handle.cancelled
    assert fake_clock.deadlines == []


def test_lifespan_twice_in_one_test_gives_a_fresh_loop_each_time(fake_clock: FakeClock) -> None:
    app = _app_with_tasks()
    handles = []
    for _ in range(2):
        with TestClient(app) as client:
            fake_clock.advance_blocking(60)
            assert client.get("/runs").json() == {"runs": 2}
            handles.append(refresh.handle)
    assert handles[0] is not handles[1]
    assert all(h is not None and h.done for h in handles)


def test_lifespan_composes_with_the_apps_own_lifespan(fake_clock: FakeClock) -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("db open")
        yield {"db": "the pool"}
        events.append("db close")

    @repeat_every(seconds=60, on_complete=lambda: events.append("job complete"))
    async def job() -> None:
        events.append("job run")

    app = FastAPI(lifespan=lifespan(job, app_lifespan=app_lifespan))

    @app.get("/db")
    def db(request: Request) -> str:
        return str(request.state.db)

    with TestClient(app) as client:
        assert client.get("/db").json() == "the pool"
        fake_clock.advance_blocking(60)
    assert events == ["db open", "job run", "job run", "job complete", "db close"]


def test_on_event_startup_form_keeps_working(fake_clock: FakeClock) -> None:
    app = FastAPI()
    with pytest.warns(DeprecationWarning, match="on_event is deprecated"):

        @app.on_event("startup")
        @repeat_every(seconds=60 * 60)
        def hourly() -> None:
            pass

    with TestClient(app):
        fake_clock.advance_blocking(2 * 60 * 60)
        assert fake_clock.history.outcomes(hourly) == ["ok", "ok", "ok"]
        handle = hourly.handle
        assert handle is not None
        assert handle.running
    # Nobody stops it in this form: the app's event loop ends, and the loop ends with it.
    assert handle.done


def test_on_event_startup_form_with_async_def_keeps_working(fake_clock: FakeClock) -> None:
    app = FastAPI()
    with pytest.warns(DeprecationWarning, match="on_event is deprecated"):

        @app.on_event("startup")
        @repeat_every(seconds=60)
        async def every_minute() -> None:
            pass

    with TestClient(app):
        fake_clock.advance_blocking(60)
        assert fake_clock.history.outcomes(every_minute) == ["ok", "ok"]


# -- the fastapi-utils documentation example, with only the import changed -----------------------


_metadata = sqlalchemy.MetaData()
tokens = sqlalchemy.Table(
    "tokens",
    _metadata,
    sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
    sqlalchemy.Column("expires_at", sqlalchemy.DateTime, nullable=False),
)


@pytest.fixture
def sessionmaker(tmp_path: Path) -> Iterator[orm.sessionmaker[orm.Session]]:
    """A plain SQLAlchemy sessionmaker on SQLite, in place of fastapi-utils' FastAPISessionMaker."""
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'test.db'}?check_same_thread=False")
    _metadata.create_all(engine)
    try:
        yield orm.sessionmaker(engine)
    finally:
        engine.dispose()


def test_fastapi_utils_documented_example_works_with_the_import_changed(
    sessionmaker: orm.sessionmaker[orm.Session],
) -> None:
    now = dt.datetime.now()
    with sessionmaker.begin() as db:
        db.execute(
            tokens.insert(),
            [
                {"expires_at": now - dt.timedelta(hours=1)},
                {"expires_at": now + dt.timedelta(minutes=30)},
                {"expires_at": now + dt.timedelta(hours=5)},
            ],
        )

    clock = FakeClock(start=now.astimezone(dt.timezone.utc))

    # --- the documented code, with `from repeat_every import repeat_every` ---
    app = FastAPI()

    def remove_expired_tokens(db: Session) -> None:
        """Pretend this function deletes expired tokens from the database"""
        db.execute(tokens.delete().where(tokens.c.expires_at < dt.datetime.now()))

    with pytest.warns(DeprecationWarning, match="on_event is deprecated"):

        @app.on_event("startup")
        @repeat_every(seconds=60 * 60)  # 1 hour
        def remove_expired_tokens_task() -> None:
            with sessionmaker.begin() as db:
                remove_expired_tokens(db=db)

    # --- end of the documented code ---

    def remaining() -> int:
        with sessionmaker() as db:
            return int(db.scalar(sqlalchemy.select(sqlalchemy.func.count()).select_from(tokens)))

    with clock, TestClient(app):
        clock.run_due_blocking()
        assert remaining() == 2  # the startup run removed the expired token
        clock.advance_blocking(60 * 60)
        assert remaining() == 1  # an hour later, the 30-minute token has expired too
    assert clock.history.outcomes(remove_expired_tokens_task) == ["ok", "ok"]
