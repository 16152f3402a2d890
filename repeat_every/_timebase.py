"""Where a periodic task reads the time and how it waits.

A task never calls ``time.monotonic`` or ``asyncio.sleep`` directly: it asks its
`Timebase`. In production that is `SystemTimebase`; a test installs a
``repeat_every.testing.FakeClock`` as the process-wide default, and every task *started* while
it is installed steps in virtual time. Decoration happens at import time, long before a test
runs, so the default is read when a task starts, never when it is decorated.

Besides the three time functions a timebase receives a few notifications (a task started, a
child activity began, a run finished). The system timebase ignores them; the fake clock uses
them to know when every task has finished its run and is asleep again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._records import RunRecord

ClockFunc = Callable[[], float]
"""Monotonic seconds, like `time.monotonic`."""

SleepFunc = Callable[[float], Awaitable[Any]]
"""Waits that many seconds, like `asyncio.sleep`."""


class Timebase(Protocol):
    """The time source of running tasks (see the module docstring)."""

    def monotonic(self) -> float:
        """Monotonic seconds; only differences between two readings mean anything."""

    def monotonic_ns(self) -> int:
        """`monotonic` in integer nanoseconds (what the loop reads)."""

    def sleep(self, seconds: float) -> Awaitable[Any]:
        """Wait ``seconds`` (a value ≤ 0 only yields to the event loop)."""

    def hot_path(self) -> tuple[Callable[[], int], SleepFunc]:
        """`monotonic_ns` and `sleep` for the calling task's loop, at least cost.

        Called once, inside the task's loop; the loop then reads the clock and sleeps through
        the two functions returned, once or twice per run.
        """

    def wall(self) -> float:
        """Wall-clock seconds since the Unix epoch, like `time.time`."""

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


class SystemTimebase:
    """Real time: `time.monotonic`, `asyncio.sleep` and `time.time`.

    Notifications are ignored. The time functions are looked up at each call, so freezegun
    and time-machine move the wall clock that cron schedules read.
    """

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

    def task_started(self, task: asyncio.Task[Any]) -> None:
        pass

    def track(self, activity: asyncio.Future[Any]) -> None:
        pass

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    async def join(self, task: asyncio.Task[Any]) -> None:
        await asyncio.wait((task,))

    @property
    def wants_records(self) -> bool:
        return False

    def run_finished(self, record: RunRecord) -> None:  # pragma: no cover - never called
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clock={self._clock!r}, sleep={self._sleep!r})"


_SYSTEM = SystemTimebase()
_default_stack: list[Timebase] = [_SYSTEM]


def default_timebase() -> Timebase:
    """The timebase a task uses when it starts without its own ``clock``/``sleep``."""
    return _default_stack[-1]


@contextlib.contextmanager
def installed(timebase: Timebase) -> Iterator[Timebase]:
    """Make ``timebase`` the process-wide default while the block runs (nests)."""
    _default_stack.append(timebase)
    try:
        yield timebase
    finally:
        _default_stack.remove(timebase)
