"""Starting tasks with a program and stopping them with it: ``async with`` and FastAPI lifespan.

Neither needs FastAPI or Starlette: a lifespan is just a function of the app that returns an
async context manager, so this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ._task import PeriodicTask, TaskHandle, log

App = TypeVar("App")
Lifespan = Callable[[App], contextlib.AbstractAsyncContextManager[Any]]


def check_tasks(caller: str, tasks: tuple[object, ...]) -> None:
    """Refuse anything but decorated tasks, naming ``caller`` and the offending value."""
    for task in tasks:
        if not isinstance(task, PeriodicTask):
            raise TypeError(
                f"{caller} takes tasks decorated with @repeat_every or @repeat_at, not {task!r}"
            )


@contextlib.asynccontextmanager
async def run_tasks(*tasks: PeriodicTask[Any]) -> AsyncIterator[tuple[TaskHandle, ...]]:
    """Start ``tasks`` on entry and stop them on exit; yields their handles in order.

    On exit every task is stopped gracefully (a run in progress finishes) and awaited, so no
    task is left pending. A task that had already ended with an exception does not raise
    here: it was reported when it ended (logged, and handed to the event loop's exception
    handler or to a waiter). If the block is cancelled, the tasks are cancelled too.

    Works in any asyncio program::

        async def main():
            async with run_tasks(refresh_cache, drop_expired_tokens):
                await serve_forever()
    """
    check_tasks("run_tasks", tasks)
    handles: list[TaskHandle] = []
    try:
        for task in tasks:
            handles.append(task.start())
        yield tuple(handles)
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    finally:
        for handle in handles:
            handle.stop()
        if handles:
            done = asyncio.gather(*(h.aclose() for h in handles), return_exceptions=True)
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                for handle in handles:
                    handle.cancel()
                await asyncio.wait((done,))
                raise
        for handle in handles:
            if handle.exception is not None:
                log.debug("%s had ended with %r before shutdown", handle.name, handle.exception)


def lifespan(*tasks: PeriodicTask[Any], app_lifespan: Lifespan[App] | None = None) -> Lifespan[App]:
    """A FastAPI/Starlette ``lifespan`` that runs ``tasks`` while the app runs.

    ``FastAPI(lifespan=lifespan(cleanup, refresh))`` starts the tasks at startup and stops
    them (gracefully, awaited) at shutdown. To keep the app's own lifespan, pass it as
    ``app_lifespan``: it is entered first and exited last, so the tasks can use what it sets
    up (a database pool, say), and the state it yields is passed through to the app.
    For full control, use [`run_tasks`][] inside your own lifespan instead.
    """

    @contextlib.asynccontextmanager
    async def _lifespan(app: App) -> AsyncIterator[Any]:
        async with contextlib.AsyncExitStack() as stack:
            state = None
            if app_lifespan is not None:
                state = await stack.enter_async_context(app_lifespan(app))
            await stack.enter_async_context(run_tasks(*tasks))
            yield state

    return _lifespan
