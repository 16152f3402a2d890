import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from repeat_every import TaskHandle, repeat_every, run_tasks

log = logging.getLogger(__name__)
handles: dict[str, TaskHandle] = {}


@repeat_every(seconds=60)
async def refresh_cache() -> None: ...


@repeat_every(seconds=60 * 60)
def remove_expired_tokens() -> None: ...


@contextlib.asynccontextmanager
async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
    log.info("connecting to the database")  # your own startup
    async with run_tasks(refresh_cache, remove_expired_tokens) as (cache, tokens):
        handles.update(cache=cache, tokens=tokens)
        yield
    # here every task has stopped: its run in progress finished, nothing is pending
    log.info("disconnecting")  # your own shutdown


app = FastAPI(lifespan=app_lifespan)


@app.get("/tasks")
async def tasks() -> dict[str, dict[str, object]]:
    return {name: handle.state.as_dict() for name, handle in handles.items()}
