"""A fake clock that steps every periodic task through virtual time, deterministically.

Prior art: trio's ``MockClock`` (virtual time that only moves when told) and time-machine
(integer nanoseconds underneath). What neither can do, and this does, is know when a
periodic task has *finished its run*: every task started under the clock reports to it, so
[`FakeClock.advance`][] can wake the tasks due at a deadline and wait until each one has run
and is asleep again before moving on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import functools
import heapq
import itertools
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from .._records import RunRecord
from .._schedule import NS, to_ns
from .._task import PeriodicTask, TaskHandle
from .._timebase import installed

# How many times advance() yields to the event loop, waiting for woken tasks to go back to
# sleep, before it falls back to waiting on a thread (needed for runs in worker threads).
_FAST_YIELDS = 4


class RunStalledError(AssertionError):
    """A run did not finish within the clock's real-time ``timeout``.

    Under a [`FakeClock`][], virtual time stands still while a run is in progress, so a
    run that waits on anything but the fake clock (a real ``asyncio.sleep``, an event nobody
    sets) would hang the test; this error ends the wait instead and names the culprits.
    """


@dataclass(eq=False)
class _Activity:
    """Something the clock must wait for: a task's loop, a child task, or a thread's future.

    It is *quiet* when it sleeps on the clock, waits only on other activities, or is done.
    """

    future: asyncio.Future[Any]
    order: int  # start order: breaks ties between deadlines
    waiting: int = 0
    # What this task delegated work to (track() called from inside it). While it waits, it is
    # quiet only as long as none of them has finished: a finished child wakes it up.
    children: list[asyncio.Future[Any]] = field(default_factory=list)

    def quiet(self, sleep: asyncio.Future[None] | None) -> bool:
        """Whether it is quiet, given the clock future it sleeps on (None: not asleep)."""
        if self.future.done() or (sleep is not None and not sleep.done()):
            return True
        return self.waiting > 0 and not any(child.done() for child in self.children)

    def describe(self) -> str:
        future = self.future
        if isinstance(future, asyncio.Task):
            return repr(future.get_name())
        return "a worker thread (a def job or its timeout)"


# A sleeper in the heap: (deadline, start order, sequence, future, activity); tuples compare
# in C. An entry whose future is done (woken, or cancelled) is dead and dropped lazily.
_Entry = tuple[int, int, int, "asyncio.Future[None]", _Activity]


class RunHistory(Sequence[RunRecord]):
    """Every attempt of every run under a clock, in the order the attempts ended.

    Tasks may be named by their name, their [`PeriodicTask`][] or a handle.
    Safe to read from any thread.
    """

    def __init__(self) -> None:
        self._records: list[RunRecord] = []
        self._lock = threading.Lock()

    @overload
    def __getitem__(self, index: int) -> RunRecord: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[RunRecord]: ...

    def __getitem__(self, index: int | slice) -> RunRecord | Sequence[RunRecord]:
        with self._lock:
            return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def of(self, task: str | PeriodicTask[Any] | TaskHandle | None = None) -> list[RunRecord]:
        """The records of ``task`` (all records when ``None``)."""
        with self._lock:
            records = list(self._records)
        if task is None:
            return records
        name = task if isinstance(task, str) else task.name
        return [r for r in records if r.task == name]

    def outcomes(self, task: str | PeriodicTask[Any] | TaskHandle | None = None) -> list[str]:
        """``"ok"``, ``"failed"``, ``"timeout"``… of each attempt of ``task``."""
        return [r.outcome for r in self.of(task)]

    def started(self, task: str | PeriodicTask[Any] | TaskHandle | None = None) -> list[float]:
        """The virtual instant each attempt of ``task`` started."""
        return [r.started for r in self.of(task)]

    def failures(self, task: str | PeriodicTask[Any] | TaskHandle | None = None) -> list[RunRecord]:
        """The attempts of ``task`` that did not end ``"ok"``."""
        return [r for r in self.of(task) if not r.ok]

    def clear(self) -> None:
        """Forget every record."""
        with self._lock:
            self._records.clear()

    def __repr__(self) -> str:
        return f"<RunHistory of {len(self)} attempts>"


class FakeClock:
    """Virtual time for periodic tasks: it only moves when a test says so.

    While installed (``with FakeClock() as clock:`` or the ``fake_clock`` pytest fixture), it is
    the default ``clock`` and ``sleep`` of every task *started* under it; application code does
    not change. Users may rely on:

    - **Exact time.** Virtual time is kept in integer nanoseconds; [`now`][] starts at 0.0
      and 86,400 ``advance(1)`` calls land exactly on 86,400.0.
    - **Deterministic steps.** [`advance`][] runs every run due up to and including
      ``now + seconds``, one deadline at a time in deadline order (ties: the order the tasks
      started), and at each deadline waits until every woken task has finished its run (runs
      in worker threads included) and is asleep again or has ended. Runs take no virtual time
      unless they await [`sleep`][].
    - **No hangs.** A run that waits on something other than this clock for longer than
      ``timeout`` real seconds raises [`RunStalledError`][] naming the task and the
      virtual instant.
    - **Wall clock in step.** The clock has a virtual wall time (``start``, or the current time)
      that moves with it; cron and aligned schedules read it. If freezegun's ``freeze_time``
      or time-machine's ``travel`` is active, each step moves it, so ``datetime.now()`` inside
      a run is the virtual instant. With ``start=`` and ``travel=True`` (the default) the clock
      starts such a travel itself (time-machine if installed, else freezegun) and ends it when
      uninstalled.
    - **Sync tests.** [`advance_blocking`][] does the same from a thread that is not running
      an event loop, for apps driven by FastAPI's ``TestClient`` in another thread.

    Tasks started with their own ``clock=``/``sleep=`` arguments do not use this clock.
    """

    def __init__(
        self, *, start: dt.datetime | None = None, timeout: float = 5.0, travel: bool = True
    ) -> None:
        if start is not None and not isinstance(start, dt.datetime):
            raise TypeError(f"start must be a datetime.datetime or None, got {start!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of real seconds, got {timeout!r}")
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._now = 0
        self._start = start
        self._travel_requested = travel and start is not None
        self._wall_base = _wall_ns_of(start) if start is not None else time.time_ns()
        self._timeout = float(timeout)
        self._sleepers: list[_Entry] = []
        self._activities: dict[asyncio.Future[Any], _Activity] = {}
        # The activities split in two, so that _quiet() (once per deadline) is cheap with many
        # tasks: those asleep on this clock, with the future they sleep on, and the others.
        self._asleep: dict[_Activity, asyncio.Future[None]] = {}
        self._awake: set[_Activity] = set()
        self._order = itertools.count()
        self._seq = itertools.count()
        self._history = RunHistory()
        self._install_stack = contextlib.ExitStack()
        self._installed = False
        self._waiter_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._blocked = 0  # threads waiting on _changed
        self._moves = 0  # how many times time moved or tasks were woken
        self._closed = False

    # -- installing --------------------------------------------------------------------------

    def install(self) -> FakeClock:
        """Become the default clock of tasks started from now on (and start the travel)."""
        if self._installed:
            raise RuntimeError("this FakeClock is already installed")
        stack = self._install_stack
        stack.enter_context(installed(self))
        if self._travel_requested and _active_travel() is None:
            stack.enter_context(_start_travel(self.now_datetime))
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Stop being the default; end the travel this clock started. Idempotent."""
        if not self._installed:
            return
        self._installed = False
        self._install_stack.close()
        with self._lock:
            self._closed = True  # release threads still waiting on _changed
            self._changed.notify_all()
        if self._waiter_pool is not None:
            self._waiter_pool.shutdown(wait=False, cancel_futures=True)
            self._waiter_pool = None

    def __enter__(self) -> FakeClock:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    # -- reading -----------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Virtual seconds since the clock was created."""
        return self._now / NS

    @property
    def now_datetime(self) -> dt.datetime:
        """The virtual wall-clock instant (an aware UTC datetime)."""
        ns = self._wall_base + self._now
        return dt.datetime.fromtimestamp(ns // NS, dt.timezone.utc) + dt.timedelta(
            microseconds=(ns % NS) // 1000
        )

    @property
    def deadlines(self) -> list[float]:
        """The pending wake-up instants (virtual seconds), earliest first, with repeats."""
        with self._lock:
            return sorted(e[0] / NS for e in self._sleepers if not e[3].done())

    @property
    def history(self) -> RunHistory:
        """Every attempt of every run of tasks started under this clock."""
        return self._history

    @property
    def timeout(self) -> float:
        """Real seconds a run may take before [`RunStalledError`][]."""
        return self._timeout

    # -- the Timebase protocol (what tasks call) ---------------------------------------------

    def monotonic(self) -> float:
        """Virtual monotonic seconds (the same as [`now`][])."""
        return self._now / NS

    def monotonic_ns(self) -> int:
        """Virtual monotonic nanoseconds."""
        return self._now

    def wall(self) -> float:
        """Virtual wall-clock seconds since the Unix epoch."""
        return (self._wall_base + self._now) / NS

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Wait ``seconds`` of virtual time; a job in a test may await this to take time.

        Returns an awaitable (a future: wrap it in a coroutine to pass it to ``create_task``).
        ``seconds <= 0`` only yields to the event loop, like `asyncio.sleep`.
        """
        if seconds <= 0:
            return asyncio.sleep(0)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("FakeClock.sleep() must be awaited inside an asyncio task")
        with self._lock:
            activity = self._activities.get(task) or self._track(task)
        return self._sleep_of(activity, task.get_loop(), seconds)

    def hot_path(self) -> tuple[Callable[[], int], Callable[[float], Awaitable[None]]]:
        """`monotonic_ns`, and [`sleep`][] bound to the calling task (its loop calls it)."""
        task = asyncio.current_task()
        assert task is not None, "called by a task's loop, inside the task"
        with self._lock:
            activity = self._activities.get(task) or self._track(task)
        # sleep() without looking up the task: a day of a 1 s job calls this 86,400 times.
        return self.monotonic_ns, functools.partial(self._sleep_of, activity, task.get_loop())

    def _sleep_of(
        self, activity: _Activity, loop: asyncio.AbstractEventLoop, seconds: float
    ) -> asyncio.Future[None]:
        """A future the clock resolves ``seconds`` (> 0) from now; ``activity`` sleeps on it."""
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            deadline = self._now + to_ns(seconds)
            heapq.heappush(
                self._sleepers, (deadline, activity.order, next(self._seq), future, activity)
            )
            self._asleep[activity] = future
            self._awake.discard(activity)
            self._notify()
        return future

    def task_started(self, task: asyncio.Task[Any]) -> None:
        with self._lock:
            self._track(task)

    def track(self, activity: asyncio.Future[Any]) -> None:
        parent = asyncio.current_task()
        with self._lock:
            if activity not in self._activities:
                self._track(activity)
            owner = self._activities.get(parent) if parent is not None else None
            if owner is not None:
                owner.children.append(activity)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        with self._lock:
            activity = self._activities.get(task) or self._track(task)
            activity.waiting += 1
            activity.children = [c for c in activity.children if not c.done()]
            self._notify()
        try:
            yield
        finally:
            with self._lock:
                activity.waiting -= 1

    async def join(self, task: asyncio.Task[Any]) -> None:
        """Wait for a task's loop to end; raise RunStalledError if that needs virtual time.

        A loop that is stopping may still have a run in progress sleeping on this clock; only
        an advance can end it. If the clock stands still for ``timeout`` real seconds while
        the loop has not ended, waiting longer would hang the test.
        """
        while not task.done():
            moves = self._moves
            watcher = task.get_loop().run_in_executor(
                self._pool(), self._wait_end_or_move, task, moves
            )
            await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and watcher.done() and self._moves == moves:
                raise RunStalledError(
                    f"FakeClock: {task.get_name()!r} has not ended after {self._timeout:g} s of "
                    f"real time, and the clock stood still at {self.now:g} s. It waits for "
                    "virtual time (a run in progress sleeps on the clock, or the loop was never "
                    "asked to stop): advance the clock, or cancel() the task."
                )

    def _wait_end_or_move(self, task: asyncio.Task[Any], moves: int) -> None:
        with self._lock:
            self._blocked += 1
            try:
                self._changed.wait_for(
                    lambda: self._closed or task.done() or self._moves != moves, self._timeout
                )
            finally:
                self._blocked -= 1

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._waiter_pool is None:
            self._waiter_pool = concurrent.futures.ThreadPoolExecutor(
                2, thread_name_prefix="repeat_every-fakeclock"
            )
        return self._waiter_pool

    @property
    def wants_records(self) -> bool:
        return True

    def run_finished(self, record: RunRecord) -> None:
        self._history._records.append(record)  # atomic; RunHistory reads under its lock

    def _track(self, future: asyncio.Future[Any]) -> _Activity:
        activity = _Activity(future, next(self._order))
        self._activities[future] = activity
        self._awake.add(activity)
        future.add_done_callback(self._forget)
        return activity

    def _forget(self, future: asyncio.Future[Any]) -> None:
        with self._lock:
            activity = self._activities.pop(future, None)
            if activity is not None:
                self._awake.discard(activity)
                self._asleep.pop(activity, None)
            self._notify()

    def _notify(self) -> None:
        if self._blocked:  # only threads blocked in _wait_quiet listen
            self._changed.notify_all()

    # -- stepping (async) --------------------------------------------------------------------

    async def advance(self, seconds: float) -> None:
        """Move virtual time ``seconds`` ahead, running every run due on the way.

        See the class docstring for the guarantees. ``seconds`` may be 0 (run what is due).
        """
        target = self._now + _check_seconds(seconds)
        loop = asyncio.get_running_loop()
        await self._settle(loop)
        travel = _active_travel()
        while True:
            due = self._next_due(target, travel)
            if not due:
                return
            self._wake(due, loop)
            await asyncio.sleep(0)  # the common case: the woken tasks ran and sleep again
            if not self._quiet():  # (called once per deadline: keep it cheap)
                await self._settle(loop)

    async def step(self) -> float | None:
        """Advance to the next pending deadline and run what is due there.

        Returns the new [`now`][], or ``None`` (time unchanged) when nothing is pending.
        """
        loop = asyncio.get_running_loop()
        await self._settle(loop)
        nxt = self._next_deadline()
        if nxt is None:
            return None
        await self.advance((nxt - self._now) / NS)
        return self.now

    async def run_due(self) -> None:
        """Run what is due at the current instant (``advance(0)``)."""
        await self.advance(0)

    async def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(_FAST_YIELDS):
            await asyncio.sleep(0)
            if self._quiet():
                return
        quiet = await loop.run_in_executor(self._pool(), self._wait_quiet)
        if not quiet:
            self._stalled()

    # -- stepping (blocking) -----------------------------------------------------------------

    def advance_blocking(self, seconds: float) -> None:
        """[`advance`][] for sync tests: the tasks run in another thread's event loop.

        Call it from a thread with no running event loop (a plain ``def`` test driving
        FastAPI's ``TestClient``, for instance); it returns when virtual time has reached
        ``now + seconds`` and every run on the way has finished.
        """
        _require_no_running_loop("advance_blocking", "await clock.advance(...)")
        target = self._now + _check_seconds(seconds)
        self._settle_blocking()
        travel = _active_travel()
        while True:
            due = self._next_due(target, travel)
            if not due:
                return
            self._wake(due, None)
            self._settle_blocking()

    def step_blocking(self) -> float | None:
        """[`step`][] for sync tests (see [`advance_blocking`][])."""
        _require_no_running_loop("step_blocking", "await clock.step()")
        self._settle_blocking()
        nxt = self._next_deadline()
        if nxt is None:
            return None
        self.advance_blocking((nxt - self._now) / NS)
        return self.now

    def run_due_blocking(self) -> None:
        """[`run_due`][] for sync tests (see [`advance_blocking`][])."""
        self.advance_blocking(0)

    def _settle_blocking(self) -> None:
        if not self._wait_quiet():
            self._stalled()

    # -- shared machinery --------------------------------------------------------------------

    def _quiet(self) -> bool:
        with self._lock:
            # Every sleep still pending (tested in C: 100 tasks cost little)…
            woken_elsewhere = any(map(_future_done, self._asleep.values()))
            # …then only the activities awake, unless a sleep ended without the clock (a task
            # cancelled while asleep): then every activity is looked at.
            activities = self._activities.values() if woken_elsewhere else self._awake
            asleep = self._asleep
            for activity in activities:
                if not activity.quiet(asleep.get(activity)) and _alive(activity.future):
                    return False
            return True

    def _wait_quiet(self) -> bool:
        with self._lock:
            self._blocked += 1
            try:
                return self._changed.wait_for(lambda: self._closed or self._quiet(), self._timeout)
            finally:
                self._blocked -= 1

    def _stalled(self) -> None:
        with self._lock:
            busy = [
                a.describe()
                for a in self._activities.values()
                if _alive(a.future) and not a.quiet(self._asleep.get(a))
            ]
        raise RunStalledError(
            f"FakeClock: at virtual instant {self.now:g} s ({self.now_datetime.isoformat()}), "
            f"{', '.join(busy) or 'a task'} did not finish its run within {self._timeout:g} s of "
            "real time. Under a FakeClock a run may only wait on the fake clock "
            "(await clock.sleep(...)) or on work that completes by itself; raise "
            "FakeClock(timeout=...) if the work is just slow."
        )

    def _next_deadline(self) -> int | None:
        with self._lock:
            self._drop_dead()
            return self._sleepers[0][0] if self._sleepers else None

    def _drop_dead(self) -> None:
        sleepers = self._sleepers
        while sleepers and sleepers[0][3].done():
            heapq.heappop(sleepers)

    def _next_due(self, target: int, travel: Any) -> list[asyncio.Future[None]]:
        """Move to the next deadline ≤ ``target`` and take its sleepers (or move to target)."""
        due: list[asyncio.Future[None]] = []
        with self._lock:
            self._drop_dead()
            sleepers = self._sleepers
            if not sleepers or sleepers[0][0] > target:
                self._now = max(self._now, target)
            else:
                self._now = max(self._now, sleepers[0][0])
                while sleepers and sleepers[0][0] <= self._now:
                    _, _, _, future, activity = heapq.heappop(sleepers)
                    if not future.done():
                        # Busy from now on, even before it resumes.
                        self._asleep.pop(activity, None)
                        self._awake.add(activity)
                        due.append(future)
            self._moves += 1
            self._notify()
        if travel is not None:
            travel.move_to(self.now_datetime)
        return due

    def _wake(
        self, due: list[asyncio.Future[None]], loop: asyncio.AbstractEventLoop | None
    ) -> None:
        for future in due:
            future_loop = future.get_loop()
            if future_loop is loop:
                _resolve(future)
            elif not future_loop.is_closed():
                future_loop.call_soon_threadsafe(_resolve, future)

    def __repr__(self) -> str:
        return f"<FakeClock now={self.now:g}s wall={self.now_datetime.isoformat()}>"


# The futures come from loop.create_future(): asyncio.Future (under uvloop too).
_future_done = asyncio.Future.done


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _alive(future: asyncio.Future[Any]) -> bool:
    return not future.done() and not future.get_loop().is_closed()


def _check_seconds(seconds: float | dt.timedelta) -> int:
    if isinstance(seconds, dt.timedelta):
        seconds = seconds.total_seconds()
    if (
        not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not seconds >= 0
        or seconds == float("inf")
    ):
        raise ValueError(
            f"time can't go backwards: seconds must be finite and ≥ 0, got {seconds!r}"
        )
    return to_ns(seconds)


def _require_no_running_loop(name: str, instead: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"FakeClock.{name}() would block the event loop it needs; in async code use {instead}"
    )


def _wall_ns_of(start: dt.datetime) -> int:
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.timezone.utc)
    delta = start - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * NS + delta.microseconds * 1000


# -- freezegun and time-machine ------------------------------------------------------------


class _TimeMachineTravel:
    def __init__(self, traveller: Any) -> None:
        self._traveller = traveller

    def move_to(self, when: dt.datetime) -> None:
        self._traveller.move_to(when, tick=False)


class _FreezegunTravel:
    def __init__(self, factory: Any) -> None:
        self._factory = factory

    def move_to(self, when: dt.datetime) -> None:
        self._factory.move_to(when)


def _active_travel() -> _TimeMachineTravel | _FreezegunTravel | None:
    """The innermost active time-machine travel or freezegun freeze (only if imported)."""
    time_machine = sys.modules.get("time_machine")
    if time_machine is not None and getattr(time_machine, "traveller_stack", None):
        return _TimeMachineTravel(time_machine.traveller_stack[-1])
    freezegun_api = sys.modules.get("freezegun.api")
    if freezegun_api is not None:
        factories = getattr(freezegun_api, "freeze_factories", None)
        if factories and hasattr(factories[-1], "move_to"):
            return _FreezegunTravel(factories[-1])
    return None


@contextlib.contextmanager
def _start_travel(when: dt.datetime) -> Iterator[None]:
    """Start a travel to ``when`` with time-machine, else freezegun; neither: nothing."""
    try:
        import time_machine
    except ImportError:
        pass
    else:
        with time_machine.travel(when, tick=False):
            yield
        return
    try:
        import freezegun
    except ImportError:
        yield
        return
    # real_asyncio keeps the event loop's own clock real, so asyncio keeps working.
    with freezegun.freeze_time(when, real_asyncio=True):
        yield
