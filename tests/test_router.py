"""repeat_every.fastapi.tasks_router: the tasks' state, their health, the fleet view and the
control routes, on real FastAPI apps (their lifespan run by TestClient) under a FakeClock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

from repeat_every import PeriodicTask, Retry, lifespan, repeat_at, repeat_every
from repeat_every.fastapi import tasks_router
from repeat_every.stores import RedisClaimStore, SQLiteClaimStore
from repeat_every.stores._common import owner
from repeat_every.testing import FakeClock

UTC = dt.timezone.utc
START = dt.datetime(2025, 1, 8, 8, 0, tzinfo=UTC)  # a Wednesday, 08:00 UTC
MINUTE = 60
HOUR = 60 * MINUTE
DAY = 24 * HOUR


class Boom(Exception):
    """What failing jobs raise here."""


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with FakeClock(start=START) as clock:
        yield clock


def at(value: object) -> dt.datetime:
    """A datetime of a JSON answer (Pydantic writes UTC as "Z")."""
    assert isinstance(value, str)
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def when(seconds: float) -> dt.datetime:
    return START + dt.timedelta(seconds=seconds)


def serve(*tasks: PeriodicTask[Any], **router: Any) -> FastAPI:
    """An app whose lifespan runs ``tasks``, with ``tasks_router(**router)`` included."""
    app = FastAPI(lifespan=lifespan(*tasks))
    given = router.pop("given", ())
    app.include_router(tasks_router(*given, **router))
    return app


def verify_token(authorization: str = Header("")) -> None:
    """The authorisation dependency of these tests: a bearer token, 401 or 403."""
    if not authorization:
        raise HTTPException(401, "a bearer token is needed", {"WWW-Authenticate": "Bearer"})
    if authorization != "Bearer s3cret":
        raise HTTPException(403, "this token may not control jobs")


ADMIN = {"authorization": "Bearer s3cret"}


# -- GET /tasks and GET /tasks/{name} --------------------------------------------------------------


def test_tasks_lists_every_running_task_with_its_state_and_schedule(clock: FakeClock) -> None:
    @repeat_every(seconds=60, name="refresh")
    async def refresh() -> None:
        pass

    @repeat_at(cron="0 9 * * MON-FRI", tz="Europe/Paris", name="report")
    async def report() -> None:
        pass

    with TestClient(serve(refresh, report)) as client:
        clock.advance_blocking(2 * MINUTE)
        body = client.get("/tasks").json()

    assert body["worker"] == owner()
    tasks = {task["name"]: task for task in body["tasks"]}
    assert list(tasks) == ["refresh", "report"]  # by name
    assert tasks["refresh"]["schedule"] == "every 60 s (fixed rate)"
    assert (tasks["refresh"]["runs"], tasks["refresh"]["failures"]) == (3, 0)
    assert at(tasks["refresh"]["started_at"]) == START
    assert at(tasks["refresh"]["last_success_at"]) == when(2 * MINUTE)
    assert at(tasks["refresh"]["next_run_at"]) == when(3 * MINUTE)
    assert tasks["refresh"]["fleet"] is None  # no claim store
    assert tasks["report"]["schedule"] == "cron '0 9 * * MON-FRI' in Europe/Paris"
    assert tasks["report"]["runs"] == 1  # 09:00 in Paris is 08:00 UTC: at start
    assert at(tasks["report"]["next_run_at"]) == dt.datetime(2025, 1, 9, 8, tzinfo=UTC)


def test_one_task_by_name_and_a_404_that_names_the_known_ones(clock: FakeClock) -> None:
    @repeat_every(seconds=60, name="reports/nightly")  # a slash is fine in a name
    async def nightly() -> None:
        raise Boom("disk full")

    with TestClient(serve(nightly)) as client:
        clock.run_due_blocking()
        one = client.get("/tasks/reports/nightly")
        missing = client.get("/tasks/nope")

    assert one.status_code == 200
    assert one.json()["name"] == "reports/nightly"
    assert one.json()["last_error"] == "Boom('disk full')"
    assert one.json()["consecutive_failures"] == 1
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no task named 'nope' here (tasks: 'reports/nightly')"}


def test_the_default_view_is_the_tasks_running_now_and_a_given_list_keeps_a_dead_one(
    clock: FakeClock,
) -> None:
    @repeat_every(seconds=60, name="steady")
    async def steady() -> None:
        pass

    @repeat_every(seconds=60, name="fragile", raise_exceptions=True, wait_first=True)
    async def fragile() -> None:
        raise Boom("gone")

    @repeat_every(seconds=60, name="never-started")
    async def never_started() -> None:
        pass

    app = FastAPI(lifespan=lifespan(steady, fragile))
    app.include_router(tasks_router(), prefix="/all")
    app.include_router(tasks_router(steady, fragile, never_started), prefix="/given")
    with TestClient(app) as client:
        clock.run_due_blocking()
        assert [t["name"] for t in client.get("/all/tasks").json()["tasks"]] == [
            "fragile",
            "steady",
        ]
        clock.advance_blocking(MINUTE)  # fragile fails: raise_exceptions ends its loop
        everything = [t["name"] for t in client.get("/all/tasks").json()["tasks"]]
        given = {t["name"]: t for t in client.get("/given/tasks").json()["tasks"]}
        health = client.get("/given/health/tasks")

    assert everything == ["steady"]  # the dead loop left the default view
    assert given["fragile"]["running"] is False
    assert given["never-started"]["running"] is False
    assert given["never-started"]["started_at"] is None
    assert health.status_code == 503
    assert health.json()["unhealthy"] == ["fragile", "never-started"]
    reasons = {t["name"]: t["reason"] for t in health.json()["tasks"]}
    assert reasons["fragile"] == "not running: its loop ended with Boom('gone')"
    assert reasons["never-started"] == "not running: never started"


# -- the health route ------------------------------------------------------------------------------


def test_health_turns_503_when_two_ticks_in_a_row_failed_and_their_budget_passed(
    clock: FakeClock,
) -> None:
    failing = {"now": False}

    @repeat_every(seconds=60, name="sync-prices", timeout=5)
    async def sync_prices() -> None:
        if failing["now"]:
            raise Boom("upstream down")

    with TestClient(serve(sync_prices)) as client:

        def health() -> tuple[int, dict[str, Any]]:
            response = client.get("/health/tasks")
            return response.status_code, response.json()

        clock.advance_blocking(MINUTE)  # runs at 0 and 60 succeed
        assert health()[0] == 200
        failing["now"] = True
        clock.advance_blocking(MINUTE + 5)  # 120 fails: one failure is tolerated
        assert health()[0] == 200
        clock.advance_blocking(MINUTE)  # 180 fails too; its 5 s budget ends at 185
        status, body = health()
        assert status == 200
        assert at(body["tasks"][0]["expected_since"]) == when(60)  # 185 - 5 - 2 × 60
        clock.advance_blocking(1)
        status, body = health()
        assert status == 503
        assert body["healthy"] is False
        assert body["unhealthy"] == ["sync-prices"]
        reason = (
            "stale: last success at 2025-01-08T08:01:00+00:00 in this worker; one was expected "
            "since 2025-01-08T08:01:01+00:00"
        )
        assert body["tasks"][0]["reason"] == reason
        assert body["detail"] == f"1 of 1 task(s) unhealthy: sync-prices: {reason}"
        assert client.get("/tasks/sync-prices").json()["health"]["healthy"] is False

        failing["now"] = False
        clock.advance_blocking(MINUTE)  # 240 succeeds
        status, body = health()
        assert status == 200
        assert body == {
            "healthy": True,
            "detail": "ok",
            "unhealthy": [],
            "tasks": [
                {
                    "name": "sync-prices",
                    "healthy": True,
                    "reason": "ok: last success at 2025-01-08T08:04:00+00:00 in this worker",
                    "last_success_at": "2025-01-08T08:04:00Z",
                    "expected_since": "2025-01-08T08:02:01Z",
                }
            ],
        }


def test_a_weekday_job_is_healthy_over_the_weekend_and_unhealthy_after_two_failed_mornings(
    clock: FakeClock,
) -> None:
    failing = {"now": False}

    @repeat_at(cron="0 9 * * MON-FRI", tz="UTC", timeout=60, name="digest")
    async def digest() -> None:
        if failing["now"]:
            raise Boom("smtp down")

    def health(client: TestClient) -> dict[str, Any]:
        response = client.get("/health/tasks")
        body: dict[str, Any] = response.json()["tasks"][0]
        assert response.status_code == (200 if body["healthy"] else 503)
        return body

    with TestClient(serve(digest)) as client:
        clock.advance_blocking(2 * DAY + HOUR)  # Wed, Thu, Fri at 09:00: ok
        clock.advance_blocking(3 * DAY - 2 * HOUR)  # Monday 07:00, three days later
        monday = health(client)
        assert monday["healthy"] is True
        assert at(monday["expected_since"]) == dt.datetime(2025, 1, 9, 9, tzinfo=UTC)  # Thu
        failing["now"] = True
        clock.advance_blocking(26 * HOUR + 59)  # Tuesday 09:00:59: Mon and Tue 09:00 failed
        assert health(client)["healthy"] is True  # Tuesday's run still has its minute
        clock.advance_blocking(1)  # Tuesday 09:01
        tuesday = health(client)

    assert tuesday["healthy"] is False
    assert at(tuesday["last_success_at"]) == dt.datetime(2025, 1, 10, 9, tzinfo=UTC)  # Fri
    assert at(tuesday["expected_since"]) == dt.datetime(2025, 1, 13, 9, tzinfo=UTC)  # Mon


def test_a_task_that_never_succeeded_is_healthy_during_its_grace_from_start(
    clock: FakeClock,
) -> None:
    @repeat_every(seconds=10 * MINUTE, wait_first=HOUR, timeout=30, name="warm-cache")
    async def warm_cache() -> None:
        raise Boom("cold")

    with TestClient(serve(warm_cache)) as client:
        clock.advance_blocking(HOUR + 20 * MINUTE + 30)  # first run at 1 h, failures since
        graced = client.get("/health/tasks").json()["tasks"][0]
        clock.advance_blocking(1)
        stale = client.get("/health/tasks").json()["tasks"][0]

    assert graced["healthy"] is True
    # The grace runs from the start plus wait_first: 09:00.
    assert graced["reason"] == "ok: no success yet; its grace runs from 2025-01-08T09:00:00+00:00"
    assert stale["healthy"] is False
    assert stale["reason"] == (
        "stale: no success since its grace began at 2025-01-08T09:00:00+00:00; one was "
        "expected since 2025-01-08T09:00:01+00:00"
    )


def test_a_task_resumed_after_a_long_pause_is_healthy_for_its_grace_from_the_resume(
    clock: FakeClock,
) -> None:
    failing = False

    @repeat_every(seconds=10 * MINUTE, timeout=30, name="sync")
    async def sync() -> None:
        if failing:
            raise Boom("down")

    with TestClient(serve(sync)) as client:
        handle = sync.handle
        assert handle is not None
        clock.advance_blocking(MINUTE)
        handle.pause()
        clock.advance_blocking(5 * HOUR)  # far longer than two periods and their budget
        handle.resume()
        failing = True
        resumed = client.get("/health/tasks").json()["tasks"][0]
        clock.advance_blocking(20 * MINUTE + 30)  # two failed ticks, the second's budget
        graced = client.get("/health/tasks").json()["tasks"][0]
        clock.advance_blocking(1)
        stale = client.get("/health/tasks").json()["tasks"][0]

    assert resumed["healthy"] is True
    assert resumed["reason"] == "ok: resumed at 2025-01-08T13:01:00+00:00; its grace runs from then"
    assert graced["healthy"] is True
    assert stale["healthy"] is False
    assert stale["reason"].startswith("stale: last success at 2025-01-08T08:00:00")


def test_staleness_replaces_the_rule_by_an_age_per_router_or_per_task(clock: FakeClock) -> None:
    @repeat_every(seconds=HOUR, name="hourly")
    async def hourly() -> None:
        pass

    @repeat_every(seconds=HOUR, name="lenient")
    async def lenient() -> None:
        pass

    app = FastAPI(lifespan=lifespan(hourly, lenient))
    app.include_router(tasks_router(staleness=dt.timedelta(minutes=30)), prefix="/strict")
    app.include_router(tasks_router(staleness={"hourly": 45 * MINUTE}), prefix="/mixed")
    with TestClient(app) as client:
        clock.advance_blocking(31 * MINUTE)
        strict = client.get("/strict/health/tasks")
        mixed = client.get("/mixed/health/tasks")
        clock.advance_blocking(15 * MINUTE)
        later = client.get("/mixed/health/tasks")

    assert strict.status_code == 503
    assert strict.json()["unhealthy"] == ["hourly", "lenient"]
    assert mixed.status_code == 200
    assert later.status_code == 503
    assert later.json()["unhealthy"] == ["hourly"]  # lenient keeps the 2-period rule


def test_a_loop_that_ran_its_repetitions_and_a_rare_cron_job_are_healthy(
    clock: FakeClock,
) -> None:
    @repeat_every(seconds=60, max_repetitions=1, name="migrate-once")
    async def migrate_once() -> None:
        pass

    @repeat_at(cron="0 0 * 2 MON#5", name="leap-monday")  # last fired in February 2016
    async def leap_monday() -> None:
        pass

    with TestClient(serve(migrate_once, leap_monday, given=[migrate_once, leap_monday])) as client:
        clock.advance_blocking(DAY)
        health = client.get("/health/tasks")

    assert health.status_code == 200
    reasons = [task["reason"] for task in health.json()["tasks"]]
    assert reasons == [
        "ok: ended (stopped, or ran its max_repetitions)",
        "ok: its schedule had no two ticks in the last 5 years",
    ]


# -- the fleet view --------------------------------------------------------------------------------


def two_workers(path: Path, fail: dict[str, bool]) -> tuple[PeriodicTask[None], ...]:
    """The same task in two "worker processes": each its own store instance on one file."""

    def worker() -> PeriodicTask[None]:
        @repeat_every(seconds=60, store=SQLiteClaimStore(path), name="export", timeout=5)
        async def export() -> None:
            if fail["now"]:
                raise Boom("warehouse refused the batch")

        return export

    return worker(), worker()


def test_a_workers_view_shows_the_fleets_last_claim_and_runs_whoever_ran_them(
    clock: FakeClock, tmp_path: Path
) -> None:
    fail = {"now": False}
    first, second = two_workers(tmp_path / "claims.db", fail)
    app = FastAPI(lifespan=lifespan(first, second))
    app.include_router(tasks_router(second))  # the second worker's view
    with TestClient(app) as client:
        clock.advance_blocking(10 * MINUTE)
        mine = client.get("/tasks/export").json()
        healthy = client.get("/health/tasks")
        fail["now"] = True
        clock.advance_blocking(MINUTE)
        failed = client.get("/tasks/export").json()
        ran = [first.handle.runs, second.handle.runs]  # type: ignore[union-attr]

    assert mine["runs"] + mine["elsewhere"] == 11  # 08:00 to 08:10, each run by one worker
    assert sum(ran) == 12
    fleet = mine["fleet"]
    assert fleet["error"] is None
    assert fleet["store"].startswith("SQLiteClaimStore(")
    assert fleet["last_claim"]["worker"] == owner()
    assert at(fleet["last_claim"]["at"]) == when(10 * MINUTE)
    assert at(fleet["last_success"]["started_at"]) == when(10 * MINUTE)
    assert fleet["last_success"]["error"] is None
    assert fleet["last_failure"] is None
    assert healthy.status_code == 200
    assert mine["health"]["reason"] == (
        f"ok: last success at 2025-01-08T08:10:00+00:00 on {owner()}"
    )
    assert failed["fleet"]["last_failure"]["error"] == "Boom: warehouse refused the batch"
    assert at(failed["fleet"]["last_failure"]["started_at"]) == when(11 * MINUTE)
    assert at(failed["fleet"]["last_success"]["started_at"]) == when(10 * MINUTE)


def test_a_success_another_host_recorded_counts_in_the_fleet_view(
    clock: FakeClock, tmp_path: Path
) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")

    @repeat_every(seconds=60, store=store, name="rotate-keys")
    async def rotate_keys() -> None:
        raise Boom("vault sealed")

    with TestClient(serve(rotate_keys)) as client:
        clock.advance_blocking(10 * MINUTE)  # every local run failed since 08:00
        stale = client.get("/tasks/rotate-keys").json()

        async def other_host() -> None:  # another host ran the 08:10 tick, well
            started = when(10 * MINUTE).timestamp()
            await store.record_run("rotate-keys", 0, started, 1.5, worker="db-2:4242")

        client.portal.call(other_host)  # type: ignore[union-attr]
        fleet = client.get("/tasks/rotate-keys").json()

    assert stale["health"]["healthy"] is False
    assert fleet["health"]["healthy"] is True
    assert fleet["fleet"]["last_success"]["worker"] == "db-2:4242"
    assert at(fleet["fleet"]["last_success"]["ended_at"]) == when(10 * MINUTE + 1.5)
    assert (
        fleet["health"]["reason"]
        == "ok: last success at 2025-01-08T08:10:01.500000+00:00 on db-2:4242"
    )
    assert fleet["last_success_at"] is None  # never in this worker


def test_an_unreachable_store_is_shown_with_its_error_and_the_routes_still_answer(
    clock: FakeClock, tmp_path: Path
) -> None:
    @repeat_every(seconds=60, name="purge", timeout=5)
    async def purge() -> None:
        pass

    broken = SQLiteClaimStore(tmp_path / "no-such-folder" / "claims.db")
    redis = RedisClaimStore("redis://:hunter2@127.0.0.1:1/0")  # nothing listens on port 1
    app = FastAPI(lifespan=lifespan(purge))
    app.include_router(tasks_router(purge, store=broken), prefix="/sqlite")
    app.include_router(tasks_router(purge, store=redis), prefix="/redis")
    with TestClient(app) as client:
        clock.advance_blocking(MINUTE)
        sqlite_view = client.get("/sqlite/tasks")
        sqlite_health = client.get("/sqlite/health/tasks")
        redis_view = client.get("/redis/tasks/purge")

    assert sqlite_view.status_code == 200
    fleet = sqlite_view.json()["tasks"][0]["fleet"]
    assert fleet["error"] == "OperationalError: unable to open database file"
    assert fleet["last_success"] is None
    assert sqlite_health.status_code == 200  # its local success at 60 s counts
    assert redis_view.status_code == 200
    assert redis_view.json()["fleet"]["error"].startswith("ConnectionError")
    assert redis_view.json()["fleet"]["store"].startswith(
        "RedisClaimStore('redis://:***@127.0.0.1:1/0'"
    )
    assert "hunter2" not in redis_view.text


def test_a_store_without_run_records_and_a_store_that_knows_nothing_yet(
    clock: FakeClock, tmp_path: Path
) -> None:
    class ClaimsOnly:
        """A store of one's own: the 3-argument claim, no run records."""

        def __init__(self) -> None:
            self.store = SQLiteClaimStore(tmp_path / "own.db")

        async def claim(self, task: str, tick: int, ttl: float) -> bool:
            return await self.store.claim(task, tick, ttl)

    @repeat_every(seconds=60, store=ClaimsOnly(), name="own-store")
    async def own_store() -> None:
        pass

    @repeat_at(cron="0 0 * * *", store=SQLiteClaimStore(tmp_path / "c.db"), name="fresh")
    async def fresh() -> None:
        pass

    with TestClient(serve(own_store, fresh)) as client:
        body = {t["name"]: t["fleet"] for t in client.get("/tasks").json()["tasks"]}

    assert body["own-store"]["error"] == "this store keeps no run records (no status())"
    assert body["fresh"]["error"] is None
    assert body["fresh"]["last_claim"] is None  # nothing happened yet: it runs at midnight
    assert body["fresh"]["last_success"] is None


