"""The periodic task (what the decorators return) and the handle of one of its running loops.

The loop itself, and the pipeline each tick goes through, live in `._runner`; the
handle is the small face users hold: state, stop, cancel, wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import sys
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._durations import Seconds, duration_ns
from ._records import RunRecord, TaskState
from ._runner import Runner, in_thread
from ._runner import log as log
from ._timebase import default_timebase

if TYPE_CHECKING:
    from ._options import TaskOptions
    from ._schedule import Schedule
    from ._timebase import Clock

R = TypeVar("R")

# Every running loop by name, so none is garbage-collected while it runs (asyncio keeps only
# weak references to tasks), and how get_handle and the unique-name rule find them without
# scanning. A name maps to its handle, or (only with a claim store, when several loops share
# it) to a list of them in start order: no list per task in the usual case, and no second
# collection (a set of the same handles cost ~50 B per idle task). A handle leaves when its
# loop ends.
_BY_NAME: dict[str, TaskHandle | list[TaskHandle]] = {}

_RETURNED: concurrent.futures.Future[None] = concurrent.futures.Future()
_RETURNED.set_result(None)


class PeriodicTask(Generic[R]):
    """A function turned into a periodic job by `repeat_every` or `repeat_at`.

    ``R`` is what the job returns (for an ``async def``, what its coroutine returns), so an
    ``async def cleanup() -> None`` job is a ``PeriodicTask[None]``.

    Calling it (with no arguments) starts its loop in the background on the running event
    loop and returns a `TaskHandle`; ``await task()`` also works, as in fastapi-utils'
    documentation. It can be started again once its loop has ended, but runs at most once at
    a time in a process (in any event loop), as any task of its name without a claim store:
    two loops of the same job would overlap, which is what this library exists to prevent.
    (With a claim store, tasks of the same name may run side by side: the store decides which
    runs each tick.) For the same reason two runs of a ``def`` job never overlap: a run waits
    until the previous run's worker thread has returned (one a cancelled loop left behind).
    """

    def __init__(
        self,
        func: Callable[[], Awaitable[R]] | Callable[[], R],
        options: TaskOptions,
        *,
        name: str,
        is_async: bool,
    ) -> None:
        self._func: Callable[[], Any] = func
        self._options = options
        self._name = name
        self._is_async = is_async
        self._handle: TaskHandle | None = None
        # Done when the worker thread of this job's latest def run has returned (see
        # Runner._call_in_thread); done from the start.
        self._thread_run: concurrent.futures.Future[None] = _RETURNED
        # updated=(): copying the job's __dict__ would let a callable object's attributes
        # (say its own ``_options``) overwrite this task's.
        functools.update_wrapper(self, func, updated=())

    @property
    def name(self) -> str:
        """The task's name: in logs, in run records, and as its key in claim stores."""
        return self._name

    @property
    def schedule(self) -> Schedule:
        """When the task runs."""
        return self._options.schedule

    @property
    def handle(self) -> TaskHandle | None:
        """The handle of the most recently started loop (``None`` before the first start)."""
        return self._handle

    async def call(self) -> R:
        """Run the job's body once, now, and return its result: for unit tests of the body.

        Nothing else of the task happens: no schedule, timeout, retry, hook, claim or record.
        The job is called as its loop calls it: an ``async def`` is awaited, a ``def`` runs in
        a worker thread. Typed: ``await cleanup.call()`` is what ``cleanup``'s body returns.
        """
        if self._is_async:
            return cast(R, await self._func())
        result = await in_thread(asyncio.get_running_loop(), self._func)
        return cast(R, result)

    def __call__(self) -> TaskHandle:
        return self.start()

    def start(self) -> TaskHandle:
        """Start the loop on the running event loop and return its handle.

        Runs under asyncio (and uvloop, which is asyncio's loop). trio is not supported: a
        start under trio raises a ``RuntimeError`` that says so.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(_not_on_asyncio(self.name)) from None
        current = self._handle
        if current is not None and current._runner.loop is loop and not current.done:
            raise RuntimeError(
                f"{self.name} is already running in this event loop; stop it first "
                "(handle.stop()) or use its handle (task.handle)"
            )
        if self._options.store is None:
            for other in _alive(self.name):
                if other._runner.opts.store is None:
                    raise RuntimeError(
                        f"a task named {self.name!r} is already running in this process; "
                        "names of tasks without a claim store are unique per process (give "
                        "this one another name=, or stop the other first: "
                        f"repeat_every.get_handle({self.name!r}).stop())"
                    )
        handle = TaskHandle(self, self._options.timebase or default_timebase(), loop)
        self._handle = handle
        return handle

    def __repr__(self) -> str:
        return f"<PeriodicTask {self.name} {self.schedule.describe()}>"


def _not_on_asyncio(name: str) -> str:
    """Why a task cannot start here. Only called on failure: asyncio users never pay for it."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return (
                f"{name}: repeat_every runs on asyncio (and uvloop), not on trio: this code runs "
                "under trio (trio.run, anyio's trio backend, hypercorn's trio worker). Run the "
                "app on asyncio (anyio.run(..., backend='asyncio'), hypercorn's asyncio worker)"
            )
    return (
        f"{name}: a periodic task starts on a running event loop; call it from async code "
        "(a FastAPI lifespan or startup handler, or inside asyncio.run())"
    )


