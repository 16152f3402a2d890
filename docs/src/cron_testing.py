import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from repeat_every import repeat_at
from repeat_every.testing import FakeClock

PARIS = ZoneInfo("Europe/Paris")


@repeat_at(cron="0 9 * * MON-FRI", tz="Europe/Paris")
def send_digest() -> None: ...


@pytest.mark.asyncio
async def test_digest_runs_at_nine_paris_time_on_weekdays_across_the_dst_change() -> None:
    with FakeClock(start=dt.datetime(2026, 3, 25, tzinfo=dt.timezone.utc)) as clock:
        handle = send_digest()
        await clock.advance(dt.timedelta(days=8).total_seconds())
        handle.cancel()
    started = [dt.datetime.fromtimestamp(r.wall, PARIS) for r in clock.history.of(handle)]
    assert [f"{t:%a %d %H:%M}" for t in started] == [
        "Wed 25 09:00",
        "Thu 26 09:00",
        "Fri 27 09:00",
        "Mon 30 09:00",
        "Tue 31 09:00",
        "Wed 01 09:00",
    ]
