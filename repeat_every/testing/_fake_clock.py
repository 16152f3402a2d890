"""A fake clock that steps every periodic task through virtual time, deterministically.

Prior art: trio's ``MockClock`` (virtual time that only moves when told) and time-machine
(integer nanoseconds underneath). What neither can do, and this does, is know when a
periodic task has *finished its run*: every task started under the clock reports to it, so
[`FakeClock.advance`][] can wake the tasks due at a deadline and wait until each one has run
and is asleep again before moving on.
"""

from __future__ import annotations

import asyncio
import collections
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
from . import _virtual
from ._virtual import LoopPatch, Scope, ThreadCount, ThreadSleep, VirtualTimer

# How many times advance() yields to the event loop, waiting for woken tasks to go back to
# sleep, before it falls back to waiting on a thread (needed for runs in worker threads).
_FAST_YIELDS = 4

# The slow path re-checks at least this often (real seconds) while it waits for news.
_POLL = 0.005

# At most this many jumps in a row (see FakeClock._jump) before the task that jumps really
# waits once, so the event loop still polls its I/O between them.
_MAX_JUMPS = 256

# Records the history keeps by default (counts stay exact beyond it): ~300 B each.
DEFAULT_HISTORY = 10_000


class RunStalledError(AssertionError):
    """A run did not go idle within the clock's real-time ``timeout``.

    Under a [`FakeClock`][], a run may wait on virtual time (its own sleeps, timeouts and loop
    timers) or on work that completes by itself. A run that waits on anything else (an event
    nobody sets, real I/O with no timeout) would hang the test; this error ends the wait
    instead, and names the task, the virtual instant and where the run waits.
    """


@dataclass(eq=False)
class _Activity:
    """Something the clock must wait for: a task's loop, a child task, or a thread's future.

    It is *quiet* when it sleeps on the clock, waits only on other activities, or is done.
    """

    future: asyncio.Future[Any]
    order: int  # start order: breaks ties between deadlines
    scope: Scope | None  # the runs' virtual waits (None: not a periodic task's)
    waiting: int = 0
    # What this task delegated work to (track() called from inside it). While it waits, it is
    # quiet only as long as none of them has finished: a finished child wakes it up.
    children: list[asyncio.Future[Any]] = field(default_factory=list)

    def quiet(self, sleep: asyncio.Future[None] | None) -> bool:
        """Whether it is quiet, given the clock future it sleeps on (None: not asleep)."""
        future = self.future
        if future.done() or (sleep is not None and not sleep.done()):
            return True
        if self.waiting > 0 and not any(child.done() for child in self.children):
            return True
        # Mid-run: quiet while blocked and its run waits on virtual time (a loop timer or a
        # thread's time.sleep) with none of its threads at work.
        scope = self.scope
        if scope is None or scope.waits == 0 or scope.busy:
            return False
        if isinstance(future, asyncio.Task):
            waiter = getattr(future, "_fut_waiter", None)
            return waiter is not None and not waiter.done()
        return True  # a worker thread parked in a virtual time.sleep

    def describe(self) -> str:
        future = self.future
        if isinstance(future, asyncio.Task):
            return _virtual.describe_wait(future, self.scope)
        if self.scope is not None:
            return (
                "a worker thread (a def job, or a thread its run started) is still working: real "
                "blocking work, or a wait the clock cannot see"
            )
        return "a worker thread (a def job or its timeout)"


# A sleeper in the heap: (deadline, start order, sequence, future, activity); tuples compare
# in C. An entry whose future is done (woken, or cancelled) is dead and dropped lazily.
_Entry = tuple[int, int, int, "asyncio.Future[None]", _Activity]

# A wait inside a run in the second heap: (deadline, sequence, timer or thread sleep). A timer
# that fired or was cancelled is dead and dropped lazily.
_TimerEntry = tuple[int, int, "VirtualTimer | ThreadSleep"]


