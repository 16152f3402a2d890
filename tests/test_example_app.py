"""The demo app (examples/tokens_app): a real FastAPI app on a real SQLite file, under TestClient.

Virtual time starts on Monday 2025-01-06 at 07:30 UTC (08:30 in Paris). The clean-up runs on
the hour (a claim store aligns it to the wall clock), the report at 09:00 Paris time (08:00
UTC in winter). The last test runs the demo command itself with four worker processes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from servers import free_port
from sqlalchemy import create_engine, text

from examples.tokens_app.__main__ import SEED, seed
from examples.tokens_app.db import create_tables
from examples.tokens_app.main import create_app
from examples.tokens_app.settings import Settings
from repeat_every.testing import FakeClock

UTC = dt.timezone.utc
START = dt.datetime(2025, 1, 6, 7, 30, tzinfo=UTC)
MINUTE = 60
HOUR = 60 * MINUTE
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'tokens.db'}",
        claims_path=tmp_path / "claims.db",
        cleanup_seconds=HOUR,
        report_cron="0 9 * * MON-FRI",
        report_tz="Europe/Paris",
    )


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    with FakeClock(start=START) as clock:
        yield clock


def stored(client: TestClient) -> dict[str, bool]:
    """Name → expired, for every token still in the database."""
    response = client.get("/tokens")
    assert response.status_code == 200
    return {token["name"]: token["expired"] for token in response.json()}


def tasks(client: TestClient) -> dict[str, dict[str, Any]]:
    response = client.get("/tasks")
    assert response.status_code == 200
    return {state["name"]: state for state in response.json()["tasks"]}


def at(value: object) -> dt.datetime:
    assert isinstance(value, str)
    # Pydantic writes UTC as "Z", which datetime.fromisoformat reads only from Python 3.11.
    return dt.datetime.fromisoformat(
        value.removesuffix("Z") + "+00:00" if value.endswith("Z") else value
    )


def test_expired_tokens_are_removed_by_the_first_hourly_cleanup_after_their_expiry(
    settings: Settings, clock: FakeClock
) -> None:
    with TestClient(create_app(settings)) as client:
        clock.run_due_blocking()
        for name, minutes in [("a", 20), ("b", 45), ("c", 100), ("d", 24 * 60)]:
            response = client.post("/tokens", json={"name": name, "lifetime_seconds": minutes * 60})
            assert response.status_code == 201
            assert at(response.json()["expires_at"]) == START + dt.timedelta(minutes=minutes)
        assert stored(client) == {"a": False, "b": False, "c": False, "d": False}

        clock.advance_blocking(29 * MINUTE)  # 07:59: "a" expired at 07:50, not removed yet
        assert stored(client) == {"a": True, "b": False, "c": False, "d": False}
        clock.advance_blocking(1 * MINUTE)  # 08:00: the first clean-up
        assert stored(client) == {"b": False, "c": False, "d": False}
        clock.advance_blocking(59 * MINUTE)  # 08:59: "b" expired at 08:15
        assert stored(client) == {"b": True, "c": False, "d": False}
        clock.advance_blocking(1 * MINUTE)  # 09:00
        assert stored(client) == {"c": False, "d": False}
        clock.advance_blocking(1 * HOUR)  # 10:00: "c" expired at 09:10
        assert stored(client) == {"d": False}

    assert clock.history.started("remove_expired_tokens") == [
        30 * MINUTE,
        90 * MINUTE,
        150 * MINUTE,
    ]
    assert clock.history.outcomes("remove_expired_tokens") == ["ok", "ok", "ok"]


def test_tasks_endpoint_reports_runs_and_next_runs_of_both_jobs(
    settings: Settings, clock: FakeClock
) -> None:
    with TestClient(create_app(settings)) as client:
        clock.run_due_blocking()
        before = tasks(client)
        assert before["remove_expired_tokens"]["runs"] == 0
        assert at(before["remove_expired_tokens"]["next_run_at"]) == dt.datetime(
            2025, 1, 6, 8, tzinfo=UTC
        )
        assert at(before["report_tokens"]["next_run_at"]) == dt.datetime(2025, 1, 6, 8, tzinfo=UTC)

        clock.advance_blocking(2 * HOUR + 30 * MINUTE)  # 10:00 UTC, 11:00 in Paris
        after = tasks(client)
        cleanup, report = after["remove_expired_tokens"], after["report_tokens"]
        assert (cleanup["runs"], cleanup["failures"], cleanup["last_error"]) == (3, 0, None)
        assert cleanup["running"] is True
        assert at(cleanup["last_started_at"]) == dt.datetime(2025, 1, 6, 10, tzinfo=UTC)
        assert at(cleanup["next_run_at"]) == dt.datetime(2025, 1, 6, 11, tzinfo=UTC)
        assert report["runs"] == 1  # 09:00 Paris; the next is Tuesday at 09:00 Paris
        assert at(report["next_run_at"]) == dt.datetime(2025, 1, 7, 8, tzinfo=UTC)
        assert client.get("/tasks").json()["worker"] == f"{socket.gethostname()}:{os.getpid()}"


def test_each_run_logs_what_it_did(
    settings: Settings, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="examples.tokens_app")
    with TestClient(create_app(settings)) as client:
        clock.run_due_blocking()
        client.post("/tokens", json={"name": "short", "lifetime_seconds": 10 * MINUTE})
        clock.advance_blocking(90 * MINUTE)  # 09:00: clean-ups at 08:00 and 09:00

    messages = [r.getMessage() for r in caplog.records if r.name == "examples.tokens_app"]
    assert [m for m in messages if m.startswith("remove_expired_tokens")] == [
        "remove_expired_tokens: removed 1 expired token(s)",
        "remove_expired_tokens: removed 0 expired token(s)",
    ]
    assert [m for m in messages if m.startswith("report_tokens")] == [
        "report_tokens: 0 valid token(s), 0 expiring within 24 h"
    ]


def test_a_failing_cleanup_is_reported_by_the_tasks_endpoint_and_the_next_hour_recovers(
    settings: Settings, clock: FakeClock
) -> None:
    engine = create_engine(settings.database_url)
    with TestClient(create_app(settings)) as client:
        clock.run_due_blocking()
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE tokens"))  # the clean-up at 08:00 fails
        clock.advance_blocking(30 * MINUTE)
        failed = tasks(client)["remove_expired_tokens"]
        assert (failed["runs"], failed["failures"]) == (1, 1)
        assert "no such table: tokens" in failed["last_error"]
        assert failed["running"] is True

        create_tables(engine)
        clock.advance_blocking(1 * HOUR)
        recovered = tasks(client)["remove_expired_tokens"]
        assert (recovered["runs"], recovered["failures"]) == (2, 1)
    engine.dispose()
    assert clock.history.outcomes("remove_expired_tokens") == ["failed", "ok"]


def test_metrics_count_the_runs_by_outcome_and_the_last_success(
    settings: Settings, clock: FakeClock
) -> None:
    engine = create_engine(settings.database_url)
    with TestClient(create_app(settings)) as client:
        clock.advance_blocking(1 * HOUR)  # 08:30: the 08:00 clean-up and report succeeded
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE tokens"))  # the 09:00 clean-up fails
        clock.advance_blocking(1 * HOUR)
        response = client.get("/metrics")
    engine.dispose()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    series = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line and not line.startswith("#")
    }
    cleanup = 'task="remove_expired_tokens"'
    assert series[f'repeat_every_runs_total{{outcome="ok",{cleanup}}}'] == 1
    assert series[f'repeat_every_runs_total{{outcome="failed",{cleanup}}}'] == 1
    assert series['repeat_every_runs_total{outcome="ok",task="report_tokens"}'] == 1
    assert series[f"repeat_every_last_success_timestamp_seconds{{{cleanup}}}"] == (
        dt.datetime(2025, 1, 6, 8, tzinfo=UTC).timestamp()
    )
    assert series[f"repeat_every_runs_in_progress{{{cleanup}}}"] == 0


def test_two_app_instances_sharing_the_claim_store_run_each_tick_once(
    settings: Settings, clock: FakeClock
) -> None:
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        clock.advance_blocking(3 * HOUR)  # clean-ups at 08:00, 09:00, 10:00
        states = [tasks(first)["remove_expired_tokens"], tasks(second)["remove_expired_tokens"]]
    assert sum(int(s["runs"]) for s in states) == 3
    assert sum(int(s["elsewhere"]) for s in states) == 3
    # Both instances see the fleet's last run, whichever of them ran it.
    for state in states:
        assert at(state["fleet"]["last_success"]["started_at"]) == dt.datetime(
            2025, 1, 6, 10, tzinfo=UTC
        )
    assert len(clock.history.of("remove_expired_tokens")) == 3


def test_health_is_200_while_the_jobs_succeed_and_503_naming_a_cleanup_failing_twice(
    settings: Settings, clock: FakeClock
) -> None:
    engine = create_engine(settings.database_url)
    with TestClient(create_app(settings)) as client:
        clock.advance_blocking(2 * HOUR)  # 09:30: clean-ups at 08:00 and 09:00, report at 08:00
        healthy = client.get("/health/tasks")
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE tokens"))  # 10:00 and 11:00 fail
        clock.advance_blocking(90 * MINUTE)  # 11:00
        one_failure_later = client.get("/health/tasks")
        clock.advance_blocking(1 * MINUTE)  # 11:01: the 11:00 run had its minute
        unhealthy = client.get("/health/tasks")
        cleanup = tasks(client)["remove_expired_tokens"]
    engine.dispose()

    assert healthy.status_code == 200
    assert healthy.json()["unhealthy"] == []
    assert one_failure_later.status_code == 200  # 10:00 failed, but 11:00 may recover
    assert unhealthy.status_code == 503
    assert unhealthy.json()["unhealthy"] == ["remove_expired_tokens"]
    assert unhealthy.json()["detail"].startswith(
        "1 of 2 task(s) unhealthy: remove_expired_tokens: stale: last success at "
        "2025-01-06T09:00:00"
    )
    # The claim store's records: the last failure, with the worker that ran it.
    failure = cleanup["fleet"]["last_failure"]
    assert "no such table: tokens" in failure["error"]
    assert failure["worker"] == f"{socket.gethostname()}:{os.getpid()}"
    assert at(failure["started_at"]) == dt.datetime(2025, 1, 6, 11, tzinfo=UTC)
    assert at(cleanup["fleet"]["last_success"]["started_at"]) == dt.datetime(
        2025, 1, 6, 9, tzinfo=UTC
    )


def test_the_control_routes_are_off_without_an_admin_token_and_need_it_when_on(
    settings: Settings, clock: FakeClock
) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.post("/tasks/remove_expired_tokens/run").status_code == 405

    admin = dataclasses.replace(settings, admin_token="let-me-in")
    with TestClient(create_app(admin)) as client:
        clock.run_due_blocking()
        client.post("/tokens", json={"name": "brief", "lifetime_seconds": 60})
        clock.advance_blocking(2 * MINUTE)  # 07:32: "brief" has expired
        anonymous = client.post("/tasks/remove_expired_tokens/run")
        wrong = client.post(
            "/tasks/remove_expired_tokens/run", headers={"authorization": "Bearer guess"}
        )
        assert stored(client) == {"brief": True}
        ran = client.post(
            "/tasks/remove_expired_tokens/run", headers={"authorization": "Bearer let-me-in"}
        )
        assert stored(client) == {}
        paused = client.post(
            "/tasks/report_tokens/pause", headers={"authorization": "Bearer let-me-in"}
        )

    assert anonymous.status_code == 401
    assert wrong.status_code == 403
    assert ran.status_code == 200
    assert (ran.json()["task"], ran.json()["ok"]) == ("remove_expired_tokens", True)
    assert paused.json()["paused"] is True


def test_a_token_needs_a_positive_lifetime(settings: Settings, clock: FakeClock) -> None:
    with TestClient(create_app(settings)) as client:
        response = client.post("/tokens", json={"name": "x", "lifetime_seconds": 0})
        assert response.status_code == 422
        assert stored(client) == {}


# -- the demo command, for real --------------------------------------------------------------------

RUN_LINE = re.compile(
    r"^\S+ (\d\d):(\d\d):(\d\d),(\d{3}) INFO +\[(\d+)\] examples\.tokens_app: "
    r"remove_expired_tokens: removed"
)


def test_the_demo_command_seeds_its_tokens_once_however_often_it_restarts(
    settings: Settings,
) -> None:
    seed(settings.database_url)
    seed(settings.database_url)  # a restart: the database file is still there
    engine = create_engine(settings.database_url)
    with engine.connect() as db:
        names = sorted(db.scalars(text("SELECT name FROM tokens")))
    engine.dispose()
    assert names == sorted(name for name, _ in SEED)


@pytest.mark.slow
def test_demo_command_with_four_workers_runs_each_cleanup_tick_once(tmp_path: Path) -> None:
    port = free_port()
    period = 1.0
    log_path = tmp_path / "demo.log"
    env = {**os.environ, "DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "examples.tokens_app", "--port", str(port), "--workers", "4"]
    command += ["--cleanup-seconds", str(period)]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/tasks", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                pytest.fail(f"the demo did not answer in 30 s:\n{log_path.read_text()}")
            time.sleep(4 * period)
            # Whichever worker answers, the store's records show the fleet's last clean-up.
            answers = [
                httpx.get(f"http://127.0.0.1:{port}/tasks", timeout=5).json() for _ in range(8)
            ]
            health = httpx.get(f"http://127.0.0.1:{port}/health/tasks", timeout=5)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)

    text = log_path.read_text()
    runs: list[tuple[int, float]] = []
    for line in text.splitlines():
        if match := RUN_LINE.match(line):
            hh, mm, ss, ms, pid = (int(g) for g in match.groups())
            runs.append((pid, hh * 3600 + mm * 60 + ss + ms / 1000))
    ticks = Counter(round(seconds / period) for _, seconds in runs)
    assert len(ticks) >= 3, text
    assert max(ticks.values()) == 1, f"a tick ran more than once: {ticks}\n{text}"
    assert text.count("Application startup complete") == 4
    assert health.status_code == 200, health.text
    for answer in answers:
        (cleanup,) = [t for t in answer["tasks"] if t["name"] == "remove_expired_tokens"]
        last = cleanup["fleet"]["last_success"]
        assert last is not None, answer
        assert int(last["worker"].rsplit(":", 1)[1]) in {pid for pid, _ in runs}
