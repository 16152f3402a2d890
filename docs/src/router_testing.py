import pytest
import router_app
from fastapi.testclient import TestClient

from repeat_every.testing import FakeClock

HOUR = 60 * 60
ADMIN = {"authorization": f"Bearer {router_app.ADMIN_TOKEN}"}


def refuse() -> None:
    raise ConnectionError("warehouse unreachable")


def test_the_health_check_names_the_export_once_two_exports_in_a_row_failed(
    fake_clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(router_app.app) as client:
        fake_clock.run_due_blocking()  # the export at start succeeds
        assert client.get("/health/tasks").status_code == 200

        monkeypatch.setattr(router_app, "send_to_warehouse", refuse)
        fake_clock.advance_blocking(2 * HOUR + 10 * 60)  # 1 h and 2 h failed; 2 h had 10 min
        assert client.get("/health/tasks").status_code == 200  # not yet past its timeout
        fake_clock.advance_blocking(1)
        health = client.get("/health/tasks")
        assert health.status_code == 503
        assert health.json()["unhealthy"] == ["export-invoices"]
        state = client.get("/tasks/export-invoices").json()
        assert state["last_error"] == "ConnectionError('warehouse unreachable')"


def test_running_the_export_now_needs_the_token(fake_clock: FakeClock) -> None:
    with TestClient(router_app.app) as client:
        fake_clock.run_due_blocking()
        assert client.post("/tasks/export-invoices/run").status_code == 401
        response = client.post("/tasks/export-invoices/run", headers=ADMIN)
        assert response.status_code == 200
        assert response.json()["ok"] is True
        assert client.get("/tasks/export-invoices").json()["runs"] == 2