class RunHistory(Sequence[RunRecord]):
    """The attempts of the runs under a clock, in the order the attempts ended.

    It keeps the most recent ``limit`` records (all of them when ``limit`` is ``None``, none
    when it is 0): a simulated month of a 1 s job would otherwise hold 2.6 million records.
    `total` and `count_of()` stay exact whatever the limit. Tasks may be named by their
    name, their [`PeriodicTask`][] or a handle. Safe to read from any
    thread.
    """

    def __init__(self, limit: int | None = DEFAULT_HISTORY) -> None:
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
        ):
            raise ValueError(
                f"history must be a number of records ≥ 0, or None to keep all, got {limit!r}"
            )
        self._limit = limit
        self._records: collections.deque[RunRecord] = collections.deque(maxlen=limit)
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._total = 0
        self._lock = threading.Lock()

    def _add(self, record: RunRecord) -> None:
        with self._lock:
            self._total += 1
            self._counts[record.task, record.outcome] += 1
            self._records.append(record)  # (a no-op when the limit is 0: maxlen=0)

    @overload
    def __getitem__(self, index: int) -> RunRecord: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[RunRecord]: ...

    def __getitem__(self, index: int | slice) -> RunRecord | Sequence[RunRecord]:
        with self._lock:
            if isinstance(index, slice):
                return list(self._records)[index]
            return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    @property
    def limit(self) -> int | None:
        """How many records are kept (``None``: all)."""
        return self._limit

    @property
    def total(self) -> int:
        """Attempts recorded since the clock was made (or cleared), kept or not."""
        return self._total

    @property
    def dropped(self) -> int:
        """Attempts recorded but no longer kept, because of `limit`."""
        return self._total - len(self._records)

    def count_of(
        self,
        task: str | PeriodicTask[Any] | TaskHandle | None = None,
        outcome: str | None = None,
    ) -> int:
        """Exact number of attempts of ``task`` (all tasks: ``None``) ending in ``outcome``."""
        name = _name_of(task)
        with self._lock:
            return sum(
                n
                for (t, o), n in self._counts.items()
                if (name is None or t == name) and (outcome is None or o == outcome)
            )

    def of(self, task: str | PeriodicTask[Any] | TaskHandle | None = None) -> list[RunRecord]:
        """The kept records of ``task`` (all kept records when ``None``)."""
        with self._lock:
            records = list(self._records)
        name = _name_of(task)
        if name is None:
            return records
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
        """Forget every record and reset the counts."""
        with self._lock:
            self._records.clear()
            self._counts.clear()
            self._total = 0

    def __repr__(self) -> str:
        return f"<RunHistory of {len(self)} attempts ({self._total} recorded)>"


def _name_of(task: str | PeriodicTask[Any] | TaskHandle | None) -> str | None:
    return task if task is None or isinstance(task, str) else task.name


