"""Starting tasks with a program and stopping them with it: ``async with`` and FastAPI lifespan.

Neither needs FastAPI or Starlette: a lifespan is just a function of the app that returns an
async context manager, so this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ._durations import NS, Seconds, duration_ns
from ._realtime import real_time
from ._task import PeriodicTask, TaskHandle, log

App = TypeVar("App")
Lifespan = Callable[[App], contextlib.AbstractAsyncContextManager[Any]]

SHUTDOWN_TIMEOUT = 20.0
"""How long shutdown waits, by default, for runs in progress (seconds).

Kubernetes sends SIGTERM and kills the pod ``terminationGracePeriodSeconds`` later (30 s by
default). Before the tasks stop, the server drains its open connections (uvicorn waits for
them, bounded by ``--timeout-graceful-shutdown``); after, the app's own shutdown code runs.
20 s for the runs leaves about 10 s of the default grace period for both, so the process ends
by itself, with its log lines, instead of being killed mid-run with none.
"""


def shutdown_ns(value: object) -> int | None:
    """``shutdown_timeout`` checked: ``None`` (wait for ever) or integer nanoseconds."""
    return None if value is None else duration_ns(value, "shutdown_timeout", allow_zero=True)


def check_tasks(caller: str, tasks: tuple[object, ...]) -> None:
    """Refuse anything but decorated tasks, naming ``caller`` and the offending value."""
    for task in tasks:
        if not isinstance(task, PeriodicTask):
            raise TypeError(
                f"{caller} takes tasks decorated with @repeat_every or @repeat_at, not {task!r}"
            )


def run_tasks(
    *tasks: PeriodicTask[Any], shutdown_timeout: Seconds | None = SHUTDOWN_TIMEOUT
) -> contextlib.AbstractAsyncContextManager[tuple[TaskHandle, ...]]:
    """Start ``tasks`` on entry and stop them on exit; yields their handles in order.

    On exit every task is stopped gracefully (a run in progress finishes) and awaited, so no
    task is left pending. A task that had already ended with an exception does not raise
    here: it was reported when it ended (logged, and handed to the event loop's exception
    handler or to a waiter). If the block is cancelled, the tasks are cancelled too.

    The wait for runs in progress is bounded by ``shutdown_timeout`` (seconds or a
    ``timedelta``, on the tasks' clock; 20 s by default, see `SHUTDOWN_TIMEOUT`; ``None``
    waits for as long as they take). It logs which tasks it waits for; past the timeout an
    ``async def`` run is cancelled and a ``def`` run is abandoned in its worker thread (a
    daemon thread: it does not keep the process alive), and each task given up on is logged
    by name.

    Works in any asyncio program::

        async def main():
            async with run_tasks(refresh_cache, drop_expired_tokens):
                await serve_forever()
    """
    check_tasks("run_tasks", tasks)
    return _run_tasks(tasks, shutdown_ns(shutdown_timeout))


@contextlib.asynccontextmanager
async def _run_tasks(
    tasks: tuple[PeriodicTask[Any], ...], timeout: int | None
) -> AsyncIterator[tuple[TaskHandle, ...]]:
    handles: list[TaskHandle] = []
    body_failed = False
    try:
        for task in tasks:
            handles.append(task.start())
        yield tuple(handles)
    except BaseException:
        body_failed = True
        for handle in handles:
            handle.cancel()
        raise
    finally:
        busy = [handle.name for handle in handles if handle._runner.in_run()]
        for handle in handles:
            handle.stop()
        if busy:
            log.info(
                "shutdown: waiting %s for the run in progress of: %s",
                "as long as it takes" if timeout is None else f"up to {timeout / NS:g} s",
                ", ".join(busy),
                extra={"repeat_every_tasks": busy},
            )
        if handles:
            done = asyncio.gather(
                *(h._runner.close(timeout, announce=False) for h in handles),
                return_exceptions=True,
            )
            try:
                results = await asyncio.shield(done)
            except asyncio.CancelledError:
                for handle in handles:
                    handle.cancel()
                await asyncio.wait((done,))
                raise
            stalled = _failed_closes(handles, results)
            await _flush_stores(handles)
            if stalled is not None and not body_failed:
                raise stalled  # a FakeClock's RunStalledError: the test must see it
        for handle in handles:
            if handle.exception is not None:
                log.debug(
                    "%s had ended with %r before shutdown",
                    handle.name,
                    handle.exception,
                    extra={"repeat_every_task": handle.name},
                )


async def _flush_stores(handles: list[TaskHandle]) -> None:
    """Write what the stopped tasks' claim stores still queue (the run records of the last
    runs), so that the event loop may end right after; a failure is logged, never raised."""
    stores: dict[int, Any] = {}
    for handle in handles:
        store = handle._runner.opts.store
        if store is not None and inspect.iscoroutinefunction(getattr(store, "flush", None)):
            stores[id(store)] = store
    for store in stores.values():
        try:
            with real_time():
                await store.flush()
        except Exception:
            log.warning(
                "shutdown: could not write the run records queued in %r", store, exc_info=True
            )


def _failed_closes(
    handles: list[TaskHandle], results: list[BaseException | None]
) -> AssertionError | None:
    """Cancel and log each task whose stop could not be waited for; the first test failure
    among the reasons (a FakeClock nobody advanced raises ``RunStalledError``), if any."""
    stalled: AssertionError | None = None
    for handle, result in zip(handles, results, strict=True):
        if not isinstance(result, BaseException):
            continue
        handle.cancel()  # not left running behind the shutdown
        log.error(
            "shutdown: could not wait for %s to stop (%r); cancelled it",
            handle.name,
            result,
            exc_info=result,
            extra={"repeat_every_task": handle.name},
        )
        if stalled is None and isinstance(result, AssertionError):
            stalled = result
    return stalled


def lifespan(
    *tasks: PeriodicTask[Any],
    app_lifespan: Lifespan[App] | None = None,
    shutdown_timeout: Seconds | None = SHUTDOWN_TIMEOUT,
) -> Lifespan[App]:
    """A FastAPI/Starlette ``lifespan`` that runs ``tasks`` while the app runs.

    ``FastAPI(lifespan=lifespan(cleanup, refresh))`` starts the tasks at startup and stops
    them (gracefully, awaited) at shutdown. To keep the app's own lifespan, pass it as
    ``app_lifespan``: it is entered first and exited last, so the tasks can use what it sets
    up (a database pool, say), and the state it yields is passed through to the app.
    ``shutdown_timeout`` bounds the wait for runs in progress at shutdown, as in
    [`run_tasks`][] (20 s by default). For full control, use [`run_tasks`][] inside your own
    lifespan instead.
    """
    check_tasks("lifespan", tasks)
    timeout = shutdown_ns(shutdown_timeout)

    @contextlib.asynccontextmanager
    async def _lifespan(app: App) -> AsyncIterator[Any]:
        async with contextlib.AsyncExitStack() as stack:
            state = None
            if app_lifespan is not None:
                state = await stack.enter_async_context(app_lifespan(app))
            await stack.enter_async_context(_run_tasks(tasks, timeout))
            yield state

    return _lifespan