async def test_a_store_that_does_not_answer_in_time_is_shown_as_such(fake_clock: FakeClock) -> None:
    class Hanging:
        """A store whose status never answers (a network partition)."""

        async def claim(self, task: str, tick: int, ttl: float) -> bool:
            return True

        async def status(self, task: str) -> object:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    @repeat_every(seconds=60, name="hung")
    async def hung() -> None:
        pass

    handle = hung()
    app = FastAPI()
    app.include_router(tasks_router(handle, store=Hanging(), store_timeout=0.05))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        response = await client.get("/tasks/hung")
    await handle.aclose()
    assert response.status_code == 200
    assert response.json()["fleet"]["error"] == "no answer from the store in 0.05 s"


# -- the control routes ----------------------------------------------------------------------------


def test_control_routes_need_an_authorize_dependency(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match=r"give authorize= a FastAPI dependency") as refused:
        tasks_router(control=True)
    assert "tasks_router(control=True, authorize=Depends(verify_token))" in str(refused.value)
    with pytest.raises(ValueError, match=r"authorize= guards the control routes"):
        tasks_router(authorize=Depends(verify_token))
    with pytest.raises(TypeError, match="not the Depends class itself"):
        tasks_router(control=True, authorize=Depends)
    with pytest.raises(TypeError, match=r"authorize must be a FastAPI dependency such as"):
        tasks_router(control=True, authorize="s3cret")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="control must be True or False"):
        tasks_router(control="yes")  # type: ignore[arg-type]