class FakeClock:
    """Virtual time for periodic tasks: it only moves when a test says so.

    While installed (``with FakeClock() as clock:`` or the ``fake_clock`` pytest fixture), it is
    the default ``clock`` and ``sleep`` of every task *started* under it; application code does
    not change. Users may rely on:

    - **Exact time.** Virtual time is kept in integer nanoseconds;
      [`now`][] starts at 0.0 and 86,400 ``advance(1)``
      calls land exactly on 86,400.0.
    - **Deterministic steps.** [`advance`][] runs every
      run due up to and including ``now + seconds``, one deadline at a time in deadline order
      (ties: the order the tasks started), and at each deadline waits until every woken task
      has finished its run (runs in worker threads included) and is asleep again or has ended.
      When one task alone has work up to its next tick (nothing else awake, due or ready to
      run on the loop), it goes on to that tick at once, without a step of ``advance``
      between: the same runs at the same instants, at a fraction of the cost. It does so at
      most 256 times in a row, so the event loop still polls its I/O during a long advance.
    - **Virtual time inside runs.** A run's own ``asyncio.sleep``, ``asyncio.wait_for``,
      ``asyncio.timeout``/``timeout_at``, ``loop.call_later``/``call_at``/``loop.time()`` and
      what is built on them (anyio on asyncio, tenacity, stamina, backoff) take virtual time,
      in the run and in every task it spawns; so does ``time.sleep`` in a ``def`` job's thread
      (and in ``asyncio.to_thread`` calls of a run). Those timers are stepped in time order
      with the tasks' deadlines. A run still waiting beyond the target of ``advance`` is left
      mid-run; the next ``advance`` continues it. The test's own code, ``TestClient`` and
      httpx keep real time. ``time.monotonic()`` and ``time.time()`` are not virtualised
      (``time.time()`` follows the clock under freezegun or time-machine, see below).
    - **No hangs.** A run that waits on something the clock does not drive (an event nobody
      sets, real I/O) for longer than ``timeout`` real seconds raises
      [`RunStalledError`][] naming the task, the virtual
      instant and what it waits in.
    - **Wall clock in step.** The clock has a virtual wall time (``start``, or the current time)
      that moves with it; cron and aligned schedules read it. If freezegun's ``freeze_time``
      or time-machine's ``travel`` is active, each step moves it, so ``datetime.now()`` inside
      a run is the virtual instant — also when the travel starts after the clock (in the test
      body, or by a fixture set up later): the clock adopts the travel's time as the current
      virtual instant at its next step. With ``start=`` and ``travel=True`` (the default) the
      clock starts such a travel itself (time-machine if installed, else freezegun) and ends it
      when uninstalled.
    - **Bounded history.** [`history`][] keeps the last
      ``history`` attempts (10,000 by default; ``None`` keeps all, 0 none); its counts stay
      exact.
    - **Sync tests.** [`advance_blocking`][]
      does the same from a thread that is not running an event loop, for apps driven by
      FastAPI's ``TestClient`` in another thread.
    - **One driver at a time.** Two ``advance`` calls at once (two tasks, or two threads) are
      refused with ``RuntimeError``: each would move time under the other.

    Tasks started with their own ``clock=``/``sleep=`` arguments do not use this clock. Under
    uvloop the loop's timers cannot be diverted: time inside runs stays real there.
    """

    def __init__(
        self,
        *,
        start: dt.datetime | None = None,
        timeout: float = 5.0,
        travel: bool = True,
        history: int | None = DEFAULT_HISTORY,
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
        self._travel_key: object = None  # the travel whose time the wall clock follows
        self._timeout = float(timeout)
        self._sleepers: list[_Entry] = []
        self._timers: list[_TimerEntry] = []
        self._activities: dict[asyncio.Future[Any], _Activity] = {}
        # The activities split in two, so that _quiet() (once per deadline) costs only what was
        # woken, however many tasks sleep: those asleep on this clock, with the future they
        # sleep on, and the others.
        self._asleep: dict[_Activity, asyncio.Future[None]] = {}
        self._awake: set[_Activity] = set()
        self._waits = 0  # virtual timers and thread sleeps of runs not yet fired (all scopes)
        self._busy = 0  # worker threads of runs at work (all scopes)
        self._patches: dict[asyncio.AbstractEventLoop, LoopPatch | None] = {}
        self._order = itertools.count()
        self._seq = itertools.count()
        self._history = RunHistory(history)
        # TaskObserver.run_finished: the history's own method, one call less per attempt.
        self.run_finished: Callable[[RunRecord], None] = self._history._add
        self._install_stack = contextlib.ExitStack()
        self._installed = False
        self._waiter_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._blocked = 0  # threads waiting on _changed
        self._moves = 0  # how many times time moved or tasks were woken
        self._changes = 0  # how many times anything the clock watches changed
        self._driver: object = None  # the task or thread inside advance()
        # While an advance() runs on a loop: its target (ns, else -1), loop, ready queue and
        # travel, and how many jumps it allows before the next step of its own (see _jump).
        self._jump_until = -1
        self._jump_loop: asyncio.AbstractEventLoop | None = None
        self._jump_ready: Any = None
        self._jump_travel: _TimeMachineTravel | _FreezegunTravel | None = None
        self._jumps_left = 0
        self._closed = False

    # -- installing --------------------------------------------------------------------------

    def install(self) -> FakeClock:
        """Become the default clock of tasks started from now on (and start the travel)."""
        if self._installed:
            raise RuntimeError("this FakeClock is already installed")
        stack = self._install_stack
        stack.enter_context(installed(self))
        active = _active_travel()
        if self._travel_requested and active is None:
            stack.enter_context(_start_travel(self.now_datetime))
            active = _active_travel()
        elif active is not None and self._start is None:
            self._wall_base = active.now_ns() - self._now
        self._travel_key = None if active is None else active.key
        _virtual.patch_time_sleep()
        stack.callback(_virtual.unpatch_time_sleep)
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Stop being the default; end the travel this clock started. Idempotent.

        Waits of runs still pending become real: a loop timer fires after the virtual time it
        had left, in real time; a thread parked in ``time.sleep`` returns at once.
        """
        if not self._installed:
            return
        self._installed = False
        self._install_stack.close()
        with self._lock:
            self._closed = True  # release threads still waiting on _changed
            self._changed.notify_all()
            timers, self._timers = self._timers, []
            now = self._now
        self._release_threads(timers)
        for _, _, item in timers:
            if isinstance(item, VirtualTimer) and not item._fired and not item._cancelled:
                _realize(item, (item.deadline - now) / NS)
        for loop, patch in self._patches.items():
            if patch is not None and not loop.is_closed():
                patch.remove()
        self._patches.clear()
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
        """The pending wake-up instants (virtual seconds), earliest first, with repeats.

        Both the tasks' own sleeps and the waits inside runs (loop timers, thread sleeps).
        """
        with self._lock:
            pending = [e[0] for e in self._sleepers if not e[3].done()]
            pending += [e[0] for e in self._timers if _timer_alive(e[2])]
            return sorted(d / NS for d in pending)

    @property
    def history(self) -> RunHistory:
        """The attempts of the runs of tasks started under this clock (see RunHistory)."""
        return self._history

    @property
    def timeout(self) -> float:
        """Real seconds a run may take before it is reported stalled."""
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
        ``seconds <= 0`` only yields to the event loop, like ``asyncio.sleep``. Inside a run,
        plain ``asyncio.sleep`` is virtual too.
        """
        if seconds <= 0:
            return asyncio.sleep(0)
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("FakeClock.sleep() must be awaited inside an asyncio task")
        with self._lock:
            activity = self._activities.get(task) or self._track(task)
        return self._sleep_of(activity, task.get_loop(), False, seconds)

    def hot_path(self) -> tuple[Callable[[], int], Callable[[float], Awaitable[None]]]:
        """[`monotonic_ns`][], and
        [`sleep`][] bound to the calling task.

        A periodic task's loop calls it once, inside its own task, before its first sleep: the
        task's context becomes a scope of this clock, so time inside its runs is virtual.
        """
        task = asyncio.current_task()
        assert task is not None, "called by a task's loop, inside the task"
        loop = task.get_loop()
        scope = Scope(self)
        _virtual.enter_scope(scope)
        with self._lock:
            activity = self._activities.get(task) or self._track(task)
            activity.scope = scope
            if loop not in self._patches:
                patch = LoopPatch(loop, self)
                self._patches[loop] = patch if patch.install() else None
        # sleep() without looking up the task: a day of a 1 s job calls this 86,400 times.
        return self.monotonic_ns, functools.partial(self._sleep_of, activity, loop, True)

    def _sleep_of(
        self,
        activity: _Activity,
        loop: asyncio.AbstractEventLoop,
        awaited_now: bool,
        seconds: float,
    ) -> asyncio.Future[None]:
        """A future the clock resolves ``seconds`` (> 0) from now; ``activity`` sleeps on it.

        ``awaited_now``: the caller awaits the future at once (a task's loop does), so it may
        be resolved at once when nothing else could run before its deadline (see `_jump`).
        """
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            deadline = self._now + round(seconds * NS)  # (to_ns() and _notify(), inlined)
            if (
                deadline <= self._jump_until
                and awaited_now
                and self._may_jump(activity, loop, deadline)
            ):
                return self._jump(future, deadline)
            heapq.heappush(
                self._sleepers, (deadline, activity.order, next(self._seq), future, activity)
            )
            self._asleep[activity] = future
            self._awake.discard(activity)
            self._changes += 1
            if self._blocked:
                self._changed.notify_all()
        return future

    def _may_jump(
        self, activity: _Activity, loop: asyncio.AbstractEventLoop, deadline: int
    ) -> bool:
        """Whether ``activity`` (the running task, about to sleep until ``deadline``) may
        skip the wait: an advance() on its loop reaches ``deadline``, nothing else is due up
        to it, and nothing else is awake or ready to run. (Under the lock.)

        Then what advance() would do — let the task go to sleep, see everything idle, move
        time to ``deadline`` and wake the task — comes to the same: the task goes on at once,
        at ``deadline``, with no loop iteration and no step of advance() in between. The only
        other callback ready must be advance()'s own next step.
        """
        if loop is not self._jump_loop or self._busy or self._jumps_left <= 0:
            return False
        awake = self._awake
        if len(awake) != 1 or activity not in awake:
            return False
        ready = self._jump_ready
        if len(ready) != 1 or getattr(ready[0]._callback, "__self__", None) is not self._driver:
            return False
        self._drop_dead()
        sleepers, timers = self._sleepers, self._timers
        return (not sleepers or sleepers[0][0] > deadline) and (
            not timers or timers[0][0] > deadline
        )

    def _jump(self, future: asyncio.Future[None], deadline: int) -> asyncio.Future[None]:
        """Move time to ``deadline`` and resolve ``future`` at once (see `_may_jump`)."""
        self._jump_to(deadline)
        future.set_result(None)
        return future

    def _jump_to(self, deadline: int) -> None:
        self._jumps_left -= 1
        self._now = deadline
        self._moves += 1
        self._notify()
        travel = self._jump_travel
        if travel is not None:
            travel.move_to(self.now_datetime)

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
                self._wake_if_cancelled(owner)
                owner.children.append(activity)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        with self._lock:
            activity = self._activities.get(task) or self._track(task)
            self._wake_if_cancelled(activity)
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

    def _track(self, future: asyncio.Future[Any]) -> _Activity:
        activity = _Activity(future, next(self._order), _virtual.scope_of(None))
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

    def _wake_if_cancelled(self, activity: _Activity) -> None:
        """An activity believed asleep on the clock is at work: its sleep was cancelled.

        (Checked where a run's waits begin, rather than by watching every sleep: a step costs
        what was woken, not what sleeps.)
        """
        sleep = self._asleep.get(activity)
        if sleep is not None and sleep.done():
            del self._asleep[activity]
            self._awake.add(activity)

    def _notify(self) -> None:
        self._changes += 1
        if self._blocked:  # only threads blocked in _wait_quiet listen
            self._changed.notify_all()

    # -- waits inside runs (called by the diversions in _virtual) ------------------------------

    def _current_activity_wakes(self) -> None:
        task = asyncio.current_task()
        activity = self._activities.get(task) if task is not None else None
        if activity is not None:
            self._wake_if_cancelled(activity)

    def _add_timer(
        self,
        loop: asyncio.AbstractEventLoop,
        scope: Scope,
        deadline: int,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        context: Any,
    ) -> VirtualTimer:
        with self._lock:
            timer = VirtualTimer(max(deadline, self._now), callback, args, loop, context, scope)
            if timer.deadline <= self._jump_until and callback is _SLEEP_DONE:
                # asyncio.sleep() inside a run: it awaits its future right after this returns,
                # so it may be resolved at once when nothing else could run before it is due.
                task = asyncio.current_task()
                activity = self._activities.get(task) if task is not None else None
                if activity is not None and self._may_jump(activity, loop, timer.deadline):
                    timer._fired = True
                    self._jump_to(timer.deadline)
                    _virtual.run_timer(timer)
                    return timer
            heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
            scope.waits += 1
            self._waits += 1
            self._current_activity_wakes()
            self._notify()
        return timer

    def _wait_ended(self, scope: Scope) -> None:
        """A wait of ``scope`` fired or was cancelled (under the lock)."""
        scope.waits -= 1
        self._waits -= 1
        self._notify()

    def _release_threads(self, timers: list[_TimerEntry] | None = None) -> None:
        """Wake every thread parked in a virtual ``time.sleep`` at once (the clock or the loop
        is going away: nothing would wake them any more)."""
        with self._lock:
            for _, _, item in self._timers if timers is None else timers:
                if isinstance(item, ThreadSleep) and not item.event.is_set():
                    self._wait_ended(item.scope)
                    if item.count is not None:
                        self._count_thread(item.count, ThreadCount.RELEASED)
                    item.event.set()

    def _thread_started(self, scope: Scope) -> ThreadCount:
        with self._lock:
            scope.busy += 1
            self._busy += 1
            self._current_activity_wakes()
            self._notify()
        return ThreadCount(scope)

    def _count_thread(self, count: ThreadCount, state: int) -> None:
        """Move a worker thread's count to ``state``, keeping ``busy`` in step (under lock)."""
        was_counted = count.state == ThreadCount.RUNNING
        if count.state == ThreadCount.RELEASED:
            return  # its future ended: the thread is none of the clock's business any more
        count.state = state
        change = (state == ThreadCount.RUNNING) - was_counted
        count.scope.busy += change
        self._busy += change
        self._notify()

    def _thread_ended(self, count: ThreadCount) -> None:
        with self._lock:
            self._count_thread(count, ThreadCount.RELEASED)

    def _thread_sleep(self, scope: Scope, seconds: float, count: ThreadCount | None) -> None:
        """``time.sleep(seconds)`` in a worker thread of ``scope``: park until advanced to."""
        with self._lock:
            if self._closed:
                return
            entry = ThreadSleep(self._now + to_ns(seconds), scope, count)
            heapq.heappush(self._timers, (entry.deadline, next(self._seq), entry))
            scope.waits += 1
            self._waits += 1
            if count is not None:
                self._count_thread(count, ThreadCount.PARKED)
            self._notify()
        entry.event.wait()

    # -- stepping (async) --------------------------------------------------------------------

    async def advance(self, seconds: float | dt.timedelta) -> None:
        """Move virtual time ``seconds`` ahead, running every run due on the way.

        See the class docstring for the guarantees. ``seconds`` may be 0 (run what is due).
        """
        target = self._now + _check_seconds(seconds)
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)  # the loop's queue of callbacks to run
        with self._driving("advance"):
            await self._settle(loop)
            travel = self._follow_travel()
            if ready is not None:  # tasks may jump to their next deadline (see _jump)
                self._jump_loop, self._jump_ready, self._jump_travel = loop, ready, travel
                self._jump_until = target
            try:
                while True:
                    due = self._next_due(target, travel, loop)
                    if due is None:
                        return
                    if due:
                        self._wake(due, loop)
                    self._jumps_left = _MAX_JUMPS
                    await asyncio.sleep(0)  # the common case: the woken ran and sleep again
                    # (Once per deadline, so the common case is read without the lock: nothing
                    # awake, no thread at work, nothing ready to run.)
                    if (self._awake or self._busy or ready) and not self._quiet(loop):
                        await self._settle(loop)
            finally:
                self._jump_until = -1
                self._jump_loop = self._jump_ready = self._jump_travel = None

    async def step(self) -> float | None:
        """Advance to the next pending deadline and run what is due there.

        Returns the new [`now`][], or ``None`` (time
        unchanged) when nothing is pending.
        """
        loop = asyncio.get_running_loop()
        with self._driving("step"):
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
        """Return once every woken task is idle again; RunStalledError after ``timeout``."""
        for _ in range(_FAST_YIELDS):
            await asyncio.sleep(0)
            if self._quiet(loop):
                return
        # Slow path: work in threads, or waits the clock does not drive. Wait for news in a
        # thread (the loop stays free to finish the work), re-checking on the loop itself.
        give_up = time.monotonic() + self._timeout
        while True:
            changes = self._changes
            await loop.run_in_executor(self._pool(), self._wait_change, changes)
            for _ in range(_FAST_YIELDS):
                if self._quiet(loop):
                    return
                await asyncio.sleep(0)
            if time.monotonic() >= give_up:
                self._stalled()

    def _wait_change(self, changes: int) -> None:
        with self._lock:
            self._blocked += 1
            try:
                self._changed.wait_for(lambda: self._closed or self._changes != changes, _POLL)
            finally:
                self._blocked -= 1

    @contextlib.contextmanager
    def _driving(self, what: str) -> Iterator[None]:
        try:
            driver: object = asyncio.current_task() or threading.current_thread()
        except RuntimeError:  # no running loop: a sync test's thread
            driver = threading.current_thread()
        with self._lock:
            if self._driver is not None and self._driver is not driver:
                raise RuntimeError(
                    f"FakeClock.{what}() called while another advance is in progress (from "
                    f"{_describe_driver(self._driver)}): one test drives the clock, one step at a "
                    "time; await the first call before making the next"
                )
            outer = self._driver
            self._driver = driver
        try:
            yield
        finally:
            with self._lock:
                self._driver = outer

    # -- stepping (blocking) -----------------------------------------------------------------

    def advance_blocking(self, seconds: float | dt.timedelta) -> None:
        """[`advance`][] for sync tests: the tasks run in
        another thread's event loop.

        Call it from a thread with no running event loop (a plain ``def`` test driving
        FastAPI's ``TestClient``, for instance); it returns when virtual time has reached
        ``now + seconds`` and every run on the way has finished.
        """
        _require_no_running_loop("advance_blocking", "await clock.advance(...)")
        step = _check_seconds(seconds)
        loop = self._only_loop()
        if loop is not None:
            # Every task lives on one loop: step there, where idleness can be seen.
            asyncio.run_coroutine_threadsafe(self.advance(step / NS), loop).result()
            return
        target = self._now + step
        with self._driving("advance_blocking"):
            self._settle_blocking()
            travel = self._follow_travel()
            while True:
                due = self._next_due(target, travel, None)
                if due is None:
                    return
                self._wake(due, None)
                self._settle_blocking()

    def step_blocking(self) -> float | None:
        """[`step`][] for sync tests (see
        [`advance_blocking`][])."""
        _require_no_running_loop("step_blocking", "await clock.step()")
        self._settle_blocking()
        nxt = self._next_deadline()
        if nxt is None:
            return None
        self.advance_blocking((nxt - self._now) / NS)
        return self.now

    def run_due_blocking(self) -> None:
        """[`run_due`][] for sync tests (see
        [`advance_blocking`][])."""
        self.advance_blocking(0)

    def _settle_blocking(self) -> None:
        if not self._wait_quiet():
            self._stalled()

    def _only_loop(self) -> asyncio.AbstractEventLoop | None:
        """The one running event loop of every live activity, if there is exactly one."""
        with self._lock:
            loops = {a.future.get_loop() for a in self._activities.values() if _alive(a.future)}
        if len(loops) != 1:
            return None
        loop = loops.pop()
        return loop if loop.is_running() else None

    # -- shared machinery --------------------------------------------------------------------

    def _quiet(self, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Whether every woken task is idle again (``loop``: the caller's, if it runs there)."""
        with self._lock:
            if self._busy:  # worker threads of runs at work
                return False
            asleep = self._asleep
            for activity in self._awake:
                if not activity.quiet(asleep.get(activity)) and _alive(activity.future):
                    return False
            # Idle only if nothing at all is ready to run on the loop: a task woken by another
            # or by a cancellation, a callback on its way. Otherwise the clock could move on
            # (fire a timer, wake the next deadline) before code that acts at this instant ran.
            return loop is None or not getattr(loop, "_ready", None)

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
            if self._busy and not busy:
                busy = ["a worker thread started by a run is still working"]
        raise RunStalledError(
            f"FakeClock: at virtual instant {self.now:g} s ({self.now_datetime.isoformat()}), "
            f"a run did not go idle within {self._timeout:g} s of real time: "
            f"{'; '.join(busy) or 'a task is still busy'}. Under a FakeClock a run may wait on "
            "virtual time (asyncio.sleep, timeouts, loop timers, time.sleep in a def job) or on "
            "work that completes by itself; raise FakeClock(timeout=...) if the work is just slow."
        )

    def _next_deadline(self) -> int | None:
        with self._lock:
            self._drop_dead()
            candidates = [heap[0][0] for heap in (self._sleepers, self._timers) if heap]
            return min(candidates) if candidates else None

    def _drop_dead(self) -> None:
        sleepers = self._sleepers
        while sleepers and sleepers[0][3].done():
            heapq.heappop(sleepers)
        timers = self._timers
        while timers and not _timer_alive(timers[0][2]):
            heapq.heappop(timers)

    def _next_due(
        self,
        target: int,
        travel: _TimeMachineTravel | _FreezegunTravel | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> list[asyncio.Future[None] | VirtualTimer] | None:
        """Move to the next deadline ≤ ``target`` and wake what is due there: sleepers on
        ``loop`` (the caller's) and threads parked in ``time.sleep`` at once; the rest (timers,
        sleepers on other loops) is returned for `_wake`. ``None``: nothing is due, time moved
        to ``target``.

        (The hot path of every simulated run that cannot jump: `_notify` is inlined.)
        """
        due: list[asyncio.Future[None] | VirtualTimer] = []
        with self._lock:
            if not self._awake:
                # A set never shrinks, and iterating it visits every slot it ever had: after
                # 10,000 tasks started at once, a fresh one keeps each step O(woken).
                self._awake = set()
            self._drop_dead()
            sleepers, timers = self._sleepers, self._timers
            if timers:  # waits inside runs pending: the earlier of the two heaps
                nxt = timers[0][0] if not sleepers else min(sleepers[0][0], timers[0][0])
            else:
                nxt = sleepers[0][0] if sleepers else target + 1
            self._moves += 1
            self._changes += 1
            if self._blocked:
                self._changed.notify_all()
            if nxt > target:
                self._now = max(self._now, target)
                moved = False
            else:
                # (Every deadline is ≥ the instant it was set at, so ≥ now: time moves forward.)
                self._now = now = nxt
                moved = True
                asleep, awake = self._asleep, self._awake
                while sleepers and sleepers[0][0] <= now:
                    _, _, _, future, activity = heapq.heappop(sleepers)
                    if not future.done():
                        # Busy from now on, even before it resumes.
                        del asleep[activity]
                        awake.add(activity)
                        if future.get_loop() is loop:
                            # Resumes only when the caller yields, after the travel moved.
                            future.set_result(None)
                        else:
                            due.append(future)
                while timers and timers[0][0] <= now:  # (skipped at once when empty)
                    item = heapq.heappop(timers)[2]
                    if not _timer_alive(item):
                        continue
                    if isinstance(item, ThreadSleep):
                        self._wait_ended(item.scope)
                        if item.count is not None:
                            self._count_thread(item.count, ThreadCount.RUNNING)
                        item.event.set()
                    else:
                        item._fired = True
                        self._wait_ended(item.scope)
                        due.append(item)
        if travel is not None:
            travel.move_to(self.now_datetime)
        return due if moved else None

    def _wake(
        self,
        due: list[asyncio.Future[None] | VirtualTimer],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        for item in due:
            if isinstance(item, VirtualTimer):
                item_loop = item.loop
                if item_loop is loop:
                    # What the loop would do in its next iteration, without the iteration:
                    # Handle._run runs the callback in the timer's context, errors reported.
                    _virtual.run_timer(item)
                elif not item_loop.is_closed():
                    item_loop.call_soon_threadsafe(_virtual.run_timer, item)
                continue
            future_loop = item.get_loop()
            if future_loop is loop:
                _resolve(item)
            elif not future_loop.is_closed():
                future_loop.call_soon_threadsafe(_resolve, item)

    def _follow_travel(self) -> _TimeMachineTravel | _FreezegunTravel | None:
        """The active travel to move at each step; one started since the last step is adopted:
        its time becomes the current virtual instant."""
        travel = _active_travel()
        if travel is not None and travel.key is not self._travel_key:
            with self._lock:
                self._wall_base = travel.now_ns() - self._now
                self._travel_key = travel.key
        elif travel is None:
            self._travel_key = None
        return travel

    def __repr__(self) -> str:
        return f"<FakeClock now={self.now:g}s wall={self.now_datetime.isoformat()}>"


def _timer_alive(item: VirtualTimer | ThreadSleep) -> bool:
    if isinstance(item, ThreadSleep):
        return not item.event.is_set()
    return not item._fired and not item._cancelled


def _realize(timer: VirtualTimer, remaining: float) -> None:
    """After the clock is gone, a pending timer of a run fires in real time instead."""
    loop = timer.loop
    if loop.is_closed():
        return

    def schedule() -> None:
        if not timer._cancelled:
            timer._fired = True
            timer._real = loop.call_later(max(remaining, 0.0), _virtual.run_timer, timer)

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        schedule()
    else:
        loop.call_soon_threadsafe(schedule)


def _describe_driver(driver: object) -> str:
    if isinstance(driver, asyncio.Task):
        return f"task {driver.get_name()!r}"
    if isinstance(driver, threading.Thread):
        return f"thread {driver.name!r}"
    return repr(driver)


# The callback of asyncio.sleep()'s timer (None if a Python version names it otherwise: then
# such sleeps are stepped by advance() as any other timer).
_SLEEP_DONE: object = getattr(asyncio.futures, "_set_result_unless_cancelled", None)

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
        self.key: object = traveller

    def move_to(self, when: dt.datetime) -> None:
        self._traveller.move_to(when, tick=False)

    def now_ns(self) -> int:
        return int(self._traveller.time_ns())


class _FreezegunTravel:
    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self.key: object = factory

    def move_to(self, when: dt.datetime) -> None:
        self._factory.move_to(when)

    def now_ns(self) -> int:
        return _wall_ns_of(self._factory())  # a naive UTC datetime


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
