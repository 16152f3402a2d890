"""Periodic tasks for any ASGI application, through the ASGI lifespan protocol.

Some ASGI applications have no lifespan of their own: Django's ``get_asgi_application()``
refuses the ``lifespan`` scope, so under uvicorn's default ``--lifespan auto`` the server
decides that the app does not support it, and tasks tied to it would never start (with
``--lifespan on`` the server fails to start). [`with_tasks`][] wraps such an app: it answers
the lifespan scope itself (starting the tasks at startup, stopping them at shutdown) and hands
every other scope (``http``, ``websocket``) to the app unchanged.

The ASGI specification: https://asgi.readthedocs.io/en/latest/specs/lifespan.html. This module
imports nothing beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._durations import Seconds
from ._lifespan import SHUTDOWN_TIMEOUT, check_tasks, run_tasks, shutdown_ns
from ._task import PeriodicTask, log

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def with_tasks(
    app: ASGIApp, *tasks: PeriodicTask[Any], shutdown_timeout: Seconds | None = SHUTDOWN_TIMEOUT
) -> TasksApp:
    """Wrap the ASGI application ``app`` so that ``tasks`` run while the server runs it.

    ``application = with_tasks(get_asgi_application(), cleanup)`` in Django's ``asgi.py``: the
    server's lifespan startup starts the tasks (in the order given), its shutdown stops them
    gracefully (a run in progress finishes) and waits for them, as
    [`run_tasks`][] does. The wrapper answers the ``lifespan`` scope
    itself and never passes it to ``app``; every other scope goes to ``app`` untouched.

    If a task cannot start, the server is told ``lifespan.startup.failed`` with the reason
    (uvicorn then exits instead of serving without its jobs). Works with uvicorn's
    ``--lifespan on`` and ``--lifespan auto`` (the default), and with any server that speaks
    the ASGI lifespan protocol.

    An app that has a lifespan of its own (FastAPI, Starlette, Litestar, Quart) should use it
    instead: ``lifespan(...)`` or [`run_tasks`][] inside it, so that its own startup code
    still runs.

    ``shutdown_timeout`` bounds the wait for runs in progress at shutdown (20 s by default),
    as in [`run_tasks`][].
    """
    if not callable(app):
        raise TypeError(
            f"with_tasks takes an ASGI application first (e.g. get_asgi_application()), not {app!r}"
        )
    check_tasks("with_tasks", tasks)
    shutdown_ns(shutdown_timeout)
    return TasksApp(app, tasks, shutdown_timeout)


class TasksApp:
    """An ASGI application that runs ``tasks`` during the lifespan and ``app`` for the rest.

    Made by [`with_tasks`][]; ``app`` and ``tasks`` are what it
    was given.
    """

    def __init__(
        self,
        app: ASGIApp,
        tasks: tuple[PeriodicTask[Any], ...],
        shutdown_timeout: Seconds | None = SHUTDOWN_TIMEOUT,
    ) -> None:
        self.app = app
        self.tasks = tasks
        self.shutdown_timeout = shutdown_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()  # lifespan.startup: the spec's first message
        started = False
        try:
            async with run_tasks(*self.tasks, shutdown_timeout=self.shutdown_timeout):
                started = True
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown: the server is stopping
            # Leaving the block stopped the tasks and waited for them. A task that had failed
            # earlier does not raise here: that was reported when it happened.
        except Exception as exc:
            phase = "shutdown" if started else "startup"
            log.error("the periodic tasks failed at %s", phase, exc_info=True)
            reason = f"{type(exc).__name__}: {exc}"
            await send({"type": f"lifespan.{phase}.failed", "message": reason})
            return
        await send({"type": "lifespan.shutdown.complete"})
