"""Plain records of what a task did: one per attempt, and a snapshot of a task's state."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal, NamedTuple

Outcome = Literal["ok", "failed", "timeout", "cancelled"]
"""How an attempt ended: returned, raised, exceeded its ``timeout``, or was cancelled."""


class RunRecord(NamedTuple):
    """One attempt of one run of a periodic task (immutable).

    Times are seconds on the task's monotonic clock (virtual seconds since the clock was
    created, under a ``FakeClock``). ``scheduled`` is the tick the run belongs to (the same for
    every attempt of a run); ``started``/``ended`` are when this attempt began and ended;
    ``wall`` is the wall-clock instant it began, in seconds since the epoch (what
    ``datetime.now()`` said inside it, when the wall clock is kept in step).
    """

    task: str
    index: int  # type: ignore[assignment]  # shadows tuple.index, which records never need
    """0 for the first run of the task, 1 for the second, …; retries share their run's index."""
    attempt: int
    """1 for the first attempt of a run, 2 for its first retry, …"""
    scheduled: float
    started: float
    ended: float
    outcome: Outcome
    exception: BaseException | None
    wall: float

    @property
    def ok(self) -> bool:
        """Whether the attempt returned normally."""
        return self.outcome == "ok"

    @property
    def wall_started(self) -> dt.datetime:
        """`wall` as an aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.wall, dt.timezone.utc)


@dataclass(frozen=True)
class TaskState:
    """A snapshot of a running (or ended) task, cheap to take and safe to serialise.

    ``runs`` counts runs that happened (a run with retries counts once; failed runs count);
    ``failures`` counts runs whose last attempt failed; ``retries`` counts extra attempts;
    ``skipped`` counts ticks that were not run because the previous run overran them (or, with
    a claim store, because the store was unreachable).
    """

    name: str
    running: bool
    runs: int
    failures: int
    retries: int
    skipped: int
    elsewhere: int
    """Ticks another process claimed (with a claim store)."""
    last_exception: BaseException | None
    next_run: float | None
    """Monotonic instant of the next run, ``None`` when no run is planned."""
    next_run_at: dt.datetime | None
    """Wall-clock (UTC) instant of the next run, ``None`` when no run is planned."""
    last_started_at: dt.datetime | None
    last_success_at: dt.datetime | None = None
    """Wall-clock (UTC) instant the last successful run ended, ``None`` before one."""
    last_duration: float | None = None
    """Seconds the last run took, from its first attempt's start to its end (retries and
    their backoff included), ``None`` before the first run ends."""
    consecutive_failures: int = 0
    """Failed runs since the last successful one."""
    paused: bool = False
    """Whether the task is paused (``handle.pause()``)."""
    paused_ticks: int = 0
    """Ticks that came while the task was paused, and were not run."""

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dictionary (what the demo's ``GET /tasks`` returns)."""
        return {
            "name": self.name,
            "running": self.running,
            "runs": self.runs,
            "failures": self.failures,
            "retries": self.retries,
            "skipped": self.skipped,
            "elsewhere": self.elsewhere,
            "last_error": None if self.last_exception is None else repr(self.last_exception),
            "next_run_at": None if self.next_run_at is None else self.next_run_at.isoformat(),
            "last_started_at": (
                None if self.last_started_at is None else self.last_started_at.isoformat()
            ),
            "last_success_at": (
                None if self.last_success_at is None else self.last_success_at.isoformat()
            ),
            "last_duration": self.last_duration,
            "consecutive_failures": self.consecutive_failures,
            "paused": self.paused,
            "paused_ticks": self.paused_ticks,
        }
