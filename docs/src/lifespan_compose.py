import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from repeat_every import lifespan, repeat_every


class Pool:
    """Stands for a database pool or an HTTP client: opened at startup, closed at shutdown."""

    def __init__(self) -> None:
        self.open = False
        self.queries = 0

    async def fetch(self, query: str) -> list[str]:
        assert self.open, "the pool is closed"
        self.queries += 1
        return []


pool = Pool()


@contextlib.asynccontextmanager
async def open_pool(app: FastAPI) -> AsyncIterator[dict[str, Pool]]:
    pool.open = True  # entered before the tasks start...
    yield {"pool": pool}  # ...this state reaches request.state as usual...
    pool.open = False  # ...and left after they have stopped


@repeat_every(seconds=60)
async def purge_sessions() -> None:
    await pool.fetch("DELETE FROM sessions WHERE expires_at < now()")


app = FastAPI(lifespan=lifespan(purge_sessions, app_lifespan=open_pool))
