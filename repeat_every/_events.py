"""Events: what every task's loop tells the process-wide listeners.

A listener is a plain function of one argument, the event, added by `add_listener`. It is
called inline, on the event loop of the task, at the moment the thing happens: an attempt
started or ended, a run ended, ticks were skipped, a tick was claimed by another worker.
Metrics (``repeat_every.metrics``) are built on it.

Cost: the loop tests one module-level list before it builds an event (``if listeners:``), so
a process with no listener pays a truthiness test per emit point and nothing else. Listeners
run on the event loop: they must be quick (count, set a gauge, put the event on a queue), as
anything slow delays every task of that loop.

Prior art: APScheduler's ``add_listener(callback, mask)`` and its ``JobExecutionEvent``; here
the kind of event is its class, so a listener filters with ``isinstance`` (or ``match``).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal, NamedTuple, TypeAlias

from ._records import Outcome

log = logging.getLogger("repeat_every")

SkipReason = Literal["overrun", "stale", "paused", "run_now", "store_error"]
"""Why ticks were not run: the previous run covered them (``"overrun"``); the loop woke too late
to claim them safely (``"stale"``: a frozen process or a blocked event loop, with a claim
store); the task was paused (``"paused"``); a `run_now()` run was in progress
(``"run_now"``); the claim store failed, with ``on_store_error="skip"`` (``"store_error"``)."""


# The events are named tuples, as `RunRecord` is: immutable, and cheap to build (a frozen
# dataclass costs several times more, and a listener pays for three events per run). Times
# named ``scheduled``, ``started`` and ``ended`` are seconds on the task's monotonic clock, as
# in `RunRecord` (virtual seconds under a ``FakeClock``): only differences between them mean
# anything. ``wall`` is the wall-clock instant of the event, in seconds since the Unix epoch
# (the virtual wall clock under a ``FakeClock``).


class AttemptStarted(NamedTuple):
    """An attempt of a run is about to call the job (its first attempt, or a retry)."""

    task: str
    """The task's name."""
    wall: float
    """When: wall-clock seconds since the epoch."""
    run: int
    """The run's index: 0 for the task's first run (as `RunRecord.index`)."""
    attempt: int
    """1 for the first attempt of a run, 2 for its first retry, …"""
    scheduled: float
    """When the run's tick was due (a `run_now()` run: when it was asked for)."""
    started: float
    """When this attempt starts."""
    manual: bool
    """Whether the run is a `run_now()` run rather than one of the schedule."""

    @property
    def late(self) -> float:
        """Seconds from the tick's due instant to this attempt's start.

        For a first attempt of a scheduled run: how late the loop started it (jitter and the
        claim included); for a retry it includes the earlier attempts; 0 for `run_now()`.
        """
        return self.started - self.scheduled


class AttemptEnded(NamedTuple):
    """An attempt ended: returned, raised, timed out, or was cancelled.

    A run whose attempt is cancelled (the task cancelled, or given up on at shutdown) ends
    here: no `RunEnded` follows, and the run is not counted in the task's ``runs``.
    """

    task: str
    """The task's name."""
    wall: float
    """When: wall-clock seconds since the epoch."""
    run: int
    """The run's index (as `RunRecord.index`)."""
    attempt: int
    """1 for the first attempt of a run, 2 for its first retry, …"""
    scheduled: float
    """When the run's tick was due."""
    started: float
    """When this attempt started."""
    ended: float
    """When this attempt ended."""
    outcome: Outcome
    """``"ok"``, ``"failed"``, ``"timeout"`` or ``"cancelled"``."""
    exception: BaseException | None
    """What the attempt raised (`RunTimeoutError` for a timeout), ``None`` when ``"ok"``."""
    manual: bool
    """Whether the run is a `run_now()` run."""

    @property
    def duration(self) -> float:
        """Seconds the attempt took."""
        return self.ended - self.started

    @property
    def late(self) -> float:
        """Seconds from the tick's due instant to this attempt's start."""
        return self.started - self.scheduled


class RunEnded(NamedTuple):
    """A run ended, after its last attempt (retries included): the run the task counts.

    Told right after the run's last `AttemptEnded`, before the failure, if any, is reported
    (logged and given to ``on_exception``). ``outcome`` is the last attempt's: ``"ok"``,
    ``"failed"`` or ``"timeout"`` (a cancelled run has no `RunEnded`, see `AttemptEnded`).
    """

    task: str
    """The task's name."""
    wall: float
    """When: wall-clock seconds since the epoch."""
    run: int
    """The run's index (as `RunRecord.index`)."""
    attempts: int
    """How many attempts the run made (1 without retries)."""
    scheduled: float
    """When the run's tick was due."""
    started: float
    """When its first attempt started."""
    ended: float
    """When its last attempt ended."""
    outcome: Outcome
    """The last attempt's outcome: ``"ok"``, ``"failed"`` or ``"timeout"``."""
    exception: BaseException | None
    """What the last attempt raised, ``None`` when ``"ok"``."""
    manual: bool
    """Whether the run is a `run_now()` run."""

    @property
    def duration(self) -> float:
        """Seconds from the first attempt's start to the last one's end (backoff included), as
        `TaskState.last_duration`."""
        return self.ended - self.started


