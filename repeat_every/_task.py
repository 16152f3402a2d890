"""The periodic task (what the decorator returns) and its handle (one running loop)."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import inspect
import logging
import random
import sys
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._policy import Retry, RunTimeoutError
from ._realtime import real_time
from ._records import Outcome, RunRecord, TaskState
from ._schedule import NS, Schedule, Tick, to_ns
from ._timebase import SystemTimebase, Timebase, default_timebase

if TYPE_CHECKING:
    from ._claims import ClaimStore, StoreErrorPolicy
    from ._schedule import Plan

R = TypeVar("R")

log = logging.getLogger("repeat_every")
"""The library's logger: failures are logged here when the task has no ``logger`` of its own."""

Hook = Callable[..., Any]

# Every running loop, so none is garbage-collected while it runs (asyncio keeps only weak
# references to tasks). A handle leaves the set when its loop ends.
_RUNNING: set[TaskHandle] = set()

# Skipped ticks are counted exactly but logged at most this often per task (see _skipped_ticks).
_SKIP_LOG_EVERY = 60 * NS


@dataclass(frozen=True)
class TaskOptions:
    """Everything the decorator validated, in the form the loop uses."""

    name: str
    schedule: Schedule
    is_async: bool
    logger: logging.Logger | logging.LoggerAdapter[Any] | None
    raise_exceptions: bool
    max_repetitions: int | None
    on_complete: Hook | None
    on_exception: Hook | None
    timebase: Timebase | None  # None: the process-wide default, read at start
    timeout: float | None
    retry: Retry | None
    jitter: float
    seed: int | None
    store: ClaimStore | None
    on_store_error: StoreErrorPolicy
    claim_ttl: float | None


