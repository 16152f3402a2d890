import datetime as dt

import pytest
from myapp.jobs import remove_expired_tokens, tokens

from repeat_every import run_tasks
from repeat_every.testing import FakeClock


@pytest.mark.asyncio  # pytest-asyncio's default strict mode needs it on async tests
async def test_cleanup_runs_every_hour(fake_clock: FakeClock) -> None:
    async with run_tasks(remove_expired_tokens) as (handle,):
        await fake_clock.advance(3 * 60 * 60)  # three virtual hours, in milliseconds

        assert handle.runs == 4  # at 0 h, 1 h, 2 h and 3 h
        assert fake_clock.history.started(remove_expired_tokens) == [0, 3600, 7200, 10800]
        assert handle.next_run == 4 * 3600


@pytest.mark.asyncio
async def test_a_token_is_removed_by_the_first_cleanup_after_it_expires() -> None:
    start = dt.datetime(2025, 1, 6, 8, 0, tzinfo=dt.timezone.utc)
    tokens["ci"] = start + dt.timedelta(minutes=90)  # expires at 09:30
    with FakeClock(start=start) as clock:  # datetime.now() follows the virtual clock
        async with run_tasks(remove_expired_tokens):
            await clock.advance(2 * 60 * 60 - 1)  # 09:59:59: expired, but not removed yet
            assert "ci" in tokens
            await clock.advance(1)  # 10:00: the clean-up runs
            assert "ci" not in tokens
