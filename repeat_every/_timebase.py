"""Where a periodic task reads the time and how it waits, and who may watch it run.

Two small roles, kept apart:

- A `Clock` answers the time and waits: monotonic time, wall time and a sleep. A task
  never calls ``time.monotonic`` or ``asyncio.sleep`` directly: it asks its clock. In
  production that is `SystemClock`.
- A `TaskObserver` is told what a task is doing (it started, it delegated work to a
  child, it waits only on that work, an attempt ended) so that it can know when every task has
  finished its run and is asleep again. Only test clocks observe: production code answers no
  hook. ``repeat_every.testing.FakeClock`` is both a clock and an observer.

A test installs a ``FakeClock`` as the process-wide default, and every task *started* while it
is installed steps in virtual time. Decoration happens at import time, long before a test
runs, so the default is read when a task starts, never when it is decorated.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

if TYPE_CHECKING:
    from ._records import RunRecord

ClockFunc = Callable[[], float]
"""Monotonic seconds, like `time.monotonic`."""

SleepFunc = Callable[[float], Awaitable[Any]]
"""Waits that many seconds, like `asyncio.sleep`."""


class Clock(Protocol):
    """The time source of running tasks: three readings, a sleep, and a fast path to them."""

    def monotonic(self) -> float:
        """Monotonic seconds; only differences between two readings mean anything."""

    def monotonic_ns(self) -> int:
        """`monotonic` in integer nanoseconds (what the loop reads)."""

    def sleep(self, seconds: float) -> Awaitable[Any]:
        """Wait ``seconds`` (a value ≤ 0 only yields to the event loop)."""

    def hot_path(self) -> tuple[Callable[[], int], SleepFunc]:
        """`monotonic_ns` and `sleep` for the calling task's loop, at least cost.

        Called exactly once by each task's loop, inside the task, before its first sleep; the
        loop then reads the clock and sleeps through the two functions returned.
        """

    def wall(self) -> float:
        """Wall-clock seconds since the Unix epoch, like `time.time`."""


Timebase = Clock
"""The former name of `Clock`."""


@runtime_checkable
class TaskObserver(Protocol):
    """What a test clock is told about the tasks that use it (production clocks are not).

    A task whose clock is also an observer calls these hooks; it looks once, at start.
    """

    def task_started(self, task: asyncio.Task[Any]) -> None:
        """A periodic task's loop was created (before its first step)."""

    def track(self, activity: asyncio.Future[Any]) -> None:
        """A run delegated work to ``activity`` (a child task or a thread's future)."""

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        """The current task waits only on activities it tracked."""

    async def join(self, task: asyncio.Task[Any]) -> None:
        """Wait until a periodic task's loop has ended (``TaskHandle.wait()`` uses this)."""

    @property
    def wants_records(self) -> bool:
        """Whether `run_finished` wants a record of every attempt."""

    def run_finished(self, record: RunRecord) -> None:
        """An attempt of a run ended (only called when `wants_records`)."""


def observer_of(clock: Clock) -> TaskObserver | None:
    """``clock`` as a `TaskObserver` if it is one (a test clock), else ``None``.

    Asked at every start; the answer is kept per class, since ``isinstance`` against a
    runtime protocol costs tens of microseconds (it was most of a task's start-up).
    """
    kind = type(clock)
    observes = _OBSERVES.get(kind)
    if observes is None:
        observes = _OBSERVES[kind] = isinstance(clock, TaskObserver)
    return cast(TaskObserver, clock) if observes else None


_OBSERVES: dict[type, bool] = {}


class SystemClock:
    """Real time: `time.monotonic`, `asyncio.sleep` and `time.time`.

    The time functions are looked up at each call, so freezegun and time-machine move the wall
    clock that cron schedules read. An injected ``clock`` or ``sleep`` replaces its half.
    """

    __slots__ = ("_clock", "_sleep")

    def __init__(self, clock: ClockFunc | None = None, sleep: SleepFunc | None = None) -> None:
        self._clock = clock  # None: time.monotonic, looked up at each call
        self._sleep: SleepFunc = sleep if sleep is not None else asyncio.sleep

    def monotonic(self) -> float:
        return time.monotonic() if self._clock is None else self._clock()

    def monotonic_ns(self) -> int:
        if self._clock is None:
            return time.monotonic_ns()
        return round(self._clock() * 1_000_000_000)

    def sleep(self, seconds: float) -> Awaitable[Any]:
        return self._sleep(seconds)

    def hot_path(self) -> tuple[Callable[[], int], SleepFunc]:
        """`monotonic_ns` and `sleep` without this object's indirection.

        A running loop reads the clock twice and sleeps once per run; calling the underlying
        functions directly saves two Python calls per run (measured in ``bench/``).
        """
        if self._clock is None:
            return time.monotonic_ns, self._sleep
        return self.monotonic_ns, self._sleep

    def wall(self) -> float:
        return time.time()


SystemTimebase = SystemClock
"""The former name of `SystemClock`."""

_SYSTEM = SystemClock()
_default_stack: list[Clock] = [_SYSTEM]


def default_timebase() -> Clock:
    """The clock a task uses when it starts without its own ``clock``/``sleep``."""
    return _default_stack[-1]


@contextlib.contextmanager
def installed(timebase: Clock) -> Iterator[Clock]:
    """Make ``timebase`` the process-wide default while the block runs (nests)."""
    _default_stack.append(timebase)
    try:
        yield timebase
    finally:
        _default_stack.remove(timebase)
