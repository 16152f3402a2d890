from collections.abc import Callable

import pytest

from repeat_every import repeat_every
from repeat_every.testing import FakeClock

PERIOD = 60.0  # any period: virtual time costs nothing


@pytest.fixture(params=["def", "async def"])
def as_job(request: pytest.FixtureRequest) -> Callable[[Callable[[], None]], Callable[[], object]]:
    """Turns a body into a ``def`` job or an ``async def`` job: every test runs with both."""

    def make(body: Callable[[], None]) -> Callable[[], object]:
        if request.param == "def":
            return lambda: body()

        async def job() -> None:
            body()

        return job

    return make


@pytest.mark.asyncio
async def test_max_repetitions_runs_one_period_apart_then_on_complete(
    fake_clock: FakeClock, as_job: Callable[[Callable[[], None]], Callable[[], object]]
) -> None:
    completed_at: list[float] = []
    task = repeat_every(
        seconds=PERIOD, max_repetitions=3, on_complete=lambda: completed_at.append(fake_clock.now)
    )(as_job(lambda: None))

    handle = task()
    await fake_clock.advance(10 * PERIOD)
    await handle.wait()  # the loop ended by itself

    assert fake_clock.history.started(task) == [0, PERIOD, 2 * PERIOD]
    assert completed_at == [2 * PERIOD]  # right after the last run, not a period later


@pytest.mark.asyncio
async def test_wait_first_delays_the_first_run_by_that_many_seconds(
    fake_clock: FakeClock, as_job: Callable[[Callable[[], None]], Callable[[], object]]
) -> None:
    task = repeat_every(seconds=PERIOD, max_repetitions=3, wait_first=PERIOD)(as_job(lambda: None))

    handle = task()
    await fake_clock.advance(10 * PERIOD)
    await handle.wait()

    assert fake_clock.history.started(task) == [PERIOD, 2 * PERIOD, 3 * PERIOD]


def fail() -> None:
    raise ValueError("job failed")


@pytest.mark.asyncio
async def test_an_on_exception_hook_that_raises_ends_the_loop_with_its_exception(
    fake_clock: FakeClock, as_job: Callable[[Callable[[], None]], Callable[[], object]]
) -> None:
    def stop_on_failure(exc: Exception) -> None:
        raise RuntimeError("giving up") from exc

    task = repeat_every(seconds=PERIOD, max_repetitions=3, on_exception=stop_on_failure)(
        as_job(fail)
    )

    handle = task()
    await fake_clock.advance(10 * PERIOD)
    with pytest.raises(RuntimeError, match="giving up"):
        await handle.wait()
    assert fake_clock.history.outcomes(task) == ["failed"]  # one run, no more


@pytest.mark.asyncio
async def test_an_on_exception_hook_that_returns_keeps_the_loop_going(
    fake_clock: FakeClock, as_job: Callable[[Callable[[], None]], Callable[[], object]]
) -> None:
    seen: list[str] = []
    task = repeat_every(
        seconds=PERIOD, max_repetitions=3, on_exception=lambda exc: seen.append(str(exc))
    )(as_job(fail))

    handle = task()
    await fake_clock.advance(10 * PERIOD)
    await handle.wait()  # failures handled by the hook do not end the loop

    assert fake_clock.history.outcomes(task) == ["failed"] * 3
    assert fake_clock.history.started(task) == [0, PERIOD, 2 * PERIOD]
    assert seen == ["job failed"] * 3
    assert (handle.runs, handle.failures) == (3, 3)