class PeriodicTask(Generic[R]):
    """A function turned into a periodic job by [`repeat_every`][] or [`repeat_at`][].

    Calling it (with no arguments) starts its loop in the background on the running event
    loop and returns a [`TaskHandle`][]; ``await task()`` also works, as in fastapi-utils'
    documentation. It can be started again once its loop has ended, and in several event
    loops at once, but only once per event loop at a time: two loops of the same job in one
    event loop would overlap, which is what this library exists to prevent.
    """

    def __init__(self, func: Callable[[], R], options: TaskOptions) -> None:
        self._func = func
        self._options = options
        self._handle: TaskHandle | None = None
        # updated=(): copying the job's __dict__ would let a callable object's attributes
        # (say its own ``_options``) overwrite this task's.
        functools.update_wrapper(self, func, updated=())

    @property
    def name(self) -> str:
        """The task's name: in logs, in run records, and as its key in claim stores."""
        return self._options.name

    @property
    def schedule(self) -> Schedule:
        """When the task runs."""
        return self._options.schedule

    @property
    def handle(self) -> TaskHandle | None:
        """The handle of the most recently started loop (``None`` before the first start)."""
        return self._handle

    def __call__(self) -> TaskHandle:
        return self.start()

    def start(self) -> TaskHandle:
        """Start the loop on the running event loop and return its handle."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{self.name}: a periodic task starts on a running event loop; call it from "
                "async code (a FastAPI lifespan or startup handler, or inside asyncio.run())"
            ) from None
        current = self._handle
        if current is not None and current._loop is loop and not current.done:
            raise RuntimeError(
                f"{self.name} is already running in this event loop; stop it first "
                "(handle.stop()) or use its handle (task.handle)"
            )
        timebase = self._options.timebase or default_timebase()
        handle = TaskHandle(self, timebase, loop)
        self._handle = handle
        return handle

    def __repr__(self) -> str:
        return f"<PeriodicTask {self.name} {self.schedule.describe()}>"


class _Stopped(Exception):
    """Internal: the loop was asked to stop while it waited."""


class _LoopEnd(Exception):
    """Internal: the loop ends with ``error`` (raise_exceptions, or a hook raised)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class TaskHandle:
    """One running loop of a [`PeriodicTask`][].

    Users may rely on:

    - [`stop`][] lets the current run finish and starts no new one; [`cancel`][] also
      cancels an ``async def`` run in progress (a ``def`` run in its thread cannot be
      interrupted and finishes in the background).
    - ``await handle.wait()`` returns when the loop has ended and re-raises the exception that
      ended it (``raise_exceptions=True`` or a hook that raised). An ending exception that
      nobody is awaiting goes to the event loop's exception handler instead: it never
      disappears.
    - The counters and [`state`][] are safe to read at any moment from the event loop's
      thread; [`state`][] is a consistent snapshot.
    - The library holds a strong reference to the handle while its loop runs.
    - ``await handle`` returns the handle at once (so ``await task()`` works).
    """

    # Slots: 100,000 idle tasks are a scenario we measure (bench/, scale); a dict per
    # handle would cost about 1 kB more each.
    __slots__ = (
        "__weakref__",
        "_cancel_requested",
        "_elsewhere",
        "_exception",
        "_failures",
        "_interrupting",
        "_last_exception",
        "_last_started",
        "_loop",
        "_next",
        "_opts",
        "_periodic",
        "_random",
        "_records",
        "_retries",
        "_runs",
        "_skip_logged_at",
        "_skipped",
        "_skips_unlogged",
        "_sleeping",
        "_stop_requested",
        "_task",
        "_timebase",
        "_waiters",
    )

    def __init__(
        self, task: PeriodicTask[Any], timebase: Timebase, loop: asyncio.AbstractEventLoop
    ):
        self._periodic = task
        self._opts = task._options
        self._timebase = timebase
        self._loop = loop
        self._runs = 0
        self._failures = 0
        self._retries = 0
        self._skipped = 0
        self._elsewhere = 0
        self._last_exception: BaseException | None = None
        self._exception: BaseException | None = None  # what ended the loop
        self._next: Tick | None = None
        self._last_started: int | None = None  # monotonic ns of the last attempt's start
        self._stop_requested = False
        self._cancel_requested = False
        self._sleeping = False  # in an interruptible wait: stop() may cancel it
        self._interrupting = False  # stop() cancelled that wait
        self._waiters = 0
        self._random: random.Random | None = None  # made on first use: 3 kB per task
        self._records = timebase.wants_records
        self._skip_logged_at: int | None = None  # when skipped ticks were last logged
        self._skips_unlogged = 0
        self._task: asyncio.Task[None] = loop.create_task(
            self._main(), name=f"repeat_every:{self._opts.name}"
        )
        _RUNNING.add(self)
        self._task.add_done_callback(self._ended)
        timebase.task_started(self._task)

    # -- public surface ------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The task's name."""
        return self._opts.name

    @property
    def task(self) -> PeriodicTask[Any]:
        """The periodic task this loop runs."""
        return self._periodic

    @property
    def runs(self) -> int:
        """Runs done so far (failed runs included; a retried run counts once)."""
        return self._runs

    @property
    def failures(self) -> int:
        """Runs whose last attempt failed."""
        return self._failures

    @property
    def retries(self) -> int:
        """Extra attempts made by the retry policy."""
        return self._retries

    @property
    def skipped(self) -> int:
        """Ticks not run because a run overran them or the claim store failed."""
        return self._skipped

    @property
    def elsewhere(self) -> int:
        """Ticks another process claimed (with a claim store)."""
        return self._elsewhere

    @property
    def last_exception(self) -> BaseException | None:
        """The exception of the most recent failed run, if any."""
        return self._last_exception

    @property
    def exception(self) -> BaseException | None:
        """The exception that ended the loop, if one did."""
        return self._exception

    @property
    def next_run(self) -> float | None:
        """Monotonic instant (seconds) of the next planned run; ``None`` if none is planned."""
        return None if self._next is None else self._next.deadline / NS

    @property
    def running(self) -> bool:
        """Whether the loop is still alive."""
        return not self._task.done()

    @property
    def done(self) -> bool:
        """Whether the loop has ended (for any reason)."""
        return self._task.done()

    @property
    def cancelled(self) -> bool:
        """Whether the loop ended by cancellation."""
        return self._task.cancelled()

    @property
    def state(self) -> TaskState:
        """A snapshot of the counters, the last error and the next run."""
        next_at: dt.datetime | None = None
        if self._next is not None:
            wall = self._timebase.wall() + (self._next.deadline / NS - self._timebase.monotonic())
            next_at = dt.datetime.fromtimestamp(wall, dt.timezone.utc)
        last = self._last_started
        return TaskState(
            name=self.name,
            running=self.running,
            runs=self._runs,
            failures=self._failures,
            retries=self._retries,
            skipped=self._skipped,
            elsewhere=self._elsewhere,
            last_exception=self._last_exception,
            next_run=self.next_run,
            next_run_at=next_at,
            last_started_at=None
            if last is None
            else dt.datetime.fromtimestamp(
                self._timebase.wall() - (self._now() - last) / NS, dt.timezone.utc
            ),
        )

    def stop(self) -> None:
        """Let the current run (and its retries) finish, then end; no new run starts.

        Safe to call from any thread, from inside the job, and more than once; does
        nothing once the loop has ended (even if its event loop is closed).
        """
        if self._task.done():
            return
        if self._in_other_thread():
            self._loop.call_soon_threadsafe(self.stop)
            return
        if self._task.done() or self._stop_requested:
            return
        self._stop_requested = True
        if self._sleeping:
            self._interrupting = True
            self._task.cancel()

    def cancel(self) -> None:
        """End the loop now, cancelling an ``async def`` run in progress. Safe from any thread."""
        if self._task.done():
            return
        if self._in_other_thread():
            self._loop.call_soon_threadsafe(self.cancel)
            return
        self._cancel_requested = True
        self._task.cancel()

    async def wait(self) -> None:
        """Wait for the loop to end; re-raise the exception that ended it, if any.

        Returns normally after [`stop`][], [`cancel`][], ``max_repetitions``, or a
        cancellation from outside (such as the event loop shutting down). Cancelling the
        waiter does not cancel the loop.
        """
        self._waiters += 1
        try:
            await self._timebase.join(self._task)
        finally:
            self._waiters -= 1
        if self._exception is not None:
            raise self._exception

    async def aclose(self) -> None:
        """[`stop`][], then wait for the end without raising (failures were reported)."""
        self.stop()
        await self._timebase.join(self._task)

    def __await__(self) -> Generator[Any, None, TaskHandle]:
        return self._started().__await__()

    async def _started(self) -> TaskHandle:
        return self

    def __repr__(self) -> str:
        status = "running" if self.running else "ended"
        return f"<TaskHandle {self.name} {status} runs={self._runs} failures={self._failures}>"

    # -- the loop --------------------------------------------------------------------------

    def _in_other_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is not self._loop
        except RuntimeError:
            return True

    def _rng(self) -> random.Random:
        """The task's random source (jitter, retry jitter), seeded by ``seed``."""
        if self._random is None:
            self._random = random.Random(self._opts.seed)
        return self._random

    def _stopping(self) -> bool:
        # A method, not the attribute: stop() may set it while the loop awaits.
        return self._stop_requested

    def _now(self) -> int:
        return self._timebase.monotonic_ns()

    def _logger(self) -> logging.Logger | logging.LoggerAdapter[Any]:
        return self._opts.logger or log

    async def _main(self) -> None:
        """The loop: sleep until the tick is due, claim it (with a store), run it, plan the
        next, until stopped, ended by a failure policy or done with ``max_repetitions``.

        Every task runs this once per tick, so helpers are inlined where a run would pay for
        the call (measured in bench/, scenarios 2 and 4); the comments name what is inlined.
        """
        opts = self._opts
        timebase = self._timebase
        plan = opts.schedule.plan(timebase)
        now, sleep = timebase.hot_path()
        func = self._periodic._func
        # The common case (an async job, no timeout, no retry) calls the job right here; _run
        # handles the rest. Both record the attempt and report a failure through _failed.
        direct = opts.is_async and opts.timeout is None and opts.retry is None
        records = self._records
        try:
            t = now()
            tick = plan.first(t)
            while True:
                self._next = tick
                # Sleep until the tick is due, re-checking: early wake-ups and clock jumps.
                # (_sleep_interruptibly inlined: this is the hot path of every task.)
                while (remaining := plan.remaining(tick, t)) > 0:
                    if self._stop_requested:
                        raise _Stopped
                    self._sleeping = True
                    try:
                        await sleep(remaining / NS)
                    except asyncio.CancelledError:
                        if not self._interrupted_by_stop():
                            raise
                        raise _Stopped from None
                    finally:
                        self._sleeping = False
                    t = now()
                if opts.store is not None:
                    ttl = self._claim_ttl(plan, tick)
                    if current := self._past_stale(plan, tick, t, ttl):
                        tick = current
                        continue
                if opts.jitter:
                    await self._sleep_interruptibly(self._rng().random() * opts.jitter)
                    t = now()
                if opts.store is not None:
                    won = await self._claim(tick, ttl)
                    t = now()
                    if not won:
                        tick, _ = plan.after(tick, t)
                        continue
                if self._stop_requested:
                    break
                self._next = None
                if direct:
                    self._last_started = t
                    started_wall = timebase.wall() if records else 0.0
                    error: BaseException | None = None
                    try:
                        await func()
                    except Exception as exc:
                        error = exc
                    except asyncio.CancelledError as exc:
                        if not self._raised_by_job():
                            if records:
                                self._record(tick, 1, t, started_wall, "cancelled", exc)
                            raise
                        error = exc
                    if records:
                        outcome: Outcome = "ok" if error is None else "failed"
                        self._record(tick, 1, t, started_wall, outcome, error)
                    if error is not None:
                        await self._failed(error)
                else:
                    await self._run(plan, tick)
                self._runs += 1
                if opts.max_repetitions is not None and self._runs >= opts.max_repetitions:
                    break
                if self._stopping():
                    break
                t = now()
                tick, skipped = plan.after(tick, t)
                if skipped:
                    self._skipped_ticks(skipped, t)
        except _Stopped:
            pass
        except _LoopEnd as end:
            self._next = None
            self._end_with(end.error)
            return
        finally:
            self._next = None
        if opts.on_complete is not None:
            try:
                await _call(opts.on_complete)
            except Exception as exc:
                self._logger().exception("%s: on_complete raised", opts.name)
                self._end_with(exc)

    def _skipped_ticks(self, skipped: int, now: int) -> None:
        """Count ticks an overrun covered; log them, at most one line a minute per task.

        When an overloaded event loop makes every task late, a log line per late run would
        add to the load that made them late; the count on the handle stays exact.
        """
        self._skipped += skipped
        self._skips_unlogged += skipped
        if self._skip_logged_at is not None and now - self._skip_logged_at < _SKIP_LOG_EVERY:
            return
        self._logger().warning(
            "%s: the run took longer than its period; skipped %d tick(s)%s",
            self._opts.name,
            skipped,
            ""
            if self._skips_unlogged == skipped
            else f" ({self._skips_unlogged} since the last report a minute ago or more)",
        )
        self._skip_logged_at = now
        self._skips_unlogged = 0

    async def _sleep_interruptibly(self, seconds: float) -> None:
        if self._stop_requested:
            raise _Stopped
        self._sleeping = True
        try:
            await self._timebase.sleep(seconds)
        except asyncio.CancelledError:
            if not self._interrupted_by_stop():
                raise  # a real cancellation (cancel(), or the event loop shutting down)
            raise _Stopped from None
        finally:
            self._sleeping = False

    def _interrupted_by_stop(self) -> bool:
        """In ``except CancelledError`` around a wait: whether stop() caused it (then undone)."""
        if not self._interrupting or self._cancel_requested:
            return False
        self._interrupting = False
        if sys.version_info >= (3, 11):
            self._task.uncancel()
        return True

    def _claim_ttl(self, plan: Plan, tick: Tick) -> float:
        return self._opts.claim_ttl or max(60.0, 2 * (plan.following(tick) - tick.deadline) / NS)

    def _past_stale(self, plan: Plan, tick: Tick, now: int, ttl: float) -> Tick | None:
        """The tick to claim instead of ``tick`` if the loop woke too late for it, else None.

        The other processes claimed the tick when it was due, and their claim lives ``ttl``
        seconds. A process that wakes half a ttl late (it was frozen: a stopped container, a
        suspended VM, a blocked event loop) could win an expired claim and run the tick a
        second time; it skips the tick instead, and the ticks it slept through, and carries
        on from the current one.
        """
        late = now - tick.deadline
        if late * 2 < ttl * NS:
            return None
        current, covered = plan.after(tick, now)
        self._skipped += 1 + covered
        self._logger().warning(
            "%s: woke %.3g s after tick %s was due (was the process frozen, or the event loop "
            "blocked?); skipping it and the %d tick(s) since: their claims may have expired, "
            "and running them could repeat runs another process made",
            self._opts.name,
            late / NS,
            tick.key,
            covered,
        )
        return current

    async def _claim(self, tick: Tick, ttl: float) -> bool:
        opts = self._opts
        assert opts.store is not None
        assert tick.key is not None
        try:
            with real_time():  # a store's request and timeout are real even under a FakeClock
                won = await opts.store.claim(opts.name, tick.key, ttl)
        except Exception:
            if opts.on_store_error == "run":
                self._logger().warning(
                    "%s: claim store failed; running tick %d anyway (on_store_error='run')",
                    opts.name,
                    tick.key,
                    exc_info=True,
                )
                return True
            self._skipped += 1
            self._logger().error(
                "%s: claim store failed; skipping tick %d (on_store_error='skip')",
                opts.name,
                tick.key,
                exc_info=True,
            )
            return False
        if not won:
            self._elsewhere += 1
        return bool(won)

    async def _run(self, plan: Plan, tick: Tick) -> None:
        """One run: its attempts, retries, logging, hooks. Raises _LoopEnd to end the loop."""
        opts = self._opts
        timebase = self._timebase
        attempt = 1
        while True:
            started = self._last_started = self._now()
            started_wall = timebase.wall()
            try:
                outcome, error = await self._attempt()
            except asyncio.CancelledError as exc:
                if self._records:
                    self._record(tick, attempt, started, started_wall, "cancelled", exc)
                raise
            if self._records:
                self._record(tick, attempt, started, started_wall, outcome, error)
            if error is None:
                return
            retry = opts.retry
            if retry is not None and attempt < retry.attempts and isinstance(error, retry.on):
                delay = retry.delay(attempt, self._rng())
                limit = plan.following(tick)
                if self._now() + to_ns(delay) < limit and not self._stop_requested:
                    self._retries += 1
                    self._logger().warning(
                        "%s: attempt %d failed (%r); retrying in %g s",
                        opts.name,
                        attempt,
                        error,
                        delay,
                        exc_info=error,
                    )
                    attempt += 1
                    try:
                        await self._sleep_interruptibly(delay)
                    except _Stopped:
                        # Stopped during the backoff: the run failed; the loop ends after it.
                        self._stop_requested = True
                    else:
                        continue
                else:
                    self._logger().warning(
                        "%s: no retry of attempt %d: the next tick comes first", opts.name, attempt
                    )
            await self._failed(error)
            return

    def _record(
        self,
        tick: Tick,
        attempt: int,
        started: int,
        started_wall: float,
        outcome: Outcome,
        error: BaseException | None,
    ) -> None:
        """Give the timebase the record of an attempt that just ended (when it wants records)."""
        self._timebase.run_finished(
            RunRecord(
                self._opts.name,
                self._runs,
                attempt,
                tick.deadline / NS,
                started / NS,
                self._timebase.monotonic(),
                outcome,
                error,
                started_wall,
            )
        )

    async def _failed(self, error: BaseException) -> None:
        opts = self._opts
        self._failures += 1
        self._last_exception = error
        self._logger().error("%s: run %d failed: %r", opts.name, self._runs, error, exc_info=error)
        if opts.on_exception is not None:
            try:
                await _call(opts.on_exception, error)
            except Exception as hook_error:
                self._logger().exception("%s: on_exception raised; the loop ends", opts.name)
                raise _LoopEnd(hook_error) from hook_error
        if opts.raise_exceptions:
            raise _LoopEnd(error)

    async def _attempt(self) -> tuple[Outcome, BaseException | None]:
        func = self._periodic._func
        timeout = self._opts.timeout
        try:
            if self._opts.is_async:
                if timeout is None:
                    await func()
                else:
                    await self._with_timeout(asyncio.ensure_future(func()), timeout, False)
            else:
                future = _in_thread(self._loop, func)
                if timeout is None:
                    result = await future
                else:
                    result = await self._with_timeout(future, timeout, True)
                if inspect.isawaitable(result):
                    await result
        except RunTimeoutError as exc:
            return "timeout", exc
        except Exception as exc:
            return "failed", exc
        except asyncio.CancelledError as exc:
            if self._raised_by_job():
                return "failed", exc
            raise
        return "ok", None

    def _raised_by_job(self) -> bool:
        """In ``except CancelledError`` around a run: whether the job raised it itself.

        Nobody cancelled the loop: the job raised it (say, it awaited a future someone else
        cancelled). That is a failure of the run, not the end of the loop. Python 3.10 cannot
        tell the two apart (no ``Task.cancelling()``), so there it still ends the loop.
        """
        return sys.version_info >= (3, 11) and not self._task.cancelling()

    async def _with_timeout(self, job: asyncio.Future[Any], timeout: float, in_thread: bool) -> Any:
        timebase = self._timebase
        timebase.track(job)
        timer = self._loop.create_task(_sleep(timebase, timeout))
        timebase.track(timer)
        try:
            with timebase.waiting():
                await asyncio.wait((job, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel()
            timer.cancel()
            raise
        if job.done():
            timer.cancel()
            await asyncio.wait((timer,))
            return job.result()
        error = RunTimeoutError(f"{self._opts.name}: run exceeded its timeout of {timeout:g} s")
        if in_thread:
            self._logger().error(
                "%s: run exceeded its timeout of %g s; a def job cannot be interrupted, so the "
                "next run waits until its thread returns",
                self._opts.name,
                timeout,
            )
            with timebase.waiting():
                await asyncio.wait((job,))
            if not job.cancelled() and job.exception() is not None:
                self._logger().error(
                    "%s: the timed-out run later raised", self._opts.name, exc_info=job.exception()
                )
        else:
            job.cancel()
            with timebase.waiting():
                await asyncio.wait((job,))
        raise error

    def _end_with(self, error: BaseException) -> None:
        """The loop ends with ``error``: keep it for wait(), or hand it to the event loop."""
        self._exception = error
        if self._waiters == 0:
            # No "task" key: this runs inside the task, and on Python ≥ 3.12 the event loop
            # would run a custom handler in that task's context, which is already entered
            # ("cannot enter context"): the handler would never see the exception.
            self._loop.call_exception_handler(
                {
                    "message": f"periodic task {self._opts.name!r} ended with an exception "
                    "(await its handle's wait() to receive it instead)",
                    "exception": error,
                }
            )

    def _ended(self, task: asyncio.Task[None]) -> None:
        _RUNNING.discard(self)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # The loop itself crashed (a bug, or a broken injected clock or sleep). Reading
            # task.exception() keeps asyncio from warning "exception was never retrieved";
            # report the crash like any exception that ends the loop.
            self._logger().error("%s: the loop crashed", self._opts.name, exc_info=error)
            self._end_with(error)


async def _sleep(timebase: Timebase, seconds: float) -> None:
    await timebase.sleep(seconds)


async def _call(hook: Hook, *args: Any) -> None:
    """Call a hook: an async one on the loop, a sync one in a worker thread (as fastapi-utils
    does: a hook that blocks, such as one sending an alert, must not block the event loop)."""
    if inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(type(hook).__call__):
        result = hook(*args)
    else:
        result = await _in_thread(asyncio.get_running_loop(), hook, *args)
    if inspect.isawaitable(result):
        await result


def _in_thread(
    loop: asyncio.AbstractEventLoop, func: Callable[..., Any], *args: Any
) -> asyncio.Future[Any]:
    """Run ``func(*args)`` in the default executor, in a copy of the current context."""
    return loop.run_in_executor(
        None, contextvars.copy_context().run, _no_stop_iteration, func, *args
    )


def _no_stop_iteration(func: Callable[..., Any], *args: Any) -> Any:
    # asyncio cannot put StopIteration into a Future: the future would never resolve and the
    # loop would hang. Convert it as PEP 479 does for coroutines.
    try:
        return func(*args)
    except StopIteration as exc:
        raise RuntimeError(f"{func!r} raised StopIteration") from exc


def running_handles() -> frozenset[TaskHandle]:
    """Every loop alive in this process (all event loops)."""
    # A loop that has just ended leaves _RUNNING only when its done callback runs, one
    # event-loop step later; it is not alive in the meantime.
    return frozenset(h for h in list(_RUNNING) if not h.done)


def system_timebase(
    clock: Callable[[], float] | None, sleep: Callable[[float], Awaitable[Any]] | None
) -> Timebase | None:
    """The timebase for injected ``clock``/``sleep`` (``None``: use the default at start)."""
    if clock is None and sleep is None:
        return None
    return SystemTimebase(clock, sleep)
