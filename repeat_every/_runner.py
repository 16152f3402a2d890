"""The runner: one running loop of a periodic task, and the pipeline every tick goes through.

A tick goes through the same stages, in this order, whatever the task's options::

    wait (until due) → claim (with a store: stale check, jitter, claim) or jitter
      → attempts (the call, with timeout and retry) → record → report

The policies (how the job is called, whether there is a store, a jitter, a retry, an observer
that wants records) are chosen once, when the loop starts; a stage whose policy is off costs a
test of a local variable. The fast path (an ``async def`` job, no option) is this pipeline with
every policy off, not a copy of it. The public face of a runner is `TaskHandle`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import datetime as dt
import functools
import inspect
import logging
import random
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from ._claim_group import Preclaim, claim_group
from ._durations import NS, to_ns
from ._events import (
    AttemptEnded,
    AttemptStarted,
    ClaimedElsewhere,
    RunEnded,
    SkipReason,
    TicksSkipped,
    emit,
)
from ._events import listeners as _listeners
from ._policy import RunTimeoutError
from ._realtime import real_time
from ._records import Outcome, RunRecord, TaskState
from ._schedule import Tick, wall_ns
from ._threads import executor
from ._timebase import Clock, SleepFunc, TaskObserver, observer_of

if TYPE_CHECKING:
    from ._claim_group import ClaimGroup
    from ._options import TaskOptions
    from ._schedule import KeyedPlan, KeyedSchedule, Plan, Schedule
    from ._task import PeriodicTask

log = logging.getLogger("repeat_every")
"""The library's logger: failures are logged here when the task has no ``logger`` of its own."""

# Skipped ticks are counted exactly but logged at most this often per task (see _skipped_ticks).
_SKIP_LOG_EVERY = 60 * NS


class _Stopped(Exception):
    """Internal: the loop was asked to stop while it waited."""


