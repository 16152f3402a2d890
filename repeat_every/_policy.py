"""What happens when a run fails or takes too long."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ._durations import duration_ns


class RunTimeoutError(TimeoutError):
    """A run took longer than its task's ``timeout``.

    An ``async def`` run is cancelled when this is raised. A ``def`` run cannot be
    interrupted (Python has no way to kill a thread): the attempt is reported as timed out at
    the deadline, and the task waits for the thread to return before its next run, so runs
    still never overlap.
    """


@dataclass(frozen=True)
class Retry:
    """Retry a failed run with exponential backoff, within the run's own tick.

    Attempt ``n + 1`` starts ``min(backoff × multiplier**(n-1), max_backoff)`` seconds (plus a
    random ``[0, jitter)``) after attempt ``n`` failed. Only exceptions that are instances of
    ``on`` are retried. A retry that would start at or after the next regular tick is not
    made: the run counts as failed and the next tick runs as planned. Every wait goes through
    the task's ``sleep``, so a ``FakeClock`` steps retries exactly.

    >>> Retry(attempts=3, backoff=1, multiplier=2).delays()
    [1.0, 2.0]
    """

    attempts: int = 3
    """Attempts per run, the first one included (so ``attempts=3`` means up to 2 retries)."""
    backoff: float = 1.0
    """Seconds before the first retry."""
    multiplier: float = 2.0
    """Each further retry waits this many times longer."""
    max_backoff: float = 300.0
    """No wait is longer than this (before jitter)."""
    jitter: float = 0.0
    """A random extra wait in ``[0, jitter)`` seconds, so replicas do not retry in step."""
    on: type[BaseException] | tuple[type[BaseException], ...] = field(default=(Exception,))
    """The exception types that are retried (one class, or a tuple; kept as a tuple);
    anything else fails the run at once."""

    def __post_init__(self) -> None:
        if (
            not isinstance(self.attempts, int)
            or isinstance(self.attempts, bool)
            or self.attempts < 1
        ):
            raise ValueError(
                f"Retry(attempts=...) must be an int ≥ 1 (1 means no retry), got {self.attempts!r}"
            )
        for value, argument in (
            (self.backoff, "backoff"),
            (self.max_backoff, "max_backoff"),
            (self.jitter, "jitter"),
        ):
            duration_ns(value, f"Retry({argument}=...)", allow_zero=True, at_least_ns=0)
        multiplier = self.multiplier
        if (
            not isinstance(multiplier, (int, float))
            or isinstance(multiplier, bool)
            or multiplier < 1
            or (isinstance(multiplier, float) and not math.isfinite(multiplier))
        ):
            raise ValueError(f"Retry(multiplier=...) must be a number ≥ 1, got {self.multiplier!r}")
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise TypeError(
                f"Retry(on=...) must be an exception class or a tuple of them, got {self.on!r}"
            )
        object.__setattr__(self, "on", on)

    def _base(self, failed_attempt: int) -> float:
        cap = float(self.max_backoff)
        try:
            grown = float(self.multiplier) ** (failed_attempt - 1) if failed_attempt > 1 else 1.0
        except OverflowError:  # 2.0 ** 1024, or a multiplier past float: far past any cap
            return cap if self.backoff else 0.0
        # backoff × inf is inf (or nan for a zero backoff): min() caps the first, this the second.
        delay = float(self.backoff) * grown if self.backoff else 0.0
        return min(delay, cap)

    def delay(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
        if not self.jitter:
            return self._base(failed_attempt)
        return self._base(failed_attempt) + (rng or random).random() * float(self.jitter)

    def delays(self) -> list[float]:
        """The waits before each retry, without jitter (handy in docs and tests)."""
        return [self._base(n) for n in range(1, self.attempts)]
