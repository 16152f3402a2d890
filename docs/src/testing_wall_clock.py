import datetime as dt

import pytest
import time_machine
from freezegun import freeze_time
from myapp.jobs import remove_expired_tokens, send_digest, tokens

from repeat_every import run_tasks
from repeat_every.testing import FakeClock

UTC = dt.timezone.utc


# --8<-- [start:freezegun]
@pytest.mark.asyncio
async def test_expired_tokens_go_at_the_next_hour_with_freezegun() -> None:
    tokens["ci"] = dt.datetime(2025, 1, 6, 9, 30, tzinfo=UTC)
    with freeze_time("2025-01-06 08:00:00"), FakeClock() as clock:
        async with run_tasks(remove_expired_tokens):
            await clock.advance(60 * 60)  # 09:00
            assert "ci" in tokens
            await clock.advance(60 * 60)  # 10:00
            assert "ci" not in tokens


# --8<-- [end:freezegun]
# --8<-- [start:time_machine]
@pytest.mark.asyncio
async def test_expired_tokens_go_at_the_next_hour_with_time_machine() -> None:
    tokens["ci"] = dt.datetime(2025, 1, 6, 9, 30, tzinfo=UTC)
    start = dt.datetime(2025, 1, 6, 8, tzinfo=UTC)
    with time_machine.travel(start, tick=False), FakeClock() as clock:
        async with run_tasks(remove_expired_tokens):
            await clock.advance(60 * 60)  # 09:00
            assert "ci" in tokens
            await clock.advance(60 * 60)  # 10:00
            assert "ci" not in tokens


# --8<-- [end:time_machine]
# --8<-- [start:cron]
@pytest.mark.asyncio
async def test_digest_goes_out_at_nine_in_paris_across_the_dst_change() -> None:
    friday = dt.datetime(2025, 3, 28, 12, tzinfo=UTC)  # clocks go forward on Sunday 30 March
    with FakeClock(start=friday) as clock:
        async with run_tasks(send_digest):
            await clock.advance(5 * 24 * 60 * 60)  # to Wednesday noon

    sent = [record.wall_started for record in clock.history.of(send_digest)]
    assert sent == [
        dt.datetime(2025, 3, 31, 7, tzinfo=UTC),  # Monday 09:00 in Paris (UTC+2 from Sunday)
        dt.datetime(2025, 4, 1, 7, tzinfo=UTC),
        dt.datetime(2025, 4, 2, 7, tzinfo=UTC),
    ]


# --8<-- [end:cron]
