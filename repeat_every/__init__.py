"""Periodic jobs for asyncio and FastAPI: no drift, no overlap, no silent failure.

``@repeat_every(seconds=...)`` turns a ``def`` or ``async def`` into a periodic job; calling
the result starts it and returns a handle. [`lifespan`][] and
[`run_tasks`][] tie jobs to an application's life, and
[`with_tasks`][] gives them to any ASGI app (Django).
``repeat_every.testing`` steps every job in virtual time. [`add_listener`][] tells a function
of every attempt, run and skipped tick of every job (``repeat_every.metrics`` builds
Prometheus and OpenTelemetry metrics on it).

Importing this package loads only the standard library (no FastAPI, Starlette, Redis or
database driver): integrations import their dependencies when they are used.
"""

from ._claims import ClaimStore as ClaimStore
from ._claims import StoreErrorPolicy as StoreErrorPolicy
from ._decorator import repeat_at as repeat_at
from ._decorator import repeat_every as repeat_every
from ._events import AttemptEnded as AttemptEnded
from ._events import AttemptStarted as AttemptStarted
from ._events import ClaimedElsewhere as ClaimedElsewhere
from ._events import RunEnded as RunEnded
from ._events import Subscription as Subscription
from ._events import TaskEvent as TaskEvent
from ._events import TicksSkipped as TicksSkipped
from ._events import add_listener as add_listener
from ._lifespan import lifespan as lifespan
from ._lifespan import run_tasks as run_tasks
from ._policy import Retry as Retry
from ._policy import RunTimeoutError as RunTimeoutError
from ._records import RunRecord as RunRecord
from ._records import TaskState as TaskState
from ._task import PeriodicTask as PeriodicTask
from ._task import TaskHandle as TaskHandle
from ._task import get_handle as get_handle
from ._task import running_handles as running_handles
from .asgi import with_tasks as with_tasks

__version__ = "0.1.0"

__all__ = [
    "AttemptEnded",
    "AttemptStarted",
    "ClaimStore",
    "ClaimedElsewhere",
    "PeriodicTask",
    "Retry",
    "RunEnded",
    "RunRecord",
    "RunTimeoutError",
    "StoreErrorPolicy",
    "Subscription",
    "TaskEvent",
    "TaskHandle",
    "TaskState",
    "TicksSkipped",
    "add_listener",
    "get_handle",
    "lifespan",
    "repeat_at",
    "repeat_every",
    "run_tasks",
    "running_handles",
    "with_tasks",
]
