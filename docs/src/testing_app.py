from fastapi.testclient import TestClient
from myapp.main import app, refresh_stats

from repeat_every.testing import FakeClock


def test_stats_are_refreshed_every_30_seconds(fake_clock: FakeClock) -> None:
    with TestClient(app) as client:  # runs the app, and starts its tasks, in another thread
        fake_clock.run_due_blocking()  # let the run due at startup finish
        assert client.get("/stats").json() == {"refreshes": 1}

        fake_clock.advance_blocking(90)  # a plain def test uses the *_blocking methods
        assert client.get("/stats").json() == {"refreshes": 4}
        assert fake_clock.history.started(refresh_stats) == [0, 30, 60, 90]
    # leaving the block ran the app's shutdown, which stopped the task