def test_without_control_there_is_no_post_route(clock: FakeClock) -> None:
    @repeat_every(seconds=60, name="quiet")
    async def quiet() -> None:
        pass

    with TestClient(serve(quiet)) as client:
        assert client.post("/tasks/quiet/run").status_code == 405
        assert client.post("/tasks/quiet/pause").status_code == 405
        paths = client.get("/openapi.json").json()["paths"]
    assert {path: sorted(paths[path]) for path in paths} == {
        "/tasks": ["get"],
        "/tasks/{name}": ["get"],
        "/health/tasks": ["get"],
    }
    assert sorted(paths["/health/tasks"]["get"]["responses"]) == ["200", "503"]


def test_the_users_dependency_refuses_callers_and_nothing_happens(clock: FakeClock) -> None:
    @repeat_every(seconds=60, name="billing")
    async def billing() -> None:
        pass

    with TestClient(serve(billing, control=True, authorize=Depends(verify_token))) as client:
        clock.run_due_blocking()
        anonymous = client.post("/tasks/billing/pause")
        wrong = client.post("/tasks/billing/run", headers={"authorization": "Bearer guess"})
        state = client.get("/tasks/billing").json()

    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 403
    assert (state["paused"], state["runs"]) == (False, 1)


def test_pause_resume_and_run_now_through_the_routes(clock: FakeClock) -> None:
    ran: list[float] = []

    @repeat_every(seconds=HOUR, name="reindex")
    async def reindex() -> None:
        ran.append(clock.now)

    # authorize may also be the dependency function itself.
    with TestClient(serve(reindex, control=True, authorize=verify_token)) as client:
        clock.run_due_blocking()
        paused = client.post("/tasks/reindex/pause", headers=ADMIN)
        clock.advance_blocking(HOUR)  # the 1 h tick is not run
        health = client.get("/health/tasks").json()
        ran_now = client.post("/tasks/reindex/run", headers=ADMIN)
        resumed = client.post("/tasks/reindex/resume", headers=ADMIN)
        clock.advance_blocking(HOUR)
        unknown = client.post("/tasks/nope/run", headers=ADMIN)

    assert paused.status_code == 200
    assert paused.json()["paused"] is True
    assert health["tasks"][0]["reason"] == "paused"
    assert health["healthy"] is True
    assert ran_now.status_code == 200
    assert ran_now.json() == {
        "task": "reindex",
        "ok": True,
        "outcome": "ok",
        "error": None,
        "attempt": 1,
        "started_at": "2025-01-08T09:00:00Z",
        "duration": 0.0,
    }
    assert resumed.json()["paused"] is False
    assert resumed.json()["paused_ticks"] == 1
    assert ran == [0, HOUR, 2 * HOUR]  # at start, run now (paused), and at 2 h
    assert unknown.status_code == 404


