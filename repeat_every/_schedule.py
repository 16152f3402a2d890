"""When runs happen: fixed rate, fixed delay, wall-clock aligned grids (cron lives in _cron).

A `Schedule` is the immutable description given at decoration; when a task starts it
makes a `Plan`, which owns the moving parts for that one loop. All instants are integer
nanoseconds on the task's monotonic clock, so a grid never accumulates rounding error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ._durations import NS as NS
from ._durations import to_ns as to_ns

if TYPE_CHECKING:
    from ._timebase import Clock as Timebase

# How far before a deadline a wake-up still counts as on time. Clocks read as float seconds
# lose a few nanoseconds on the way back to integers; a microsecond absorbs that.
_TOLERANCE_NS = 1_000


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def wall_ns(timebase: Timebase) -> int:
    """The wall clock of ``timebase`` in integer nanoseconds since the epoch.

    ``wall()`` is a float, which near 1.7e9 s resolves about a quarter of a microsecond, and
    ``round(seconds * 1e9)`` would lose another hundred nanoseconds in the product; whole and
    fractional seconds are converted apart, so an instant the float holds exactly (a whole
    second, a quarter second) lands on its exact nanosecond.
    """
    seconds = timebase.wall()
    whole = math.floor(seconds)
    return whole * NS + round((seconds - whole) * NS)


@dataclass(slots=True)  # not frozen: frozen __init__ costs a microsecond per tick
class Tick:
    """One planned run (treat as immutable).

    ``deadline`` is the monotonic instant (ns) the run is due; ``index`` its position on the
    schedule (0 for the first tick of the loop); ``key`` an identity every process computes
    alike from the wall clock (aligned grids and cron), or ``None`` for a process-local grid.
    """

    deadline: int
    index: int
    key: int | None = None


class Plan(Protocol):
    """The ticks of one running loop."""

    def first(self, now: int) -> Tick:
        """The first tick, given the monotonic instant the loop started."""

    def after(self, tick: Tick, now: int) -> tuple[Tick, int]:
        """The next tick once ``tick``'s run ended at ``now``, and how many ticks it skipped."""

    def following(self, tick: Tick) -> int:
        """The deadline of the regular tick after ``tick`` (retries of ``tick`` stop before it)."""

    def remaining(self, tick: Tick, now: int) -> int:
        """Nanoseconds still to wait for ``tick`` after a wake-up at ``now`` (0 when due).

        Plans that follow the wall clock re-read it here, so a clock jump is noticed.
        """


class Schedule(Protocol):
    """An immutable description of when a task runs."""

    @property
    def keyed(self) -> bool:
        """Whether ticks carry a wall-clock ``key`` (required by claim stores)."""

    def plan(self, timebase: Timebase) -> Plan:
        """A fresh plan for a loop that reads time from ``timebase``."""

    def describe(self) -> str:
        """A short human description (used in logs and errors)."""

    def jitter_limit(self) -> tuple[int, str]:
        """Nanoseconds a jitter must stay below, and what that bound is (for the error)."""


class KeyedPlan(Plan, Protocol):
    """The plan of a `KeyedSchedule`: its ticks carry a ``key``."""

    def key_instant(self, key: int) -> int:
        """The wall-clock instant tick ``key`` of this plan is due, in ns since the Unix epoch
        (the same in every worker: the claim's deadline)."""


class KeyedSchedule(Schedule, Protocol):
    """A schedule whose ticks carry a wall-clock ``key`` (aligned grids and cron).

    What claim stores and catch-up need beyond the key: the instant a key stands for, the
    same in every process (computed from the key alone, never read from a clock), and the
    ticks before a given one.
    """

    def key_instant(self, key: int) -> int:
        """The wall-clock instant tick ``key`` is due, in ns since the Unix epoch."""

    def last_key_before(self, key: int, since: int) -> int | None:
        """The latest key before ``key`` due at or after ``since`` (ns since the epoch)."""


@dataclass(frozen=True)
class FixedRate:
    """Run k is due at ``start + first_delay + k × period``: lateness never accumulates.

    A run that overruns the period skips the ticks it covered; the next run starts on the
    next tick of the grid (no overlap, no burst).
    """

    period: int
    first_delay: int = 0

    @property
    def keyed(self) -> bool:
        return False

    def plan(self, timebase: Timebase) -> Plan:
        return _FixedRatePlan(self.period, self.first_delay)

    def describe(self) -> str:
        return f"every {self.period / NS:g} s (fixed rate)"

    def jitter_limit(self) -> tuple[int, str]:
        return self.period, "the period"


