import logging
from collections.abc import Awaitable, Callable, Iterator

import pytest
from myapp import jobs

from repeat_every import run_tasks
from repeat_every.testing import FakeClock


def partner_answering(*answers: str) -> Callable[[], Awaitable[None]]:
    """A stand-in for jobs.call_partner that is up or down as told, one answer per call."""
    script: Iterator[str] = iter(answers)

    async def call_partner() -> None:
        if next(script) == "down":
            raise ConnectionError("partner API unreachable")

    return call_partner


@pytest.mark.asyncio
async def test_a_failed_attempt_is_retried_with_backoff_and_logged(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = partner_answering("down", "down", "up", "down", "down", "down")
    monkeypatch.setattr(jobs, "call_partner", answers)

    async with run_tasks(jobs.sync_orders) as (handle,):
        await fake_clock.advance(60 * 60 + 30)  # the runs due at 0 s and 3600 s, and retries

    history = fake_clock.history.of(jobs.sync_orders)
    assert [(r.index, r.attempt, r.started, r.outcome) for r in history] == [
        (0, 1, 0, "failed"),  # the run due at 0...
        (0, 2, 10, "failed"),  # ...is retried 10 s later...
        (0, 3, 30, "ok"),  # ...and 20 s after that: it succeeds.
        (1, 1, 3600, "failed"),  # The next run fails all three attempts.
        (1, 2, 3610, "failed"),
        (1, 3, 3630, "failed"),
    ]
    assert (handle.runs, handle.failures, handle.retries) == (2, 1, 4)
    assert isinstance(handle.last_exception, ConnectionError)

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"{jobs.sync_orders.name}: run 1 failed: ConnectionError('partner API unreachable')"
    ]
