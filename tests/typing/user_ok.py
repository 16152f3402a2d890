"""A user's module as they would write it: mypy --strict and pyright must report nothing.

Checked by tests/test_types.py; never imported by the test suite.
"""

from __future__ import annotations

from repeat_every import PeriodicTask, TaskHandle, repeat_at, repeat_every


@repeat_every(seconds=60 * 60)
async def remove_expired_tokens() -> None:
    """An async job that returns nothing."""


@repeat_every(seconds=30, max_repetitions=3)
def count_tokens() -> int:
    """A sync job (it runs in a worker thread) that returns a count."""
    return 3


@repeat_at(cron="0 9 * * MON-FRI", tz="Europe/Paris")
async def send_digest() -> str:
    return "sent"


cleanup: PeriodicTask[None] = remove_expired_tokens
counter: PeriodicTask[int] = count_tokens
digest: PeriodicTask[str] = send_digest


async def test_the_bodies_directly() -> None:
    tokens: int = await count_tokens.call()
    outcome: str = await send_digest.call()
    await remove_expired_tokens.call()
    assert (tokens, outcome) == (3, "sent")


async def start_and_stop() -> None:
    handle: TaskHandle = remove_expired_tokens()
    also: TaskHandle = await count_tokens()
    await handle.aclose()
    await also.aclose()
