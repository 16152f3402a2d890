"""The cron schedule behind ``@repeat_at(cron=..., tz=...)``: fire times in a time zone.

Parsing and evaluating the expression is cronsim's job (https://github.com/cuu508/cronsim;
docs/cron.md says why cronsim and not croniter). It is imported when a cron schedule is
created, never by ``import repeat_every``. This module turns its answers into ticks: the key of
a tick is the fire time in whole seconds since the Unix epoch, so every process computes the
same keys (what claim stores need), and its deadline is that instant moved onto the task's
monotonic clock.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._schedule import _TOLERANCE_NS, NS, Plan, Tick, wall_ns

if TYPE_CHECKING:
    from ._timebase import Clock as Timebase

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_SECOND = dt.timedelta(seconds=1)
_REFERENCE = 978_307_200  # 2001-01-01T00:00:00Z: where checks at decoration start counting

# Shorthands of Vixie cron that cronsim does not read itself; each is exactly its expansion.
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_FIELDS = "minute hour day-of-month month day-of-week"

# Counting the fire times a run (or a wall-clock jump) skipped walks them one by one; past this
# many the count stops, so a clock that leaps a year ahead cannot stall the event loop.
_MAX_COUNTED_SKIPS = 10_000

# How many fire times the jitter check looks at (see Cron.jitter_limit).
_JITTER_SAMPLE = 64


def _epoch_seconds(instant: dt.datetime) -> int:
    """Whole seconds since the Unix epoch of an aware datetime (exact, no float)."""
    return (instant - _EPOCH) // _SECOND


@dataclass(frozen=True)
class Cron:
    """Run at the fire times of a five-field cron ``expression``, read in the zone ``tz``.

    Users may rely on:

    - **Fields.** ``minute hour day-of-month month day-of-week``, as in Debian's crontab(5):
      lists, ranges, steps, ``JAN``–``DEC`` and ``SUN``–``SAT`` (any case), ``L`` (last day
      of the month), ``LW`` (its last weekday), ``MON#2`` (second Monday), ``5L`` (last
      Friday); when both day fields are restricted, a day matching either one fires.
      ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly`` are accepted. Six-field
      (seconds) forms are refused: libraries disagree on where the seconds go, and a misread
      expression would run at the wrong times.
    - **Time zones and DST** (the rule of Debian's cron, which cronsim implements): a job with
      a fixed minute and hour (both fields without a leading ``*``) runs at that local time
      every day it matches. When that time does not exist (clocks spring forward over it) it
      runs once at the first instant after the gap (02:30 → 03:00 in Paris); when it happens
      twice (clocks fall back) it runs once, at the first of the two. Any other job (``*`` or
      ``*/n`` in the minute or hour field) follows elapsed time: an hourly job runs every real
      hour, twice at 02:00 when clocks fall back and not at all during the missing hour.
    - **Wall clock.** The next fire time is computed from the task's wall clock
      (``time.time()``, or a ``FakeClock``'s virtual one) and re-read after every wake-up:
      a wall clock that steps back delays the run until the fire time comes round; one that
      steps forward makes the run due at once and the fire times it jumped over are counted
      as skipped. A jump that happens while the task sleeps is noticed when that sleep ends.
    - **Keys.** A tick's ``key`` is its fire time in whole seconds since the Unix epoch (UTC),
      so processes sharing a claim store agree on it whatever their local zone.
    """

    expression: str
    """The expression as given (a macro such as ``@daily`` included)."""
    tz: dt.tzinfo
    """The zone the fields are read in."""
    fields: str = field(init=False, repr=False, compare=False)
    """The five fields cronsim evaluates (a macro expanded, spaces normalised)."""

    def __post_init__(self) -> None:
        if not isinstance(self.tz, dt.tzinfo):
            raise TypeError(f"Cron(tz=...) must be a datetime.tzinfo, not {self.tz!r}")
        object.__setattr__(self, "fields", _check_expression(self.expression))

    @property
    def keyed(self) -> bool:
        """Always true: every process computes the same fire times from its wall clock."""
        return True

    def plan(self, timebase: Timebase) -> Plan:
        """A plan that reads the wall clock of ``timebase``."""
        return _CronPlan(self, timebase)

    def describe(self) -> str:
        """For example ``cron '0 9 * * MON-FRI' in Europe/Paris``."""
        return f"cron {self.expression!r} in {_zone_name(self.tz)}"

    def jitter_limit(self) -> tuple[int, str]:
        """The shortest gap between two fire times: a longer jitter would skip ticks.

        The gaps are measured over the first fire times after a fixed date, so the check does
        not depend on when the program starts; a schedule whose gaps vary more than that
        sample shows is still safe at run time: a jittered run that lands past the next fire
        time makes that fire time count as skipped, logged, like an overrun.
        """
        keys = itertools.islice(self._fire_times(_REFERENCE), _JITTER_SAMPLE)
        gap = min(b - a for a, b in itertools.pairwise(sorted(set(keys))))
        return gap * NS, f"the shortest gap between two fire times of {self.describe()}"

    def next_after(self, when: dt.datetime) -> dt.datetime:
        """The first fire time strictly after ``when`` (naive means UTC), in `tz`.

        Handy to check a schedule by hand: ``task.schedule.next_after(datetime.now(UTC))``.
        """
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        floor = _epoch_seconds(when.replace(microsecond=0))
        key = self._first_at_or_after(floor + 1)
        return dt.datetime.fromtimestamp(key, self.tz)

    def key_instant(self, key: int) -> int:
        """A tick key (epoch seconds) as ns since the epoch."""
        return key * NS

    def last_key_before(self, key: int, since: int) -> int | None:
        """The latest fire time before ``key`` and at or after ``since`` (ns), or ``None``.

        Looks back over a window that grows fourfold from a minute, so a frequent schedule
        with a long ``since`` costs a few fire times, not every one since then.
        """
        window = 60 * NS
        while True:
            low = max(since, key * NS - window)
            last = None
            for fire in self._fire_times(-(-low // NS) - 1):
                if fire >= key:
                    break
                if fire * NS >= low:
                    last = fire
            if last is not None or low == since:
                return last
            window *= 4

    # -- in epoch seconds, for the plan -----------------------------------------------------

    def _fire_times(self, after: int) -> Iterator[int]:
        """Fire times (epoch seconds) from cronsim, starting just after ``after``.

        In Debian's DST handling cronsim walks local time, so right after clocks fall back it
        may answer the first occurrence of a repeated hour, which lies before ``after``;
        callers skip such answers (that occurrence already had its chance).
        """
        from cronsim import CronSim

        start = dt.datetime.fromtimestamp(after, self.tz)
        return (_epoch_seconds(fire) for fire in CronSim(self.fields, start))

    def _first_at_or_after(self, at_least: int) -> int:
        for key in self._fire_times(at_least - 1):
            if key >= at_least:
                return key
        # cronsim looks 50 years ahead, and the rarest valid expression (MON#5 in February)
        # fires at least every 40 years.
        raise RuntimeError(  # pragma: no cover
            f"{self.describe()} has no fire time in the 50 years after {at_least}"
        )

    def _count_between(self, low: int, high: int) -> int:
        """How many fire times lie strictly between ``low`` and ``high`` (capped)."""
        count = 0
        for key in self._fire_times(low):
            if key <= low:
                continue
            if key >= high or count == _MAX_COUNTED_SKIPS:
                break
            count += 1
        return count


class _CronPlan:
    """The ticks of one loop. Keeps no state but its time source: every answer starts from
    the wall clock as it reads now, which is how clock steps and DST are followed."""

    __slots__ = ("_cron", "_timebase")

    def __init__(self, cron: Cron, timebase: Timebase) -> None:
        self._cron = cron
        self._timebase = timebase

    def _wall(self) -> int:
        return wall_ns(self._timebase)

    def _tick(self, key: int, now: int, wall: int, index: int) -> Tick:
        # The fire time moved onto the monotonic clock: as far ahead of now as it is of wall.
        return Tick(now + key * NS - wall, index, key)

    def _due_from(self, wall: int) -> int:
        """The first whole second not yet past at ``wall`` (a fire time there is on time)."""
        return -(-(wall - _TOLERANCE_NS) // NS)

    def first(self, now: int) -> Tick:
        wall = self._wall()
        return self._tick(self._cron._first_at_or_after(self._due_from(wall)), now, wall, 0)

    def after(self, tick: Tick, now: int) -> tuple[Tick, int]:
        assert tick.key is not None
        wall = self._wall()
        key = self._cron._first_at_or_after(max(tick.key + 1, self._due_from(wall)))
        skipped = self._cron._count_between(tick.key, key)
        return self._tick(key, now, wall, tick.index + skipped + 1), skipped

    def following(self, tick: Tick) -> int:
        assert tick.key is not None
        return tick.deadline + (self._cron._first_at_or_after(tick.key + 1) - tick.key) * NS

    def key_instant(self, key: int) -> int:
        return key * NS

    def remaining(self, tick: Tick, now: int) -> int:
        assert tick.key is not None
        late = self._wall() - tick.key * NS
        return 0 if late >= -_TOLERANCE_NS else -late


def _check_expression(expression: object) -> str:
    """The five fields to give cronsim, or a ValueError that names ``cron`` and the fix."""
    if not isinstance(expression, str):
        raise TypeError(
            f"cron must be a string such as '0 9 * * MON-FRI', not {type(expression).__name__} "
            f"({expression!r})"
        )
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in _MACROS:
            raise ValueError(
                f"cron {expression!r} is not a macro repeat_at knows; use one of "
                f"{', '.join(_MACROS)} or five fields ({_FIELDS})"
            )
        text = _MACROS[text.lower()]
    parts = text.split()
    if len(parts) != 5:
        hint = (
            "; seconds are not supported: for sub-minute periods use "
            "@repeat_every(seconds=..., align=True)"
            if len(parts) == 6
            else ""
        )
        raise ValueError(
            f"cron {expression!r} has {len(parts)} field(s); write five: {_FIELDS} "
            f"(e.g. '0 9 * * MON-FRI'){hint}"
        )
    from cronsim import CronSim, CronSimError

    fields = " ".join(parts)
    try:
        next(CronSim(fields, dt.datetime.fromtimestamp(_REFERENCE, dt.timezone.utc)))
    except CronSimError as error:
        raise ValueError(
            f"cron {expression!r} is not a valid cron expression ({error}); fields are "
            f"{_FIELDS}, e.g. '0 9 * * MON-FRI' or '*/15 * * * *'"
        ) from None
    except StopIteration:  # pragma: no cover - cronsim refuses days no month has
        raise ValueError(
            f"cron {expression!r} never fires (no matching date in 50 years); check the "
            "day-of-month and month fields"
        ) from None
    return fields


def zone_of(tz: object) -> dt.tzinfo:
    """``tz`` as a ``tzinfo``: a zone name is looked up in the IANA database."""
    if isinstance(tz, dt.tzinfo):
        zone = getattr(tz, "zone", None)
        if hasattr(tz, "localize") and isinstance(zone, str):
            # A pytz zone: its tzinfo is only right through localize(), which cronsim does
            # not call (it would read Paris as UTC+00:09). The zoneinfo one of the same name is.
            return zone_of(zone)
        return tz
    if not isinstance(tz, str):
        raise TypeError(
            f"tz must be a time-zone name such as 'Europe/Paris' or a datetime.tzinfo, "
            f"not {type(tz).__name__} ({tz!r})"
        )
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"tz {tz!r} is not a known IANA time zone; write a name such as 'Europe/Paris' "
            "or 'UTC' (if the system has no zone database, as on Windows: pip install tzdata)"
        ) from None


def _zone_name(tz: dt.tzinfo) -> str:
    key = getattr(tz, "key", None)  # zoneinfo.ZoneInfo
    return key if isinstance(key, str) else str(tz)
