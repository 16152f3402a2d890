import asyncio
import contextlib
import logging

from repeat_every import repeat_every, run_tasks

log = logging.getLogger(__name__)
processed: list[str] = []


@repeat_every(seconds=10)
async def heartbeat() -> None:
    log.info("still alive, %d messages processed", len(processed))


async def consume(queue: asyncio.Queue[str]) -> None:
    """Your program: a queue consumer, a socket server, a bot..."""
    while (message := await queue.get()) != "quit":
        processed.append(message)


async def main(queue: asyncio.Queue[str]) -> None:
    async with run_tasks(heartbeat):
        await consume(queue)
    # leaving the block stopped the heartbeat and waited for it


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: the heartbeat is cancelled, quietly
        asyncio.run(main(asyncio.Queue()))
    log.info("stopped")
