import asyncio
import threading

from repeat_every import repeat_every

seen: dict[str, int] = {}


@repeat_every(seconds=60)
def compact_files() -> None:
    # A def: runs in a worker thread, so blocking I/O (a sync database driver, file
    # operations, requests.get) never blocks the event loop and the other requests.
    seen["compact_files"] = threading.get_ident()


@repeat_every(seconds=60)
async def ping_upstream() -> None:
    # An async def: runs on the event loop; it must await, never block.
    await asyncio.sleep(0)
    seen["ping_upstream"] = threading.get_ident()