class TaskHandle:
    """One running loop of a `PeriodicTask`.

    Users may rely on:

    - `stop` lets the current run finish and starts no new one; `cancel` also
      cancels an ``async def`` run in progress (a ``def`` run in its thread cannot be
      interrupted and finishes in the background; the job's next loop waits for it).
    - ``await handle.wait()`` returns when the loop has ended and re-raises the exception that
      ended it (``raise_exceptions=True`` or a hook that raised). An ending exception that
      nobody is awaiting goes to the event loop's exception handler instead: it never
      disappears.
    - The counters and `state` are safe to read at any moment from the event loop's
      thread; `state` is a consistent snapshot.
    - The library holds a strong reference to the handle while its loop runs. A loop whose
      event loop was closed under it counts as ended: it leaves `running_handles`, and
      `stop` and `cancel` do nothing.
    - ``await handle`` returns the handle at once (so ``await task()`` works).
    """

    __slots__ = ("__weakref__", "_runner", "_start_wall")

    def __init__(self, task: PeriodicTask[Any], clock: Clock, loop: asyncio.AbstractEventLoop):
        self._start_wall = clock.wall()  # when the loop started, on its wall clock
        self._runner = Runner(task, clock, loop, self._ended)
        same = _BY_NAME.setdefault(task.name, self)
        if same is not self:
            if isinstance(same, list):
                same.append(self)
            else:
                _BY_NAME[task.name] = [same, self]

    def _ended(self, task: asyncio.Task[None]) -> None:
        _forget(self)
        self._runner.crashed(task)

    @property
    def name(self) -> str:
        """The task's name."""
        return self._runner.name

    @property
    def task(self) -> PeriodicTask[Any]:
        """The periodic task this loop runs."""
        return self._runner.periodic

    @property
    def started_at(self) -> dt.datetime:
        """Wall-clock (UTC) instant the loop started (what a health check counts grace from)."""
        return dt.datetime.fromtimestamp(self._start_wall, dt.timezone.utc)

    @property
    def runs(self) -> int:
        """Runs done so far (failed runs included; a retried run counts once)."""
        return self._runner.runs

    @property
    def failures(self) -> int:
        """Runs whose last attempt failed."""
        return self._runner.failures

    @property
    def retries(self) -> int:
        """Extra attempts made by the retry policy."""
        return self._runner.retries

    @property
    def skipped(self) -> int:
        """Ticks not run because a run overran them or the claim store failed."""
        return self._runner.skipped

    @property
    def elsewhere(self) -> int:
        """Ticks another process claimed (with a claim store)."""
        return self._runner.elsewhere

    @property
    def last_exception(self) -> BaseException | None:
        """The exception of the most recent failed run, if any."""
        return self._runner.last_exception

    @property
    def exception(self) -> BaseException | None:
        """The exception that ended the loop, if one did."""
        return self._runner.exception

    @property
    def next_run(self) -> float | None:
        """Monotonic instant (seconds) of the next planned run; ``None`` if none is planned."""
        tick = self._runner.next
        return None if tick is None else tick.deadline / 1_000_000_000

    @property
    def consecutive_failures(self) -> int:
        """Failed runs since the last successful one (0 after a success)."""
        return self._runner.consecutive_failures

    @property
    def paused(self) -> bool:
        """Whether the task is paused (see `pause`)."""
        return self._runner.paused

    @property
    def paused_ticks(self) -> int:
        """Ticks that came while the task was paused, and were not run."""
        return self._runner.paused_ticks

    @property
    def running(self) -> bool:
        """Whether the loop is still alive."""
        return not self._runner.ended()

    @property
    def done(self) -> bool:
        """Whether the loop has ended (for any reason, its event loop closing included)."""
        return self._runner.ended()

    @property
    def cancelled(self) -> bool:
        """Whether the loop ended by cancellation."""
        return self._runner.task.cancelled()

    @property
    def state(self) -> TaskState:
        """A snapshot of the counters, the last error and the next run."""
        return self._runner.state()

    def stop(self) -> None:
        """Let the current run (and its retries) finish, then end; no new run starts.

        Safe to call from any thread, from inside the job, and more than once; does
        nothing once the loop has ended (even if its event loop is closed).
        """
        self._runner.stop()

    def cancel(self) -> None:
        """End the loop now, cancelling an ``async def`` run in progress. Safe from any thread."""
        self._runner.cancel()

    def pause(self) -> None:
        """Run no tick until `resume`: each tick that comes meanwhile is counted in
        `paused_ticks` and not run (nor claimed, with a claim store: another worker may take
        it). A run in progress finishes; the loop keeps its schedule and stays alive.
        """
        self._runner.pause(True)

    def resume(self) -> None:
        """Undo `pause`: the next tick on the schedule runs (missed ones are not caught up)."""
        self._runner.pause(False)

    @property
    def schedule(self) -> Schedule:
        """When the loop runs: the task's schedule, or the one `reschedule` gave last."""
        return self._runner.schedule

    def reschedule(
        self,
        seconds: Seconds | None = None,
        *,
        cron: str | None = None,
        tz: str | dt.tzinfo | None = None,
    ) -> None:
        """Change when the loop runs, from the next tick on.

        ``seconds`` for a task of `repeat_every` (it keeps its kind: fixed rate, fixed delay,
        or aligned to the wall clock); ``cron`` and/or ``tz`` for a task of `repeat_at` (the
        one not given is kept). The tick the loop waits for is replaced: the next run comes
        one new period from now (the next aligned multiple, the next cron fire time; never
        one due at or before the start of the last run); a run in progress finishes first.
        Checked as the decorator checks them (a ``jitter`` must stay below the new period).
        Only this loop changes: a later start of the task uses the decorator's schedule. Safe
        from any thread.
        """
        self._runner.reschedule(_rescheduled(self, seconds, cron, tz))

    async def run_now(self) -> RunRecord:
        """Run the job once, now, outside the schedule; return its last attempt's record.

        The run is the task's own: its ``timeout`` and ``retry`` apply (retries are not cut
        short by the next tick), it is counted (``runs``, ``failures``, the state) and recorded
        like any run, and a failure is reported as any failure is (logged, ``on_exception``).
        It never overlaps another run: it waits for a run in progress (or another
        ``run_now``) to end first, and a tick that comes while it runs is skipped, as an
        overrun's would be. A paused task runs it too. There is no claim: with a claim store,
        another worker may run the same job at the same time. Raises ``RuntimeError`` if the
        loop has stopped. Cancelling the caller cancels an ``async def`` run.
        """
        return await self._runner.run_now()

    async def wait(self) -> None:
        """Wait for the loop to end; re-raise the exception that ended it, if any.

        Returns normally after `stop`, `cancel`, ``max_repetitions``, or a
        cancellation from outside (such as the event loop shutting down). Cancelling the
        waiter does not cancel the loop.
        """
        runner = self._runner
        rare = runner._rare()
        rare.waiters += 1
        try:
            await runner.join()
        finally:
            rare.waiters -= 1
        if runner.exception is not None:
            raise runner.exception

    async def aclose(self, timeout: Seconds | None = None) -> None:
        """`stop`, then wait for the end without raising (failures were reported).

        ``timeout`` (seconds or a ``timedelta``, on the task's clock) bounds the wait for a run
        in progress; ``None``, the default, waits for as long as the run takes. Past it the
        loop is cancelled: an ``async def`` run is cancelled with it, a ``def`` run is
        abandoned in its worker thread (nothing can interrupt a thread; it is a daemon thread,
        so it does not keep the process alive). The wait and the abandon are logged, naming
        the task.
        """
        ns = None if timeout is None else duration_ns(timeout, "timeout", allow_zero=True)
        await self._runner.close(ns, announce=True)

    def __await__(self) -> Generator[Any, None, TaskHandle]:
        return self._started().__await__()

    async def _started(self) -> TaskHandle:
        return self

    def __repr__(self) -> str:
        status = "running" if self.running else "ended"
        return f"<TaskHandle {self.name} {status} runs={self.runs} failures={self.failures}>"


