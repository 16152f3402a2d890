"""Virtual time *inside* runs: the loop timers, worker threads and ``time.sleep`` of a run.

A `FakeClock` steps the periodic loops' own sleeps directly. The
code a run executes waits on time by other routes: ``asyncio.sleep``, ``asyncio.wait_for``,
``asyncio.timeout``, anything built on ``loop.call_at``/``call_later``/``loop.time()`` (anyio,
tenacity, stamina, backoff), and ``time.sleep`` in a ``def`` job's worker thread. This module
diverts those routes to the clock, but only for code that runs in a `Scope`: the context
of a periodic task started under the clock. Every task a run spawns and every thread that
copies its context (a ``def`` job's thread, ``asyncio.to_thread``) inherits the scope through
a context variable; code outside scopes (the test itself, ``TestClient``, httpx) falls through
to the real functions and keeps real time.

Prior art: looptime makes the whole event loop's time virtual, the test's own code included.
Here only the periodic tasks' contexts are, which is why a test may still ``await
asyncio.sleep(0.01)`` for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, SupportsIndex

from .._realtime import virtual_scope

if TYPE_CHECKING:
    from ._fake_clock import FakeClock

NS = 1_000_000_000


class Scope:
    """The waits of one periodic task's runs, as the clock must know them.

    Invariants, read under the clock's lock: ``busy`` is the number of the scope's worker
    threads that are running (not parked in a virtual ``time.sleep``); ``waits`` is the number
    of its virtual timers and thread sleeps that have neither fired nor been cancelled. A run
    whose task is blocked while ``waits > 0`` and ``busy == 0`` is waiting for virtual time:
    the clock may move on. Blocked with ``waits == 0``, it waits for something the clock does
    not drive (an event nobody sets, real I/O).
    """

    __slots__ = ("busy", "clock", "waits")

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.busy = 0
        self.waits = 0


_scope: contextvars.ContextVar[Scope | None] = virtual_scope

# The ThreadCount of the current worker thread, if it was submitted from a scope.
_thread_state = threading.local()


class ThreadCount:
    """Whether one worker thread of a scope counts in its ``busy`` (states change under the
    clock's lock).

    ``RUNNING``: counted. ``PARKED``: in a virtual ``time.sleep``, not counted until the clock
    wakes it. ``RELEASED``: its future ended (returned, raised, or was cancelled while the
    thread went on): never counted again, whatever the thread does next. One token per call,
    so that a future cancelled while its thread sleeps is not uncounted twice.
    """

    RUNNING, PARKED, RELEASED = 1, 2, 0
    __slots__ = ("scope", "state")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.state = ThreadCount.RUNNING


def enter_scope(scope: Scope) -> None:
    """Make the calling task's context (and everything it spawns from now on) ``scope``'s."""
    _scope.set(scope)


def scope_of(context: contextvars.Context | None) -> Scope | None:
    """The scope of ``context`` (``None``: the current context)."""
    if context is None:
        return _scope.get()
    return context.get(_scope)


class VirtualTimer(asyncio.TimerHandle):
    """A loop timer set inside a scope: the clock's ``advance`` fires it, not the selector.

    It behaves like the ``TimerHandle`` the loop would have returned (``cancel()``,
    ``cancelled()``, ``when()`` in virtual loop seconds). ``deadline`` is in virtual ns.
    """

    __slots__ = ("_fired", "_real", "deadline", "loop", "scope")

    def __init__(
        self,
        deadline: int,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        context: contextvars.Context | None,
        scope: Scope,
    ) -> None:
        super().__init__(deadline / NS, callback, args, loop, context)
        self.loop = loop
        self.deadline = deadline
        self.scope = scope
        self._fired = False
        self._real: asyncio.TimerHandle | None = None  # after the clock is uninstalled

    def cancel(self) -> None:
        if self._cancelled:
            return
        clock = self.scope.clock
        with clock._lock:
            if not self._fired:
                self._fired = True  # it will never fire: no longer a pending wait
                clock._wait_ended(self.scope)
        if self._real is not None:
            self._real.cancel()
        # Not TimerHandle.cancel: the loop never scheduled this handle, so it must not count it
        # among its cancelled timers.
        asyncio.Handle.cancel(self)


def run_timer(timer: VirtualTimer) -> None:
    """Run a fired timer's callback on its loop (unless it was cancelled meanwhile)."""
    if not timer._cancelled:
        timer._run()


class ThreadSleep:
    """A worker thread of a scope parked in a virtual ``time.sleep`` until ``deadline`` (ns)."""

    __slots__ = ("count", "deadline", "event", "scope")

    def __init__(self, deadline: int, scope: Scope, count: ThreadCount | None) -> None:
        self.deadline = deadline
        self.scope = scope
        self.count = count  # None: a thread the scope never counted
        self.event = threading.Event()


class LoopPatch:
    """The diversions on one event loop: instance attributes that shadow its time methods.

    ``time``, ``call_at``, ``call_later`` and ``run_in_executor`` look up the scope of the
    caller; outside the clock's scopes they call the loop's own methods, so the test and its
    HTTP client keep real time. ``run_in_executor`` keeps real threads but counts them in the
    scope, so the clock waits for them (and for nothing else that runs in threads).
    """

    _NAMES = ("time", "call_at", "call_later", "run_in_executor", "shutdown_default_executor")

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: FakeClock) -> None:
        self.loop = loop
        self.clock = clock
        self._real_time = loop.time
        # The loop reads its clock once per iteration. The base loop's own method only returns
        # time.monotonic(): _time() does the same itself (one Python call less per iteration).
        # (Not when another clock's diversion shadows it: that one is "real" for this one.)
        self._base_time = (
            type(loop).time is asyncio.BaseEventLoop.time
            and _instance_attribute(loop, "time") is None
        )
        self._real_call_at = loop.call_at
        self._real_call_later = loop.call_later
        self._real_run_in_executor = loop.run_in_executor
        self._real_shutdown_default_executor = loop.shutdown_default_executor
        # What the loop's instance held before (a clock installed inside another shadows the
        # outer one's diversions, and gives them back when it goes).
        self._previous = {name: _instance_attribute(loop, name) for name in self._NAMES}
        self.installed = False

    def install(self) -> bool:
        """Shadow the loop's methods; ``False`` if the loop does not allow it (uvloop)."""
        try:
            for name in self._NAMES:
                setattr(self.loop, name, getattr(self, "_" + name))
        except AttributeError:
            self.remove()
            return False
        self.installed = True
        return True

    def remove(self) -> None:
        """Give the loop its own methods back."""
        for name in self._NAMES:
            previous = self._previous[name]
            with contextlib.suppress(AttributeError):
                if previous is None:
                    delattr(self.loop, name)
                else:
                    setattr(self.loop, name, previous)
        self.installed = False

    def _shutdown_default_executor(self, *args: Any, **kwargs: Any) -> Any:
        return _shutdown_default_executor_of(self, *args, **kwargs)

    def _time(self) -> float:
        scope = _scope.get()
        if scope is None or scope.clock is not self.clock:
            return time.monotonic() if self._base_time else self._real_time()
        return self.clock._now / NS

    def _call_at(
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        scope = scope_of(context)
        if scope is None or scope.clock is not self.clock:
            return self._real_call_at(when, callback, *args, context=context)
        return self.clock._add_timer(self.loop, scope, round(when * NS), callback, args, context)

    def _call_later(
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        scope = scope_of(context)
        if scope is None or scope.clock is not self.clock:
            return self._real_call_later(delay, callback, *args, context=context)
        if delay is None:
            raise TypeError("delay must not be None")
        clock = self.clock
        return clock._add_timer(
            self.loop, scope, clock._now + round(delay * NS), callback, args, context
        )

    def _run_in_executor(
        self, executor: Any, func: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        scope = _scope.get()
        if scope is None or scope.clock is not self.clock:
            return self._real_run_in_executor(executor, func, *args)
        clock = self.clock
        count = clock._thread_started(scope)
        try:
            future = self._real_run_in_executor(
                executor, functools.partial(_counted_call, count, func), *args
            )
        except BaseException:
            clock._thread_ended(count)
            raise
        future.add_done_callback(lambda _: clock._thread_ended(count))
        return future


async def _shutdown_default_executor_of(patch: LoopPatch, *args: Any, **kwargs: Any) -> None:
    """The loop is ending (``asyncio.run``'s end, pytest-asyncio's teardown, before the clock
    fixture's): threads parked in a virtual ``time.sleep`` return now, or the executor would
    wait for them for ever."""
    patch.clock._release_threads()
    await patch._real_shutdown_default_executor(*args, **kwargs)


def _instance_attribute(loop: asyncio.AbstractEventLoop, name: str) -> Any:
    """``name`` set on the loop instance itself (not its class), or ``None``."""
    try:
        return vars(loop).get(name)
    except TypeError:  # no instance dict (uvloop)
        return None


def _counted_call(count: ThreadCount, func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func`` in a worker thread that its scope counts as busy."""
    _thread_state.count = count
    try:
        return func(*args)
    finally:
        _thread_state.count = None


# -- time.sleep ------------------------------------------------------------------------------

_real_sleep = time.sleep
_sleep_users = 0
_sleep_lock = threading.Lock()


def _virtual_sleep(seconds: float | SupportsIndex) -> None:
    """``time.sleep`` while a FakeClock is installed: virtual in a scope's worker thread."""
    scope = _scope.get()
    if (
        scope is None
        or not scope.clock._installed
        or not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not seconds > 0
        or asyncio._get_running_loop() is not None  # blocking an event loop: nothing can advance
    ):
        _real_sleep(seconds)
        return
    scope.clock._thread_sleep(scope, seconds, getattr(_thread_state, "count", None))


def patch_time_sleep() -> None:
    """Divert ``time.sleep`` (looked up at call time) until `unpatch_time_sleep`."""
    global _sleep_users
    with _sleep_lock:
        _sleep_users += 1
        if _sleep_users == 1:
            time.sleep = _virtual_sleep


def unpatch_time_sleep() -> None:
    """Undo one `patch_time_sleep`; the last one restores the real ``time.sleep``."""
    global _sleep_users
    with _sleep_lock:
        _sleep_users -= 1
        if _sleep_users == 0:
            time.sleep = _real_sleep


# -- describing a stuck run ------------------------------------------------------------------


def describe_wait(task: asyncio.Task[Any], scope: Scope | None) -> str:
    """What a task that has not gone idle is doing, in words, for ``RunStalledError``."""
    name = repr(task.get_name())
    waiter = getattr(task, "_fut_waiter", None)
    if waiter is None or waiter.done():
        return f"{name} is still running (it has not yielded to the event loop)"
    if scope is not None and scope.busy:
        return (
            f"{name} waits for a worker thread of its run that is still working (real blocking "
            "work, or a sleep the clock cannot see)"
        )
    return (
        f"{name} waits in {_innermost(task)} with no virtual timer pending: an event nobody "
        "sets, or real I/O (a socket, a subprocess, a real-time thread)"
    )


def _innermost(task: asyncio.Task[Any]) -> str:
    """``qualname (file:line)`` of the innermost coroutine the task is suspended in."""
    where = "its job"
    awaited: Any = task.get_coro()
    for _ in range(100):
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        code = frame.f_code
        name = getattr(code, "co_qualname", None)  # Python ≥ 3.11
        if name is None:
            owner = frame.f_locals.get("self")
            name = code.co_name if owner is None else f"{type(owner).__name__}.{code.co_name}"
        where = f"{name}() ({code.co_filename}:{frame.f_lineno})"
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return where