def test_a_run_now_whose_job_fails_answers_200_with_the_failure(clock: FakeClock) -> None:
    @repeat_every(seconds=HOUR, name="flaky", retry=Retry(attempts=2, backoff=0))
    async def flaky() -> None:
        raise Boom("nope")

    with TestClient(serve(flaky, control=True, authorize=verify_token)) as client:
        clock.run_due_blocking()
        response = client.post("/tasks/flaky/run", headers=ADMIN)
        state = client.get("/tasks/flaky").json()

    assert response.status_code == 200
    body = response.json()
    assert (body["ok"], body["outcome"], body["error"], body["attempt"]) == (
        False,
        "failed",
        "Boom('nope')",
        2,
    )
    assert (state["running"], state["runs"], state["failures"]) == (True, 2, 2)


def test_a_run_now_that_ends_a_raise_exceptions_task_answers_then_409(clock: FakeClock) -> None:
    @repeat_every(seconds=HOUR, wait_first=True, raise_exceptions=True, name="strict")
    async def strict() -> None:
        raise Boom("fatal")

    app = serve(strict, given=[strict], control=True, authorize=verify_token)
    with TestClient(app) as client:
        response = client.post("/tasks/strict/run", headers=ADMIN)
        state = client.get("/tasks/strict").json()
        again = client.post("/tasks/strict/run", headers=ADMIN)
        pause = client.post("/tasks/strict/pause", headers=ADMIN)

    assert response.status_code == 200
    assert (response.json()["outcome"], response.json()["error"]) == ("failed", "Boom('fatal')")
    assert state["running"] is False
    assert state["health"]["reason"] == "not running: its loop ended with Boom('fatal')"
    assert again.status_code == 409
    assert again.json() == {"detail": "'strict' is not running"}
    assert pause.status_code == 409