def _rescheduled(handle: TaskHandle, seconds: object, cron: object, tz: object) -> Schedule:
    """The schedule ``handle.reschedule(...)`` asks for, checked (errors name the argument)."""
    from ._cron import Cron, zone_of
    from ._decorator import MIN_PERIOD_NS
    from ._schedule import AlignedRate, FixedDelay, FixedRate

    current = handle._runner.schedule
    schedule: Schedule
    if isinstance(current, Cron):
        if seconds is not None or (cron is None and tz is None):
            raise TypeError(
                f"{handle.name} runs on a cron expression: reschedule it with cron= and/or "
                "tz= (e.g. handle.reschedule(cron='*/5 * * * *'))"
            )
        expression = current.expression if cron is None else cron
        if not isinstance(expression, str):
            raise TypeError(f"cron must be a string such as '0 9 * * *', not {expression!r}")
        schedule = Cron(expression, current.tz if tz is None else zone_of(tz))
    else:
        if cron is not None or tz is not None or seconds is None:
            raise TypeError(
                f"{handle.name} runs every so many seconds: reschedule it with seconds= (e.g. "
                "handle.reschedule(seconds=30)); cron= and tz= are for tasks of repeat_at"
            )
        period = duration_ns(seconds, "seconds", at_least_ns=MIN_PERIOD_NS)
        if isinstance(current, AlignedRate):
            schedule = AlignedRate(period, current.offset)
        elif isinstance(current, FixedDelay):
            schedule = FixedDelay(period, period)
        else:
            schedule = FixedRate(period, period)
    jitter = handle._runner.opts.jitter_ns
    if jitter:
        limit, what = schedule.jitter_limit()
        if jitter >= limit:
            raise ValueError(
                f"the task's jitter ({jitter / 1e9:g} s) must stay shorter than {what} "
                f"({limit / 1e9:g} s): reschedule to a longer period"
            )
    return schedule


