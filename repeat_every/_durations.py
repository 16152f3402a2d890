"""Durations: the one place where user-given seconds are checked and turned into nanoseconds.

Every duration a user passes (``seconds``, ``wait_first``, ``timeout``, ``jitter``,
``claim_ttl``, the fields of ``Retry``) goes through `duration_ns`, which accepts a
number of seconds or a ``datetime.timedelta`` and answers integer nanoseconds. Schedules and
the run loop count in integers, so a grid never accumulates rounding error (the idea is
time-machine's ``_timedelta_to_ns``).
"""

from __future__ import annotations

import datetime as dt
import math

NS = 1_000_000_000
"""Nanoseconds per second."""

MAX_SECONDS = 100 * 365 * 86_400
"""The longest duration accepted (about 100 years): a longer one is a mistake, and past it
float seconds stop being exact enough to schedule, and int-to-float conversions overflow."""

Seconds = float | dt.timedelta
"""A duration as users write it: a number of seconds, or a ``timedelta``."""


def to_ns(seconds: float) -> int:
    """Seconds (float) to integer nanoseconds, rounded to the nearest."""
    return round(seconds * NS)


def duration_ns(
    value: object, argument: str, *, allow_zero: bool = False, at_least_ns: int = 1
) -> int:
    """``value`` (seconds or a timedelta) as integer nanoseconds, checked.

    Raises ``TypeError`` for what is not a number or a ``timedelta`` and ``ValueError`` for a
    duration that is not finite, negative, zero (unless ``allow_zero``), shorter than
    ``at_least_ns`` or longer than `MAX_SECONDS`; each message names ``argument``.
    """
    if isinstance(value, dt.timedelta):
        seconds: float = value.total_seconds()
    elif isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_SECONDS:  # before float(): 10**400 would raise OverflowError
            raise ValueError(_too_long(argument, value))
        seconds = float(value)
    elif isinstance(value, float):
        seconds = value
    else:
        raise TypeError(
            f"{argument} must be a number of seconds or a datetime.timedelta, "
            f"not {type(value).__name__} ({value!r})"
        )
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{argument} must be finite and {bound}, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ValueError(_too_long(argument, value))
    ns = to_ns(seconds)
    if ns < at_least_ns and not (ns == 0 and allow_zero and seconds == 0):
        raise ValueError(
            f"{argument} must be at least {at_least_ns / NS:g} s, got {value!r}"
            + (f" ({seconds:g} s)" if isinstance(value, dt.timedelta) else "")
        )
    return ns


def _too_long(argument: str, value: object) -> str:
    return (
        f"{argument} must be at most {MAX_SECONDS:,} s (about 100 years), got {value!r}; "
        "for a job that should never run again, stop its handle instead"
    )
