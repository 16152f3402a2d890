"""Events: page someone when a run fails, warn when a run starts late (docs/operating.md)."""

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from repeat_every import AttemptStarted, RunEnded, TaskEvent, add_listener, lifespan, repeat_every

log = logging.getLogger("myapp.jobs")
pages: list[str] = []  # stands for: a queue that a task of yours sends to the pager


synced: list[str] = []


async def fetch_new_orders() -> list[str]:
    return ["order-1"]  # stands for: call the partner's API


@repeat_every(seconds=60, name="sync-orders")
async def sync_orders() -> None:
    synced.extend(await fetch_new_orders())


def on_event(event: TaskEvent) -> None:
    # Called inline on the event loop, for every task: keep it quick (no I/O here).
    if isinstance(event, RunEnded) and event.outcome != "ok":
        pages.append(f"{event.task}: run failed after {event.attempts} attempt(s)")
    elif isinstance(event, AttemptStarted) and event.attempt == 1 and event.late > 5:
        log.warning("%s started %.1f s late", event.task, event.late)


@contextlib.asynccontextmanager
async def listening(app: FastAPI) -> AsyncIterator[None]:
    with add_listener(on_event):  # removed when the app shuts down
        yield


app = FastAPI(lifespan=lifespan(sync_orders, app_lifespan=listening))
