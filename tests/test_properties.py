"""Properties of the loop for random periods, run times, failures and first delays.

Every example runs in its own event loop (``asyncio.run``) under its own ``FakeClock``. Times
are multiples of 1/8 s, exact in binary, so the checks can use ``==``.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from repeat_every import TaskHandle, repeat_every
from repeat_every.testing import FakeClock

eighths = st.integers(min_value=0, max_value=48).map(lambda n: n / 8)


@dataclass
class Scenario:
    period: float
    durations: list[float]
    failing: list[bool]
    wait_first: bool | float
    max_repetitions: int | None
    fixed_delay: bool
    horizon: float

    @property
    def first_delay(self) -> float:
        if self.wait_first is True:
            return self.period
        return float(self.wait_first)


@dataclass
class Outcome:
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    failed: int = 0
    overlaps: int = 0
    next_run: float | None = None
    handle: TaskHandle | None = None


scenarios = st.builds(
    Scenario,
    period=st.integers(min_value=1, max_value=24).map(lambda n: n / 8),
    durations=st.lists(eighths, min_size=1, max_size=8),
    failing=st.lists(st.booleans(), min_size=1, max_size=8),
    wait_first=st.one_of(st.booleans(), eighths),
    max_repetitions=st.one_of(st.none(), st.integers(min_value=1, max_value=12)),
    fixed_delay=st.booleans(),
    horizon=st.integers(min_value=0, max_value=160).map(lambda n: n / 8),
)


def _play(scenario: Scenario) -> Outcome:
    """Run the scenario's task up to its horizon; return what happened."""
    outcome = Outcome()

    async def main() -> None:
        with FakeClock() as clock:
            active = 0

            @repeat_every(
                seconds=scenario.period,
                wait_first=scenario.wait_first,
                max_repetitions=scenario.max_repetitions,
                fixed_delay=scenario.fixed_delay,
            )
            async def job() -> None:
                nonlocal active
                n = len(outcome.starts)
                outcome.starts.append(clock.now)
                active += 1
                outcome.overlaps += active > 1
                try:
                    await clock.sleep(scenario.durations[n % len(scenario.durations)])
                finally:
                    active -= 1
                outcome.ends.append(clock.now)
                if scenario.failing[n % len(scenario.failing)]:
                    outcome.failed += 1
                    raise ValueError(n)

            handle = job()
            await clock.advance(scenario.horizon)
            outcome.next_run = handle.next_run
            outcome.handle = handle
            handle.cancel()
            await handle.wait()

    asyncio.run(main())
    return outcome


quiet = settings(deadline=None, max_examples=60, derandomize=True)


@quiet
@given(scenarios)
def test_runs_never_overlap(scenario: Scenario) -> None:
    outcome = _play(scenario)
    assert outcome.overlaps == 0
    for end, next_start in zip(outcome.ends, outcome.starts[1:], strict=False):
        assert end <= next_start


@quiet
@given(scenarios.filter(lambda s: not s.fixed_delay))
def test_fixed_rate_runs_start_on_grid_ticks_and_every_tick_is_run_or_skipped(
    scenario: Scenario,
) -> None:
    outcome = _play(scenario)
    handle = outcome.handle
    assert handle is not None
    origin, period = scenario.first_delay, scenario.period
    ticks = [(start - origin) / period for start in outcome.starts]
    # Every run starts exactly on a grid tick (never before it, never late in virtual time).
    assert all(k == int(k) and k >= 0 for k in ticks)
    indices = [int(k) for k in ticks]
    if indices:
        assert indices[0] == 0
    # No tick is run twice; the ticks between runs were counted as skipped.
    assert indices == sorted(set(indices))
    skipped_between = sum(b - a - 1 for a, b in itertools.pairwise(indices))
    expected_skipped = skipped_between
    if outcome.next_run is not None:
        upcoming = (outcome.next_run - origin) / period
        assert upcoming == int(upcoming)
        expected_skipped += int(upcoming) - (indices[-1] if indices else -1) - 1
        # Nothing due by the horizon is left unrun.
        assert outcome.next_run > scenario.horizon
    assert handle.skipped == expected_skipped
    # A skipped tick is one that a run covered: it started before the previous run ended.
    for i, (a, b) in enumerate(itertools.pairwise(indices)):
        if b - a > 1:
            assert outcome.ends[i] > origin + (b - 1) * period


@quiet
@given(scenarios.filter(lambda s: s.fixed_delay))
def test_fixed_delay_waits_a_full_period_after_each_run(scenario: Scenario) -> None:
    outcome = _play(scenario)
    if outcome.starts:
        assert outcome.starts[0] == scenario.first_delay
    for end, next_start in zip(outcome.ends, outcome.starts[1:], strict=False):
        assert next_start == end + scenario.period
    assert outcome.handle is not None
    assert outcome.handle.skipped == 0


@quiet
@given(scenarios)
def test_max_repetitions_and_failures_are_counted_exactly(scenario: Scenario) -> None:
    outcome = _play(scenario)
    handle = outcome.handle
    assert handle is not None
    limit = scenario.max_repetitions
    if limit is not None:
        assert len(outcome.starts) <= limit
        if len(outcome.ends) == limit:
            assert handle.done
            assert not handle.cancelled
    assert handle.runs == len(outcome.ends)
    assert handle.failures == outcome.failed
