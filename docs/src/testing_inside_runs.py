import asyncio

import pytest
import tenacity

from repeat_every import repeat_every
from repeat_every.testing import FakeClock

calls: list[float] = []


async def fetch_rates() -> dict[str, float]:
    """Stand-in for an HTTP call to a partner: down twice, then up."""
    calls.append(asyncio.get_running_loop().time())  # virtual inside a run
    if len(calls) <= 2:
        raise ConnectionError("partner API unreachable")
    return {"EUR": 1.0}


@repeat_every(seconds=60 * 60)
async def refresh_rates() -> None:
    async for attempt in tenacity.AsyncRetrying(
        wait=tenacity.wait_fixed(20), stop=tenacity.stop_after_attempt(3)
    ):
        with attempt:
            await fetch_rates()


@pytest.mark.asyncio
async def test_rates_are_retried_after_20_s_each(fake_clock: FakeClock) -> None:
    calls.clear()
    handle = refresh_rates()
    await fake_clock.advance(60)  # tenacity's own asyncio.sleep(20) takes virtual time
    assert calls == [0.0, 20.0, 40.0]  # failed, failed, succeeded
    assert fake_clock.history.outcomes(refresh_rates) == ["ok"]
    await handle.aclose()


never_answers = asyncio.Event()


@repeat_every(seconds=60)
async def ping_partner() -> None:
    async with asyncio.timeout(10):  # Python ≥ 3.11; asyncio.wait_for works the same way
        await never_answers.wait()


@pytest.mark.asyncio
async def test_a_hanging_call_times_out_after_10_virtual_seconds(fake_clock: FakeClock) -> None:
    handle = ping_partner()
    await fake_clock.advance(10)
    (record,) = fake_clock.history.of(ping_partner)
    assert (record.outcome, record.started, record.ended) == ("failed", 0.0, 10.0)
    assert isinstance(record.exception, TimeoutError)
    await handle.aclose()
