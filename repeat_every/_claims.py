"""The claim-store protocol: how processes agree that one of them runs a tick."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

StoreErrorPolicy = Literal["skip", "run"]
"""What a task does with a tick when its claim store fails: skip it, or run it anyway."""


@runtime_checkable
class ClaimStore(Protocol):
    """Decides which process runs a tick.

    Before each run, a task with a store calls `claim` with its name and the tick's
    wall-clock key; only the caller that gets ``True`` runs the tick. A claim is never released
    early (so a slow peer cannot run the same tick afterwards) and expires by itself after
    ``ttl`` seconds, so storage stays bounded. Any exception means "the store is unreachable":
    the task logs it and applies its ``on_store_error`` policy.
    """

    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        """Claim ``(task, tick)`` for ``ttl`` seconds; ``True`` if this caller won it."""
        ...