class TicksSkipped(NamedTuple):
    """Ticks came and were not run (counted in the task's ``skipped`` or ``paused_ticks``)."""

    task: str
    """The task's name."""
    wall: float
    """When: wall-clock seconds since the epoch."""
    reason: SkipReason
    """Why: ``"overrun"``, ``"stale"``, ``"paused"``, ``"run_now"`` or ``"store_error"``."""
    ticks: int
    """How many ticks (≥ 1)."""


class ClaimedElsewhere(NamedTuple):
    """With a claim store: another worker claimed the tick, so this one does not run it
    (counted in the task's ``elsewhere``)."""

    task: str
    """The task's name."""
    wall: float
    """When: wall-clock seconds since the epoch."""
    scheduled: float
    """When the tick was due, on this worker's monotonic clock."""
    key: int
    """The tick's key in the claim store (the same in every worker)."""


TaskEvent: TypeAlias = AttemptStarted | AttemptEnded | RunEnded | TicksSkipped | ClaimedElsewhere
"""Any event: each has ``task`` (the task's name) and ``wall`` (when, in wall-clock seconds);
tell them apart with ``isinstance`` or ``match``."""

Listener = Callable[[TaskEvent], object]
"""A function of one argument, the event; what it returns is ignored."""


# The subscriptions, in the order they were added. Mutated in place (never rebound): the
# runner imports the list itself and tests its truthiness on its hot path.
listeners: list[Subscription] = []
_lock = threading.Lock()  # add and remove may come from any thread

# After a listener's first failure (logged with its traceback), its later failures are
# summed and logged at most this often (real seconds).
_REPEAT_LOG_EVERY = 60.0


class Subscription:
    """A listener added by `add_listener`; calling it removes the listener.

    Also a context manager, which removes the listener on exit::

        with add_listener(events.append):
            ...

    Removing it twice is harmless.
    """

    __slots__ = ("_failed_at", "_unlogged", "active", "callback")

    def __init__(self, callback: Listener) -> None:
        self.callback = callback
        self.active = True
        self._failed_at: float | None = None  # when a failure was last logged (time.monotonic)
        self._unlogged = 0  # failures since then

    def __call__(self) -> None:
        """Remove the listener (it is not called for events emitted after this)."""
        with _lock:
            if self.active:
                self.active = False
                listeners.remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<Subscription {self.callback!r} ({state})>"

    def _failed(self, event: TaskEvent, error: Exception) -> None:
        """Log a failure of the listener: the first one, then a sum at most once a minute."""
        now = time.monotonic()
        extra = {"repeat_every_task": event.task, "repeat_every_listener": repr(self.callback)}
        if self._failed_at is None:
            log.error(
                "event listener %r raised on %s of %s; it stays installed (its later failures "
                "are logged at most once a minute)",
                self.callback,
                type(event).__name__,
                event.task,
                exc_info=error,
                extra=extra,
            )
            self._failed_at = now
            return
        self._unlogged += 1
        if now - self._failed_at >= _REPEAT_LOG_EVERY:
            log.error(
                "event listener %r raised %d more time(s) since its last report; the last on %s "
                "of %s",
                self.callback,
                self._unlogged,
                type(event).__name__,
                event.task,
                exc_info=error,
                extra=extra,
            )
            self._failed_at = now
            self._unlogged = 0


def add_listener(callback: Listener) -> Subscription:
    """Call ``callback(event)`` for every event of every task of the process, from now on.

    The events (`TaskEvent`) are `AttemptStarted`, `AttemptEnded`, `RunEnded`, `TicksSkipped`
    and `ClaimedElsewhere`. The listener is called inline, on the event loop that
    runs the task (each task's own loop, when several event loops run in threads), so it must
    be quick and must not block: for slow work, put the event on a queue that your own task
    consumes. An ``async def`` listener is refused, since nothing would await it. An exception
    the listener raises is logged on the ``"repeat_every"`` logger (the first with its
    traceback, then a count at most once a minute) and never reaches the task, nor the other
    listeners.

    Returns a `Subscription`: call it, or leave its ``with`` block, to remove the listener.
    Adding the same function twice calls it twice per event.
    """
    if not callable(callback):
        raise TypeError(
            f"add_listener() takes a function of one argument (the event), "
            f"got {type(callback).__name__} {callback!r}"
        )
    if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        type(callback).__call__
    ):
        raise TypeError(
            f"add_listener() takes a plain function, called inline on the event loop; "
            f"{callback!r} is async, and nothing would await it. Use a def that hands the "
            "event on (queue.put_nowait(event)) to a task of your own"
        )
    subscription = Subscription(callback)
    with _lock:
        listeners.append(subscription)
    return subscription


def emit(event: TaskEvent) -> None:
    """Give ``event`` to every listener (callers first test ``if listeners:``)."""
    for subscription in tuple(listeners):
        if not subscription.active:  # removed by a listener called before it
            continue
        try:
            result = subscription.callback(event)
        except Exception as error:
            subscription._failed(event, error)
            continue
        if result is not None and inspect.iscoroutine(result):
            result.close()  # a def that returned a coroutine: never awaited, say so once
            subscription._failed(
                event,
                TypeError(
                    "the listener returned a coroutine, which is never awaited: listeners "
                    "are called inline and must not be async"
                ),
            )