class _LoopEnd(Exception):
    """Internal: the loop ends with ``error`` (raise_exceptions, or a hook raised)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class _Rare:
    """What few loops ever need, made on first use: 100,000 idle tasks carry one empty slot
    instead of five (bench/, scale)."""

    __slots__ = ("resumed_wall", "skip_logged_at", "skips_unlogged", "tick_waiter", "waiters")

    def __init__(self) -> None:
        self.tick_waiter: asyncio.Future[None] | None = None  # run_now() waiting for in_tick
        self.waiters = 0  # callers of TaskHandle.wait(): they get the loop's exception
        self.skip_logged_at: int | None = None  # when skipped ticks were last logged
        self.skips_unlogged = 0
        self.resumed_wall: float | None = None  # wall clock of the last resume() of a pause


class Runner:
    """Owns one loop: its asyncio task, its counters, and the pipeline of each tick.

    State, by invariant: ``next`` is the tick the loop waits for (``None`` while a run is in
    progress or once the loop ended); ``sleeping`` is true exactly while the loop is inside an
    interruptible wait, which `stop` may then cancel (setting ``interrupting``, so the
    wait can tell that cancellation from a real one); the counters only grow.
    """

    # Slots: 100,000 idle tasks are a scenario we measure (bench/, scale).
    __slots__ = (
        "_random",
        "_sleep",
        "cancel_requested",
        "clock",
        "consecutive_failures",
        "context",
        "elsewhere",
        "exception",
        "failures",
        "held",
        "in_tick",
        "interrupting",
        "last_duration",
        "last_exception",
        "last_ok",
        "last_started",
        "loop",
        "manual",
        "next",
        "observer",
        "opts",
        "paused",
        "paused_ticks",
        "periodic",
        "preclaim",
        "rare",
        "replan",
        "retries",
        "runs",
        "schedule",
        "skipped",
        "sleeping",
        "stop_requested",
        "task",
    )

    def __init__(
        self,
        periodic: PeriodicTask[Any],
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        on_done: Callable[[asyncio.Task[None]], object],
    ) -> None:
        self.periodic = periodic
        self.opts: TaskOptions = periodic._options
        self.clock = clock
        self.observer: TaskObserver | None = observer_of(clock)
        self.loop = loop
        self.runs = 0
        self.failures = 0
        self.retries = 0
        self.skipped = 0
        self.elsewhere = 0
        self.last_exception: BaseException | None = None
        self.exception: BaseException | None = None  # what ended the loop
        self.next: Tick | None = None
        self.last_started: int | None = None  # monotonic ns of the last attempt's start
        self.last_ok: int | None = None  # monotonic ns when the last successful run ended
        self.last_duration: int | None = None  # ns from the last run's start to its end
        self.consecutive_failures = 0  # failed runs since the last successful one
        self.paused = False
        self.paused_ticks = 0
        # Controls (see the methods that set them): ``held`` is true while the loop must not
        # start a tick's run (paused, or a run_now() run in progress: ``manual``); ``in_tick``
        # from the moment the loop takes a due tick until it waits for the next one.
        self.held = False
        self.in_tick = False
        self.manual: asyncio.Task[RunRecord] | None = None
        self.context: contextvars.Context | None = None  # the loop's, once it has started
        self.schedule: Schedule = self.opts.schedule  # the latest given (reschedule())
        self.replan: Schedule | None = None  # given, not yet in effect
        self.stop_requested = False
        self.cancel_requested = False
        self.sleeping = False
        self.interrupting = False
        self.rare: _Rare | None = None  # made on first use (see _Rare)
        # A peer due at the same instant claimed this loop's tick (see _claim_group):
        # (the tick, the peer's Preclaim, this loop's index in it)
        self.preclaim: tuple[Tick, Preclaim, int] | None = None
        self._random: random.Random | None = None  # made on first use: 3 kB per task
        self._sleep: SleepFunc = clock.sleep
        # The asyncio task is named by the task's own name string (no string per task).
        self.task: asyncio.Task[None] = loop.create_task(self._main(), name=periodic.name)
        self.task.add_done_callback(on_done)
        if self.observer is not None:
            self.observer.task_started(self.task)

    # -- what the handle asks ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.periodic.name

    def ended(self) -> bool:
        """Whether the loop is over: its task is done, or its event loop was closed under it."""
        return self.task.done() or self.loop.is_closed()

    def state(self) -> TaskState:
        clock = self.clock
        now, now_wall = clock.monotonic_ns(), clock.wall()

        def wall_at(ns: int | None) -> dt.datetime | None:
            """The wall-clock instant of ``ns`` on the loop's clock."""
            if ns is None:
                return None
            return dt.datetime.fromtimestamp(now_wall + (ns - now) / NS, dt.timezone.utc)

        following = None if self.next is None else self.next.deadline
        duration = self.last_duration
        return TaskState(
            name=self.name,
            running=not self.ended(),
            runs=self.runs,
            failures=self.failures,
            retries=self.retries,
            skipped=self.skipped,
            elsewhere=self.elsewhere,
            last_exception=self.last_exception,
            next_run=None if following is None else following / NS,
            next_run_at=wall_at(following),
            last_started_at=wall_at(self.last_started),
            last_success_at=wall_at(self.last_ok),
            last_duration=None if duration is None else duration / NS,
            consecutive_failures=self.consecutive_failures,
            paused=self.paused,
            paused_ticks=self.paused_ticks,
        )

    def stop(self) -> None:
        if self.ended():
            return
        if self._elsewhere_thread():
            self._call_soon_threadsafe(self.stop)
            return
        if self.stop_requested:
            return
        self.stop_requested = True
        if self.sleeping:
            self.interrupting = True
            self.task.cancel()

    def cancel(self) -> None:
        if self.ended():
            return
        if self._elsewhere_thread():
            self._call_soon_threadsafe(self.cancel)
            return
        self.cancel_requested = True
        self.task.cancel()

    async def join(self) -> None:
        """Wait for the loop's task to end (through the observer, which may step time)."""
        if self.observer is None:
            await asyncio.wait((self.task,))
        else:
            await self.observer.join(self.task)

    def crashed(self, task: asyncio.Task[None]) -> None:
        """The task's done callback: report an exception the loop itself died of."""
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # A bug, or a broken injected clock or sleep. Reading task.exception() keeps
            # asyncio from warning "exception was never retrieved"; report the crash like any
            # exception that ends the loop.
            self._logger().error(
                "%s: the loop crashed", self.name, exc_info=error, extra=self._extra()
            )
            self._end_with(error)

    def reschedule(self, schedule: Schedule) -> None:
        """Use ``schedule`` from the next tick on (the tick waited for now is replaced)."""
        if self._elsewhere_thread():
            self._call_soon_threadsafe(lambda: self.reschedule(schedule))
            return
        self.schedule = schedule
        if self.ended():
            return
        self.replan = schedule
        self.held = True
        if self.sleeping and not self.in_tick and not self.stop_requested:
            # Asleep until the old plan's tick: wake up now (not in a jitter or a backoff,
            # which belong to a tick already taken; that tick's run goes on).
            self.interrupting = True
            self.task.cancel()

    def pause(self, paused: bool) -> None:
        if self.paused and not paused:
            self._rare().resumed_wall = self.clock.wall()
        self.paused = paused
        self.held = paused or self.manual is not None or self.replan is not None

    async def run_now(self) -> RunRecord:
        """One run now, in the loop's context, never overlapping one of the loop's runs."""
        if self._elsewhere_thread():
            raise RuntimeError(
                f"{self.name}: run_now() must be awaited in the event loop the task runs in"
            )
        while True:
            if self.ended() or self.stop_requested or self.context is None:
                raise RuntimeError(
                    f"{self.name}: run_now() needs a running task, and this one has "
                    + ("not started its loop yet" if self.context is None else "stopped")
                    + " (to run the job's body alone, await task.call())"
                )
            if self.manual is not None:
                await asyncio.wait((self.manual,))
            elif self.in_tick:
                rare = self._rare()
                if rare.tick_waiter is None:
                    rare.tick_waiter = self.loop.create_future()
                await asyncio.shield(rare.tick_waiter)
            else:
                break
        manual = self.context.run(self._start_manual)
        self.manual = manual
        self.held = True
        try:
            return await manual
        finally:
            if self.manual is manual:
                self.manual = None
                self.held = self.paused or self.replan is not None

    def _start_manual(self) -> asyncio.Task[RunRecord]:
        task = self.loop.create_task(self._manual_run(), name=f"repeat_every:{self.name}:now")
        if self.observer is not None:
            self.observer.track(task)  # in the loop's context: in its FakeClock scope
        return task

    async def _manual_run(self) -> RunRecord:
        """The attempts of a run_now() run: the loop's call, timeout and retry; no claim."""
        from ._schedule import Tick

        clock = self.clock
        call = self._choose_call()
        func = self.periodic._func
        retry = self.opts.retry
        started = clock.monotonic_ns()
        tick = Tick(started, -1)
        attempt = 1
        while True:
            t = clock.monotonic_ns()
            self.last_started = t
            if _listeners:
                self._emit_started(tick, attempt, t, manual=True)
            error: BaseException | None = None
            try:
                if call is None:
                    await func()
                else:
                    await call()
            except Exception as exc:
                error = exc
            except asyncio.CancelledError as exc:
                self._manual_record(tick, attempt, t, exc)
                if _listeners:
                    self._emit_ended(
                        tick, attempt, t, clock.monotonic_ns(), exc, cancelled=True, manual=True
                    )
                raise
            record = self._manual_record(tick, attempt, t, error)
            if _listeners:
                self._emit_ended(
                    tick, attempt, t, clock.monotonic_ns(), error, cancelled=False, manual=True
                )
            if error is None or retry is None or self.stop_requested:
                break
            if attempt >= retry.attempts or not isinstance(error, retry.on):
                break
            delay = retry.delay(attempt, self._rng())
            self._retrying(tick, attempt, error, delay)
            await clock.sleep(delay)
            attempt += 1
        ended = clock.monotonic_ns()
        self._run_ended(started, ended, error)
        if _listeners:
            self._emit_run_ended(tick, attempt, started, ended, error, manual=True)
        if error is not None:
            try:
                await self._report(error, tick, attempt)
            except _LoopEnd as end:  # raise_exceptions, or on_exception raised: the loop ends
                self.stop()
                self._end_with(end.error)
        self.runs += 1
        if self.opts.max_repetitions is not None and self.runs >= self.opts.max_repetitions:
            self.stop()
        return record

    def _manual_record(
        self, tick: Tick, attempt: int, started: int, error: BaseException | None
    ) -> RunRecord:
        """The record of a run_now() attempt (cancelled: any cancellation, which it re-raises)."""
        ended = self.clock.monotonic_ns()
        started_wall = self.clock.wall() - (ended - started) / NS
        cancelled = isinstance(error, asyncio.CancelledError)
        record = self._attempt_record(tick, attempt, started, ended, started_wall, error, cancelled)
        if self.observer is not None and self.observer.wants_records:
            self.observer.run_finished(record)
        return record

    def in_run(self) -> bool:
        """Whether a run is in progress: the loop's (alive and not waiting for a tick) or a
        run_now() run."""
        return (self.next is None and not self.ended()) or self.manual is not None

    async def close(self, timeout: int | None, announce: bool) -> None:
        """Stop, then wait for the end: for ever (``timeout`` None) or ``timeout`` ns.

        Past the timeout the loop is cancelled: an ``async def`` run is cancelled with it; a
        ``def`` run, which nothing can interrupt, is abandoned in its (daemon) worker thread.
        Each task given up on is logged, by name. ``announce`` logs the wait itself first
        (`run_tasks` logs one line for all its tasks instead).
        """
        in_run = self.in_run()
        self.stop()
        if timeout is None:
            await self.join()
            if self.manual is not None:
                await asyncio.wait((self.manual,))
            return
        if in_run and announce:
            self._logger().info(
                "%s: waiting up to %g s for its run in progress to finish",
                self.name,
                timeout / NS,
                extra=self._extra(),
            )
        if not await self._join_within(timeout):
            manual = self.manual
            self._give_up(timeout)
            await self.join()
            if manual is not None:
                await asyncio.wait((manual,))

    async def _join_within(self, timeout: int) -> bool:
        """Wait up to ``timeout`` ns (on the task's clock) for the loop and a run_now() run to
        end; whether they did."""
        pending: set[asyncio.Future[Any]] = {
            f for f in (self.task, self.manual) if f is not None and not f.done()
        }
        if not pending:
            return True
        observer = self.observer
        joiner: asyncio.Future[Any] | None = None
        if observer is not None and self.task in pending:
            # Through the observer, as join() does: a FakeClock that nobody advances while the
            # run waits on it raises RunStalledError (which says so) instead of hanging.
            joiner = self.loop.create_task(observer.join(self.task))
            pending.discard(self.task)
            pending.add(joiner)
        timer = self.loop.create_task(_sleep(self.clock, timeout / NS))
        if observer is not None:
            observer.track(timer)
        try:
            while pending and not timer.done():
                done, _ = await asyncio.wait(pending | {timer}, return_when=asyncio.FIRST_COMPLETED)
                pending -= done
                if joiner is not None and joiner in done:
                    joiner.result()  # RunStalledError
        finally:
            for waiter in (timer, joiner):
                if waiter is not None and not waiter.done():
                    waiter.cancel()
                    await asyncio.wait((waiter,))
        return not pending

    def _give_up(self, timeout: int) -> None:
        in_thread = not self.periodic._is_async and not self.periodic._thread_run.done()
        if self.manual is not None:
            self.manual.cancel()
        self._logger().warning(
            "%s: still running %g s after it was asked to stop; %s",
            self.name,
            timeout / NS,
            "abandoning its run in its worker thread (a def job cannot be interrupted; the "
            "daemon thread finishes in the background or ends with the process)"
            if in_thread
            else "cancelling it",
            extra=self._extra(),
        )
        self.cancel()

    def _elsewhere_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is not self.loop
        except RuntimeError:
            return True

    def _call_soon_threadsafe(self, method: Callable[[], None]) -> None:
        try:
            self.loop.call_soon_threadsafe(method)
        except RuntimeError:  # the event loop closed meanwhile: nothing is left to stop
            if not self.loop.is_closed():
                raise

    # -- the pipeline --------------------------------------------------------------------------

    async def _main(self) -> None:
        """Every tick, until stopped, ended by a failure policy or done with max_repetitions."""
        opts = self.opts
        plan = opts.schedule.plan(self.clock)
        now, sleep = self.clock.hot_path()  # once, inside the task, before the first sleep
        self._sleep = sleep
        # run_now() runs in the loop's context (a FakeClock's scope): the task's own context
        # where asyncio gives it (no copy per task), a copy of it before Python 3.12.
        if sys.version_info >= (3, 12):
            self.context = self.task.get_context()
        else:
            self.context = contextvars.copy_context()
        # (Few locals: this coroutine's frame lives as long as the task, ~8 B each per task.)
        records = self.observer is not None and self.observer.wants_records
        store, jitter, retry = opts.store, opts.jitter_ns, opts.retry
        # Tasks of one store due at the same instant claim together (no jitter: with one,
        # peers claim at moments of their own, on purpose).
        group = claim_group(store, self.loop) if opts.store_claims_many and not jitter else None
        records_runs = opts.store_records_runs
        func = self.periodic._func
        call = self._choose_call()  # None: an async job without timeout, awaited right here
        try:
            t = now()
            tick = plan.first(t)
            # A catch-up tick (catch_up=True) is claimed here, before the loop: it is run at
            # once, without the stale check, jitter and claim of a regular tick.
            claimed = False
            if opts.misfire_grace_ns is not None:
                current = await self._catch_up(plan, tick, t)
                if current is not None:
                    tick, claimed = current, True
                    t = now()
            while True:
                self.next = tick
                if self.in_tick:
                    self.in_tick = False
                    if self.rare is not None:  # a run_now() may wait for the tick's end
                        self._tick_over()
                    if self.replan is not None:  # rescheduled during the run
                        t = now()
                        plan, tick = self._replanned(t)
                        self.next = tick
                # Wait until the tick is due, re-checking: early wake-ups and clock jumps.
                while (remaining := plan.remaining(tick, t)) > 0:
                    # (What _asleep() does, inlined: this wait is once per run of every task.)
                    if self.stop_requested:
                        raise _Stopped
                    self.sleeping = True
                    if group is not None:  # a peer that wakes first may claim this tick too
                        group.expect(
                            self, tick, self._instant(plan, tick), self._claim_ttl(plan, tick)
                        )
                    try:
                        await sleep(remaining / NS)
                    except asyncio.CancelledError:
                        if self.replan is None or not self._interrupted_by_stop():
                            raise
                        t = now()  # reschedule() woke the wait: the new plan applies now
                        break
                    self.sleeping = False
                    t = now()
                if self.held:  # paused, rescheduled or run_now() in progress: not this tick
                    if group is not None:
                        group.leave(self, self._instant(plan, tick))
                    plan, tick = await self._held_tick(plan, tick, t)
                    t = now()
                    continue
                self.in_tick = True
                # Claim (with a store: stale check, jitter, claim), or the jitter alone.
                if claimed:
                    claimed = False
                elif store is not None:
                    if (current := await self._take(plan, tick, t, group, sleep)) is not None:
                        t = now()
                        tick = current  # stale, or claimed by another worker: wait for this
                        continue
                    t = now()
                elif jitter:
                    await self._asleep(int(self._rng().random() * jitter), sleep)
                    self.sleeping = False
                    t = now()
                if self.stop_requested:
                    break
                self.next = None
                # Attempts: the call, then retries while the policy allows.
                attempt = 1
                run_started, run_wall = t, self.clock.wall() if records_runs else 0.0
                while True:
                    self.last_started = t
                    started_wall = self.clock.wall() if records else 0.0
                    if _listeners:
                        self._emit_started(tick, attempt, t)
                    error: BaseException | None = None
                    try:
                        if call is None:
                            await func()
                        else:
                            await call()
                    except Exception as exc:
                        error = exc
                    except asyncio.CancelledError as exc:
                        if not self._raised_by_job():
                            ended = now()
                            if records:
                                self._record(tick, attempt, t, ended, started_wall, exc)
                            if _listeners:
                                self._emit_ended(tick, attempt, t, ended, exc, cancelled=True)
                            raise
                        error = exc
                    ended = now()
                    if records:
                        self._record(tick, attempt, t, ended, started_wall, error)
                    if _listeners:
                        self._emit_ended(tick, attempt, t, ended, error, cancelled=False)
                    if error is None or retry is None:
                        break
                    if not await self._retried(plan, tick, attempt, error):
                        break
                    attempt += 1
                    t = now()
                t = ended
                if records_runs:  # the fleet-wide run record: the store's, in real time
                    await self._record_run(tick, run_wall, ended - run_started, error)
                    t = now()
                # Report a failure (log, on_exception, raise_exceptions), then plan the next.
                self._run_ended(run_started, ended, error)
                if _listeners:
                    self._emit_run_ended(tick, attempt, run_started, ended, error)
                if error is not None:
                    await self._report(error, tick, attempt)
                    t = now()
                self.runs += 1
                if opts.max_repetitions is not None and self.runs >= opts.max_repetitions:
                    break
                if self._stopping():
                    break
                tick, skipped = plan.after(tick, t)
                if skipped:
                    self._skipped_ticks(skipped, t)
        except _Stopped:
            pass
        except asyncio.CancelledError:
            if not self._interrupted_by_stop():
                raise  # a real cancellation (cancel(), or the event loop shutting down)
        except _LoopEnd as end:
            self.next = None
            self._end_with(end.error)
            return
        finally:
            if group is not None and self.next is not None:
                group.leave(self, self._instant(plan, self.next))
            self.next = None
            self._tick_over()
        if opts.on_complete is not None:
            try:
                await call_hook(opts.on_complete)
            except Exception as exc:
                self._logger().exception("%s: on_complete raised", self.name, extra=self._extra())
                self._end_with(exc)

    # -- wait ----------------------------------------------------------------------------------

    def _asleep(self, ns: int, sleep: SleepFunc) -> Awaitable[Any]:
        """The one interruptible wait: the tick's, the jitter's and the backoff's.

        Returns ``sleep(ns)`` to await; the caller clears ``sleeping`` once it returns. While
        ``sleeping``, `stop` cancels the task; the caller's ``except CancelledError``
        asks `_interrupted_by_stop` whether that is what happened. (A sync function
        and not a coroutine: the tick's wait is on the hot path of every task.)
        """
        if self.stop_requested:
            raise _Stopped
        self.sleeping = True
        return sleep(ns / NS)

    def _interrupted_by_stop(self) -> bool:
        """In ``except CancelledError``: whether stop() cancelled a wait (then undone)."""
        if not self.sleeping or not self.interrupting or self.cancel_requested:
            return False
        self.sleeping = self.interrupting = False
        if sys.version_info >= (3, 11):
            self.task.uncancel()
        return True

    async def _held_tick(self, plan: Plan, tick: Tick, now: int) -> tuple[Plan, Tick]:
        """The plan and tick to go on with instead of running ``tick``: rescheduled (the new
        plan's first tick), paused (the tick is counted in ``paused_ticks``), or a run_now()
        run in progress (waited for; the tick is skipped as an overrun would skip it)."""
        if self.replan is not None:
            return self._replanned(now)
        manual = self.manual
        if manual is not None:
            with self._waiting():
                await asyncio.wait((manual,))
            now = self.clock.monotonic_ns()
            if self._replan_pending():  # reschedule() while it waited
                return self._replanned(now)
            following, covered = plan.after(tick, now)
            self.skipped += 1 + covered
            self._logger().debug(
                "%s: tick skipped: a run_now() run was in progress when it came",
                self.name,
                extra=self._extra(tick, skipped=("run_now", 1 + covered)),
            )
            if _listeners:
                self._emit_skipped("run_now", 1 + covered)
            return plan, following
        following, covered = plan.after(tick, now)
        self.paused_ticks += 1 + covered
        if _listeners:
            self._emit_skipped("paused", 1 + covered)
        return plan, following

    def _replan_pending(self) -> bool:
        # A method, not the attribute: reschedule() may set it while the loop awaits.
        return self.replan is not None

    def _replanned(self, now: int) -> tuple[Plan, Tick]:
        """Put the schedule reschedule() gave in effect: its plan, and its first tick that
        is due after the start of the last run (a grid's multiple that is due now, when a run
        started at that very instant, has had its run)."""
        schedule = self.replan
        assert schedule is not None
        self.replan = None
        self.held = self.paused or self.manual is not None
        plan = schedule.plan(self.clock)
        tick = plan.first(now)
        if self.last_started is not None and tick.deadline <= self.last_started:
            tick = plan.after(tick, now)[0]
        return plan, tick

    def _tick_over(self) -> None:
        """The loop is done with its tick (run, or not): wake a run_now() that waits for it."""
        self.in_tick = False
        rare = self.rare
        if rare is not None and (waiter := rare.tick_waiter) is not None:
            rare.tick_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _stopping(self) -> bool:
        # A method, not the attribute: stop() may set it while the loop awaits (mypy narrows).
        return self.stop_requested

    def _rare(self) -> _Rare:
        """The loop's rarely needed state, made now if it has none."""
        rare = self.rare
        if rare is None:
            rare = self.rare = _Rare()
        return rare

    @property
    def resumed_wall(self) -> float | None:
        """Wall-clock instant of the last resume() of a pause (``None``: never resumed)."""
        return None if self.rare is None else self.rare.resumed_wall

    def _rng(self) -> random.Random:
        """The task's random source (jitter, retry jitter), seeded by ``seed``."""
        if self._random is None:
            self._random = random.Random(self.opts.seed)
        return self._random

    def _skipped_ticks(self, skipped: int, now: int) -> None:
        """Count ticks an overrun covered; log them, at most one line a minute per task.

        When an overloaded event loop makes every task late, a log line per late run would
        add to the load that made them late; the count on the handle stays exact.
        """
        self.skipped += skipped
        rare = self._rare()
        rare.skips_unlogged += skipped
        if _listeners:
            self._emit_skipped("overrun", skipped)
        if rare.skip_logged_at is not None and now - rare.skip_logged_at < _SKIP_LOG_EVERY:
            return
        self._logger().warning(
            "%s: the run took longer than its period; skipped %d tick(s)%s",
            self.name,
            skipped,
            ""
            if rare.skips_unlogged == skipped
            else f" ({rare.skips_unlogged} since the last report a minute ago or more)",
            extra=self._extra(skipped=("overrun", rare.skips_unlogged)),
        )
        rare.skip_logged_at = now
        rare.skips_unlogged = 0

    # -- claim ---------------------------------------------------------------------------------

    def _claim_ttl(self, plan: Plan, tick: Tick) -> int:
        return self.opts.claim_ttl_ns or max(60 * NS, 2 * (plan.following(tick) - tick.deadline))

    def _past_stale(self, plan: Plan, tick: Tick, now: int, ttl: int) -> Tick | None:
        """The tick to wait for instead of ``tick`` if the loop woke too late for it, else None.

        The other processes claimed the tick when it was due, and their claim lives ``ttl``.
        A process that wakes half a ttl late (it was frozen: a stopped container, a suspended
        VM, a blocked event loop) could win an expired claim and run the tick a second time;
        it skips the tick instead, and the ticks it slept through, and carries on from the
        current one.
        """
        late = now - tick.deadline
        if late * 2 < ttl:
            return None
        current, covered = plan.after(tick, now)
        self.skipped += 1 + covered
        if _listeners:
            self._emit_skipped("stale", 1 + covered)
        self._logger().warning(
            "%s: woke %.3g s after tick %s was due (was the process frozen, or the event loop "
            "blocked?); skipping it and the %d tick(s) since: their claims may have expired, "
            "and running them could repeat runs another process made",
            self.name,
            late / NS,
            tick.key,
            covered,
            extra=self._extra(tick, skipped=("stale", 1 + covered)),
        )
        return current

    async def _take(
        self, plan: Plan, tick: Tick, t: int, group: ClaimGroup | None, sleep: SleepFunc
    ) -> Tick | None:
        """Claim the due ``tick`` (with a store): ``None`` if this worker runs it, else the tick
        to wait for instead (this one was stale, claimed by another worker, or skipped by the
        ``on_store_error`` policy).

        Claims after the jitter, so peers claim as far apart as they start. With deadline= the
        store itself refuses a claim that comes too late, whatever delayed it; the stale check
        then only spares a hopeless claim. Without it, the check must come after the jitter,
        right before the claim (see _past_stale).
        """
        pre = self.preclaim
        if pre is not None:
            self.preclaim = None
            if pre[0] is tick:  # a peer due at the same instant claimed it, in time
                won = pre[1].won
                if won is not None:
                    run = self._claimed(tick, won[pre[2]])
                else:
                    run = await self._preclaimed(plan, tick, pre)
                return None if run else plan.after(tick, self.clock.monotonic_ns())[0]
        ttl = self._claim_ttl(plan, tick)
        takes_deadline = self.opts.store_takes_deadline
        if takes_deadline and (current := self._past_stale(plan, tick, t, ttl)):
            if group is not None:
                group.leave(self, self._instant(plan, tick))
            return current
        if self.opts.jitter_ns:
            await self._asleep(int(self._rng().random() * self.opts.jitter_ns), sleep)
            self.sleeping = False
            t = self.clock.monotonic_ns()
        if not takes_deadline and (current := self._past_stale(plan, tick, t, ttl)):
            return current
        if await self._claim(plan, tick, ttl, group):
            return None
        return plan.after(tick, self.clock.monotonic_ns())[0]

    def _instant(self, plan: Plan, tick: Tick) -> int:
        """The tick's due instant in ns since the Unix epoch, from its key alone: the same in
        every worker (never read from this worker's clock, which may be late or skewed), and
        from the plan the tick belongs to (a rescheduled loop's keys are its new schedule's)."""
        assert tick.key is not None
        return cast("KeyedPlan", plan).key_instant(tick.key)

    async def _claim(self, plan: Plan, tick: Tick, ttl: int, group: ClaimGroup | None) -> bool:
        """Whether this worker runs ``tick``: the store's answer, or the ``on_store_error``
        policy's when the store failed. With a group, the ticks of the peers due at the same
        instant are claimed in the same call."""
        store: Any = self.opts.store
        instant = self._instant(plan, tick)
        try:
            with real_time():  # a store's request and timeout are real even under a FakeClock
                if group is not None and (peers := group.take(self, instant)):
                    won = await self._claim_together(group, peers, tick, ttl, instant)
                elif self.opts.store_takes_deadline:
                    won = await store.claim(self.name, tick.key, ttl / NS, deadline=instant / NS)
                else:
                    won = await store.claim(self.name, tick.key, ttl / NS)
        except Exception as exc:
            return self._store_failed(tick, exc)
        return self._claimed(tick, won)

    async def _claim_together(
        self,
        group: ClaimGroup,
        peers: list[tuple[Runner, Tick, int]],
        tick: Tick,
        ttl: int,
        instant: int,
    ) -> bool:
        """Claim ``tick`` and the peers' ticks due at the same ``instant`` in one call; hand
        each peer its answer (`Runner.preclaim`); this loop's own."""
        assert tick.key is not None
        batch = Preclaim()
        deadline = instant / NS
        claims = [(self.name, tick.key, ttl / NS, deadline)]
        for index, (peer, peer_tick, peer_ttl) in enumerate(peers, 1):
            assert peer_tick.key is not None
            peer.preclaim = (peer_tick, batch, index)
            claims.append((peer.name, peer_tick.key, peer_ttl / NS, deadline))
        try:
            won = await group.store.claim_many(claims)
            if not isinstance(won, list) or len(won) != len(claims):
                raise TypeError(
                    f"{group.store!r}.claim_many returned {type(won).__name__} for "
                    f"{len(claims)} claims; it must return one bool per claim, in order"
                )
        except Exception as exc:
            batch.settle(None, exc)
            raise
        except BaseException:  # cancelled meanwhile: each peer claims its own tick
            batch.settle(None, None)
            raise
        batch.settle(won, None)
        return bool(won[0])

    async def _preclaimed(self, plan: Plan, tick: Tick, pre: tuple[Tick, Preclaim, int]) -> bool:
        """Whether this worker runs ``tick``, which a peer claimed with its own (the peer's
        call may still be in progress)."""
        _, batch, index = pre
        await batch.wait()
        if batch.won is not None:
            return self._claimed(tick, batch.won[index])
        if batch.error is not None:
            return self._store_failed(tick, batch.error)
        # The peer was cancelled during its call: claim alone.
        return await self._claim(plan, tick, self._claim_ttl(plan, tick), None)

    def _claimed(self, tick: Tick, won: object) -> bool:
        if not won:
            self.elsewhere += 1
            assert tick.key is not None
            if _listeners:
                emit(ClaimedElsewhere(self.name, self.clock.wall(), tick.deadline / NS, tick.key))
        return bool(won)

    def _store_failed(self, tick: Tick, error: Exception) -> bool:
        """The ``on_store_error`` policy for ``tick``, whose claim raised ``error``."""
        if self.opts.on_store_error == "run":
            self._logger().warning(
                "%s: claim store failed; running tick %d anyway (on_store_error='run')",
                self.name,
                tick.key,
                exc_info=error,
                extra=self._extra(tick),
            )
            return True
        self.skipped += 1
        self._logger().error(
            "%s: claim store failed; skipping tick %d (on_store_error='skip')",
            self.name,
            tick.key,
            exc_info=error,
            extra=self._extra(tick, skipped=("store_error", 1)),
        )
        if _listeners:
            self._emit_skipped("store_error", 1)
        return False

    async def _catch_up(self, plan: Plan, first: Tick, t: int) -> Tick | None:
        """The tick missed before ``first`` to run now, once across the fleet, or None.

        The latest tick before ``first`` that is at most ``misfire_grace`` old is run if the
        store shows no worker claimed it (nor a later tick), and this worker wins it with
        ``claim(..., if_newest=True)``: the store refuses it to a second worker, and to anyone
        once ``deadline + misfire_grace`` has passed (APScheduler's misfire_grace_time, with
        coalesce: only the latest missed tick runs, once).
        """
        opts = self.opts
        store: Any = opts.store
        grace = opts.misfire_grace_ns
        assert store is not None
        assert grace is not None
        assert first.key is not None
        schedule = cast("KeyedSchedule", opts.schedule)
        wall = wall_ns(self.clock)
        key = schedule.last_key_before(first.key, wall - grace)
        if key is None:
            return None
        missed = Tick(t - (wall - schedule.key_instant(key)), first.index - 1, key)
        try:
            with real_time():
                status = await store.status(self.name)
                last = status.last_claim
                if last is not None and last.tick >= key:
                    return None  # run, or being run, by a worker
                won = await store.claim(
                    self.name,
                    key,
                    grace / NS,
                    deadline=self._instant(plan, missed) / NS,
                    if_newest=True,
                )
        except Exception:
            self._logger().error(
                "%s: claim store failed; tick %d missed while no worker ran is not caught up",
                self.name,
                key,
                exc_info=True,
                extra=self._extra(missed),
            )
            return None
        if not won:  # another worker caught it up (not counted in elsewhere: not a tick of ours)
            return None
        self._logger().warning(
            "%s: tick %d was missed (no worker claimed it) %.3g s ago; running it now "
            "(catch_up=True, misfire_grace=%g s)",
            self.name,
            key,
            (wall - schedule.key_instant(key)) / NS,
            grace / NS,
            extra=self._extra(missed),
        )
        return missed

    # -- attempts ------------------------------------------------------------------------------

    def _choose_call(self) -> Callable[[], Awaitable[Any]] | None:
        """How an attempt calls the job, decided once: ``None`` means ``await func()``."""
        if self.periodic._is_async:
            return None if self.opts.timeout_ns is None else self._call_async_with_timeout
        return self._call_in_thread

    async def _call_async_with_timeout(self) -> None:
        timeout = self.opts.timeout_ns
        assert timeout is not None
        await self._with_timeout(asyncio.ensure_future(self.periodic._func()), timeout, False)

    async def _call_in_thread(self) -> None:
        periodic = self.periodic
        busy = periodic._thread_run
        if not busy.done():
            # An earlier loop of this job (cancelled, or stopped after a timeout) left its run
            # in a worker thread, which nothing can interrupt: runs never overlap, so wait.
            self._logger().warning(
                "%s: the previous run is still in its worker thread; this run waits for it",
                self.name,
                extra=self._extra(),
            )
            await asyncio.wrap_future(busy)
        returned: concurrent.futures.Future[None] = concurrent.futures.Future()
        periodic._thread_run = returned
        # Shielded: cancelling the loop (cancel(), a shutdown timeout) abandons the thread's
        # future instead of marking it cancelled while the thread still works (which would
        # tell a FakeClock the thread was done), and still retrieves its late exception.
        future = asyncio.shield(in_thread(self.loop, _run_then_set, returned, periodic._func))
        timeout = self.opts.timeout_ns
        result = await (future if timeout is None else self._with_timeout(future, timeout, True))
        if inspect.isawaitable(result):
            await result

    def _raised_by_job(self) -> bool:
        """In ``except CancelledError`` around a run: whether the job raised it itself.

        Nobody cancelled the loop: the job raised it (say, it awaited a future someone else
        cancelled). That is a failure of the run, not the end of the loop. Python 3.10 cannot
        tell the two apart (no ``Task.cancelling()``), so there it still ends the loop.
        """
        return sys.version_info >= (3, 11) and not self.task.cancelling()

    def _waiting(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self.observer is None else self.observer.waiting()

    async def _with_timeout(self, job: asyncio.Future[Any], timeout: int, in_thread: bool) -> Any:
        observer = self.observer
        timer = self.loop.create_task(_sleep(self.clock, timeout / NS))
        if observer is not None:
            observer.track(job)
            observer.track(timer)
        try:
            with self._waiting():
                await asyncio.wait((job, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel()
            timer.cancel()
            raise
        if job.done():
            timer.cancel()
            await asyncio.wait((timer,))
            return job.result()
        seconds = timeout / NS
        error = RunTimeoutError(f"{self.name}: run exceeded its timeout of {seconds:g} s")
        if in_thread:
            self._logger().error(
                "%s: run exceeded its timeout of %g s; a def job cannot be interrupted, so the "
                "next run waits until its thread returns",
                self.name,
                seconds,
                extra=self._extra(outcome="timeout"),
            )
            with self._waiting():
                await asyncio.wait((job,))
            if not job.cancelled() and job.exception() is not None:
                self._logger().error(
                    "%s: the timed-out run later raised",
                    self.name,
                    exc_info=job.exception(),
                    extra=self._extra(),
                )
        else:
            job.cancel()
            with self._waiting():
                await asyncio.wait((job,))
        raise error

    async def _retried(self, plan: Plan, tick: Tick, attempt: int, error: BaseException) -> bool:
        """Whether the retry policy retries ``error`` (having waited its backoff) or not."""
        retry = self.opts.retry
        assert retry is not None
        if attempt >= retry.attempts or not isinstance(error, retry.on):
            return False
        delay = to_ns(retry.delay(attempt, self._rng()))
        if self.clock.monotonic_ns() + delay >= plan.following(tick) or self.stop_requested:
            self._logger().warning(
                "%s: no retry of attempt %d: the next tick comes first",
                self.name,
                attempt,
                extra=self._extra(tick, attempt, _outcome(error)),
            )
            return False
        self._retrying(tick, attempt, error, delay / NS)
        try:
            await self._asleep(delay, self._sleep)
        except asyncio.CancelledError:
            if not self._interrupted_by_stop():
                raise
            return False  # stopped during the backoff: the run failed; the loop ends after it
        self.sleeping = False
        return True

    # -- record and report ---------------------------------------------------------------------

    def _retrying(self, tick: Tick, attempt: int, error: BaseException, delay: float) -> None:
        """Count and log a retry of ``attempt`` (of ``tick``'s run) after ``delay`` seconds."""
        self.retries += 1
        self._logger().warning(
            "%s: attempt %d failed (%r); retrying in %g s",
            self.name,
            attempt,
            error,
            delay,
            exc_info=error,
            extra=self._extra(tick, attempt, _outcome(error)),
        )

    def _run_ended(self, started: int, ended: int, error: BaseException | None) -> None:
        """A run (its attempts) ended at ``ended`` (ns): its duration, and its success."""
        self.last_duration = ended - started
        if error is None:
            self.last_ok = ended
            self.consecutive_failures = 0

    # Events (see ._events): built only when a listener listens (the caller tests ``_listeners``).

    def _emit_started(self, tick: Tick, attempt: int, started: int, manual: bool = False) -> None:
        emit(
            AttemptStarted(
                self.name,
                self.clock.wall(),
                self.runs,
                attempt,
                tick.deadline / NS,  # scheduled
                started / NS,
                manual,
            )
        )

    def _emit_ended(
        self,
        tick: Tick,
        attempt: int,
        started: int,
        ended: int,
        error: BaseException | None,
        cancelled: bool,
        manual: bool = False,
    ) -> None:
        emit(
            AttemptEnded(
                self.name,
                self.clock.wall(),
                self.runs,
                attempt,
                tick.deadline / NS,  # scheduled
                started / NS,
                ended / NS,
                _outcome(error, cancelled),
                error,
                manual,
            )
        )

    def _emit_run_ended(
        self,
        tick: Tick,
        attempts: int,
        started: int,
        ended: int,
        error: BaseException | None,
        manual: bool = False,
    ) -> None:
        emit(
            RunEnded(
                self.name,
                self.clock.wall(),
                self.runs,
                attempts,
                tick.deadline / NS,  # scheduled
                started / NS,
                ended / NS,
                _outcome(error),
                error,
                manual,
            )
        )

    def _emit_skipped(self, reason: SkipReason, ticks: int) -> None:
        emit(TicksSkipped(self.name, self.clock.wall(), reason, ticks))

    def _record(
        self,
        tick: Tick,
        attempt: int,
        started: int,
        ended: int,
        started_wall: float,
        error: BaseException | None,
    ) -> None:
        """Give the observer the record of an attempt that started at ``started`` and just
        ended, at ``ended`` (ns), when the observer wants records."""
        assert self.observer is not None
        cancelled = isinstance(error, asyncio.CancelledError) and not self._raised_by_job()
        self.observer.run_finished(
            self._attempt_record(tick, attempt, started, ended, started_wall, error, cancelled)
        )

    def _attempt_record(
        self,
        tick: Tick,
        attempt: int,
        started: int,
        ended: int,
        started_wall: float,
        error: BaseException | None,
        cancelled: bool,
    ) -> RunRecord:
        """The record of an attempt from ``started`` to ``ended`` (ns); ``cancelled``: it was
        cancelled from outside (not a ``CancelledError`` the job raised itself).

        (A test clock's hot path, once per simulated run: no property, no `_outcome` call for
        a success, and the tuple made without the NamedTuple's Python-level ``__new__``.)
        """
        return _new_record(
            (
                self.periodic._name,
                self.runs,
                attempt,
                tick.deadline / NS,
                started / NS,
                ended / NS,
                "ok" if error is None else _outcome(error, cancelled),
                error,
                started_wall,
            )
        )

    async def _record_run(
        self, tick: Tick, started_at: float, duration: int, error: BaseException | None
    ) -> None:
        """Note the run in the store's run records; a store failure is logged, never raised."""
        store: Any = self.opts.store
        assert tick.key is not None
        try:
            with real_time():
                await store.record_run(self.name, tick.key, started_at, duration / NS, error)
        except Exception:
            self._logger().warning(
                "%s: could not write the run record of tick %d to the store",
                self.name,
                tick.key,
                exc_info=True,
                extra=self._extra(tick),
            )

    async def _report(self, error: BaseException, tick: Tick, attempt: int) -> None:
        """A run of ``tick`` failed (its last ``attempt``): count it, log it, call on_exception."""
        opts = self.opts
        self.failures += 1
        self.consecutive_failures += 1
        self.last_exception = error
        self._logger().error(
            "%s: run %d failed: %r",
            self.name,
            self.runs,
            error,
            exc_info=error,
            extra=self._extra(tick, attempt, _outcome(error)),
        )
        if opts.on_exception is not None:
            try:
                await call_hook(opts.on_exception, error)
            except Exception as hook_error:
                self._logger().exception(
                    "%s: on_exception raised; the loop ends", self.name, extra=self._extra()
                )
                raise _LoopEnd(hook_error) from hook_error
        if opts.raise_exceptions:
            raise _LoopEnd(error)

    def _logger(self) -> logging.Logger | logging.LoggerAdapter[Any]:
        return self.opts.logger or log

    def _extra(
        self,
        tick: Tick | None = None,
        attempt: int | None = None,
        outcome: Outcome | None = None,
        skipped: tuple[SkipReason, int] | None = None,
    ) -> dict[str, object]:
        """The structured fields of a log record about this task (docs/operating.md lists
        them): ``extra=`` of every record the runner logs."""
        extra: dict[str, object] = {"repeat_every_task": self.name}
        if tick is not None:
            clock = self.clock
            wall = clock.wall() - (clock.monotonic_ns() - tick.deadline) / NS
            extra["repeat_every_tick"] = dt.datetime.fromtimestamp(
                wall, dt.timezone.utc
            ).isoformat()
        if attempt is not None:
            extra["repeat_every_run"] = self.runs
            extra["repeat_every_attempt"] = attempt
        if outcome is not None:
            extra["repeat_every_outcome"] = outcome
        if skipped is not None:
            extra["repeat_every_skip_reason"], extra["repeat_every_skipped"] = skipped
        return extra

    def _end_with(self, error: BaseException) -> None:
        """The loop ends with ``error``: keep it for wait(), or hand it to the event loop."""
        self.exception = error
        if (self.rare is None or self.rare.waiters == 0) and not self.loop.is_closed():
            # No "task" key: this runs inside the task, and on Python ≥ 3.12 the event loop
            # would run a custom handler in that task's context, which is already entered
            # ("cannot enter context"): the handler would never see the exception.
            self.loop.call_exception_handler(
                {
                    "message": f"periodic task {self.name!r} ended with an exception "
                    "(await its handle's wait() to receive it instead)",
                    "exception": error,
                }
            )


# RunRecord from a tuple of its fields, without the Python-level __new__ of a NamedTuple.
_new_record: Callable[[tuple[Any, ...]], RunRecord] = functools.partial(tuple.__new__, RunRecord)


def _outcome(error: BaseException | None, cancelled: bool = False) -> Outcome:
    """How an attempt that raised ``error`` (``None``: it returned) ended; ``cancelled``: it
    was cancelled from outside (not a ``CancelledError`` the job raised itself)."""
    if error is None:
        return "ok"
    if cancelled:
        return "cancelled"
    if isinstance(error, RunTimeoutError):
        return "timeout"
    return "failed"


async def _sleep(clock: Clock, seconds: float) -> None:
    await clock.sleep(seconds)


async def call_hook(hook: Callable[..., Any], *args: Any) -> None:
    """Call a hook: an async one on the loop, a sync one in a worker thread (as fastapi-utils
    does: a hook that blocks, such as one sending an alert, must not block the event loop)."""
    if inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(type(hook).__call__):
        result = hook(*args)
    else:
        result = await in_thread(asyncio.get_running_loop(), hook, *args)
    if inspect.isawaitable(result):
        await result


def in_thread(
    loop: asyncio.AbstractEventLoop, func: Callable[..., Any], *args: Any
) -> asyncio.Future[Any]:
    """Run ``func(*args)`` in a daemon worker thread, in a copy of the current context.

    Daemon threads (see `._threads`): a job stuck in its thread never keeps the process alive
    once the event loop is over.
    """
    return loop.run_in_executor(
        executor(), contextvars.copy_context().run, _no_stop_iteration, func, *args
    )


def _run_then_set(returned: concurrent.futures.Future[None], func: Callable[[], Any]) -> Any:
    """Run ``func`` in its worker thread; ``returned`` says when the thread is done with it.

    The asyncio future of the thread is cancelled with the loop that awaits it, while the
    thread goes on: only this one tells when the job has really returned.
    """
    try:
        return _no_stop_iteration(func)
    finally:
        returned.set_result(None)


def _no_stop_iteration(func: Callable[..., Any], *args: Any) -> Any:
    # asyncio cannot put StopIteration into a Future: the future would never resolve and the
    # loop would hang. Convert it as PEP 479 does for coroutines.
    try:
        return func(*args)
    except StopIteration as exc:
        raise RuntimeError(f"{func!r} raised StopIteration") from exc
