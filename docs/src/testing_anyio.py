import pytest
from myapp.jobs import remove_expired_tokens

from repeat_every import run_tasks
from repeat_every.testing import FakeClock


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # repeat-every runs on asyncio only: not on AnyIO's trio backend


@pytest.mark.anyio
async def test_cleanup_runs_every_hour_under_anyio(fake_clock: FakeClock) -> None:
    async with run_tasks(remove_expired_tokens) as (handle,):
        await fake_clock.advance(3 * 60 * 60)
    assert handle.runs == 4