def _forget(handle: TaskHandle) -> None:
    name = handle.name
    same = _BY_NAME.get(name)
    if same is handle:
        del _BY_NAME[name]
    elif isinstance(same, list) and handle in same:
        same.remove(handle)
        if len(same) == 1:
            _BY_NAME[name] = same[0]


def _alive(name: str) -> list[TaskHandle]:
    """The handles of the loops of ``name`` alive in this process, oldest first."""
    same = _BY_NAME.get(name)
    if same is None:
        return []
    alive = []
    for handle in list(same) if isinstance(same, list) else [same]:
        if handle._runner.loop.is_closed():
            _forget(handle)
        elif not handle.done:
            alive.append(handle)
    return alive


def get_handle(name: str) -> TaskHandle | None:
    """The handle of the running task named ``name`` in this process, or ``None`` if none is.

    Without a claim store a name runs at most once per process. With one, several loops may
    share a name (the name is the claim key workers share): this is the most recently started.
    """
    alive = _alive(name)
    return alive[-1] if alive else None


def running_handles() -> frozenset[TaskHandle]:
    """Every loop alive in this process (all event loops)."""
    # A loop that has just ended leaves _BY_NAME only when its done callback runs, one event
    # loop step later; it is not alive in the meantime. One whose event loop was closed under
    # it never gets that callback: it leaves here (in _alive).
    return frozenset(handle for name in list(_BY_NAME) for handle in _alive(name))