class _FixedRatePlan:
    __slots__ = ("_first_delay", "_origin", "_period", "_tolerance")

    def __init__(self, period: int, first_delay: int) -> None:
        self._period = period
        self._first_delay = first_delay
        self._origin = 0  # monotonic instant of tick 0, fixed by first()
        self._tolerance = min(_TOLERANCE_NS, period // 2)

    def first(self, now: int) -> Tick:
        self._origin = now + self._first_delay
        return Tick(self._origin, 0)

    def after(self, tick: Tick, now: int) -> tuple[Tick, int]:
        index = tick.index + 1
        deadline = tick.deadline + self._period
        if now - self._tolerance > deadline:  # the run overran: skip the ticks it covered
            index = _ceil_div(now - self._tolerance - self._origin, self._period)
            deadline = self._origin + index * self._period
        return Tick(deadline, index), index - tick.index - 1

    def following(self, tick: Tick) -> int:
        return tick.deadline + self._period

    def remaining(self, tick: Tick, now: int) -> int:
        return 0 if now >= tick.deadline - self._tolerance else tick.deadline - now


@dataclass(frozen=True)
class FixedDelay:
    """Each run starts ``period`` after the previous one *ended* (fastapi-utils' behaviour).

    The schedule drifts by the run time every period, and never skips.
    """

    period: int
    first_delay: int = 0

    @property
    def keyed(self) -> bool:
        return False

    def plan(self, timebase: Timebase) -> Plan:
        return _FixedDelayPlan(self.period, self.first_delay)

    def describe(self) -> str:
        return f"every {self.period / NS:g} s after the previous run ended (fixed delay)"

    def jitter_limit(self) -> tuple[int, str]:
        return self.period, "the period"


class _FixedDelayPlan:
    __slots__ = ("_first_delay", "_period", "_tolerance")

    def __init__(self, period: int, first_delay: int) -> None:
        self._period = period
        self._first_delay = first_delay
        self._tolerance = min(_TOLERANCE_NS, period // 2)

    def first(self, now: int) -> Tick:
        return Tick(now + self._first_delay, 0)

    def after(self, tick: Tick, now: int) -> tuple[Tick, int]:
        return Tick(now + self._period, tick.index + 1), 0

    def following(self, tick: Tick) -> int:
        return tick.deadline + self._period

    def remaining(self, tick: Tick, now: int) -> int:
        return 0 if now >= tick.deadline - self._tolerance else tick.deadline - now


@dataclass(frozen=True)
class AlignedRate:
    """Runs on the wall-clock multiples of ``period`` since the Unix epoch, plus ``offset``.

    ``seconds=60, align=True`` runs on every minute. Every process computes the same ticks
    from its wall clock, which is what claim stores need: the tick's ``key`` is the multiple's
    number. The wall clock is re-read after each run and each wake-up, so a clock step is
    followed (a step back waits for the wall clock to catch up; a step forward skips ticks).
    """

    period: int
    offset: int = 0

    @property
    def keyed(self) -> bool:
        return True

    def plan(self, timebase: Timebase) -> Plan:
        return _AlignedPlan(self.period, self.offset, timebase)

    def describe(self) -> str:
        return f"every {self.period / NS:g} s, aligned to the wall clock"

    def key_instant(self, key: int) -> int:
        return key * self.period + self.offset

    def last_key_before(self, key: int, since: int) -> int | None:
        return key - 1 if self.key_instant(key - 1) >= since else None

    def jitter_limit(self) -> tuple[int, str]:
        return self.period, "the period"


class _AlignedPlan:
    __slots__ = ("_offset", "_period", "_timebase", "_tolerance")

    def __init__(self, period: int, offset: int, timebase: Timebase) -> None:
        self._period = period
        self._offset = offset
        self._timebase = timebase
        self._tolerance = min(_TOLERANCE_NS, period // 2)

    def _wall(self) -> int:
        return wall_ns(self._timebase) - self._offset

    def _tick(self, key: int, now: int, wall: int, index: int) -> Tick:
        return Tick(now + key * self._period - wall, index, key)

    def first(self, now: int) -> Tick:
        wall = self._wall()
        return self._tick(_ceil_div(wall - self._tolerance, self._period), now, wall, 0)

    def after(self, tick: Tick, now: int) -> tuple[Tick, int]:
        assert tick.key is not None
        wall = self._wall()
        key = max(tick.key + 1, _ceil_div(wall - self._tolerance, self._period))
        return self._tick(key, now, wall, tick.index + key - tick.key), key - tick.key - 1

    def following(self, tick: Tick) -> int:
        return tick.deadline + self._period

    def key_instant(self, key: int) -> int:
        return key * self._period + self._offset

    def remaining(self, tick: Tick, now: int) -> int:
        assert tick.key is not None
        late = self._wall() - tick.key * self._period
        return 0 if late >= -self._tolerance else -late