async def test_a_run_now_goes_on_when_its_caller_hangs_up(fake_clock: FakeClock) -> None:
    began = asyncio.Event()

    @repeat_every(seconds=HOUR, wait_first=True, name="long-export")
    async def long_export() -> None:
        began.set()
        await asyncio.sleep(30)

    handle = long_export()
    app = FastAPI()
    app.include_router(tasks_router(handle, control=True, authorize=verify_token))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        request = asyncio.create_task(client.post("/tasks/long-export/run", headers=ADMIN))
        await asyncio.wait_for(began.wait(), 10)  # real seconds: the request reached the job
        await fake_clock.advance(10)
        request.cancel()  # the caller hangs up mid-run
        with pytest.raises(asyncio.CancelledError):
            await request
        await fake_clock.advance(20)
    await handle.aclose()
    assert fake_clock.history.outcomes(long_export) == ["ok"]
    assert handle.runs == 1


# -- what the constructor refuses ------------------------------------------------------------------


def test_the_constructor_refuses_bad_arguments_naming_them() -> None:
    @repeat_every(seconds=60, name="a")
    async def a() -> None:
        pass

    @repeat_every(seconds=60, name="a")
    async def also_a() -> None:
        pass

    with pytest.raises(ValueError, match=r"two tasks named 'a' given to tasks_router"):
        tasks_router(a, also_a)
    with pytest.raises(TypeError, match=r"takes periodic tasks .* got 'a'"):
        tasks_router("a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"health_path '/tasks/health' lies under path"):
        tasks_router(health_path="/tasks/health")
    with pytest.raises(ValueError, match=r"path must be a URL path"):
        tasks_router(path="tasks")
    with pytest.raises(TypeError, match=r"store must have an async status\(task\)"):
        tasks_router(store=object())
    with pytest.raises(ValueError, match=r"staleness must be finite and > 0"):
        tasks_router(staleness=-1)
    with pytest.raises(TypeError, match=r"staleness\['a'\] must be a number of seconds"):
        tasks_router(staleness={"a": "1h"})  # type: ignore[dict-item]
