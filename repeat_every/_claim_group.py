"""Claims made together: the ticks of one store's tasks that fall due at the same instant.

A thousand tasks on one claim store, due at the same instant (every minute, on the minute),
would each claim its own tick: a thousand calls, each waited for by its task. Instead, each task
says which tick it waits for before it sleeps (`ClaimGroup.expect`); the first of them to wake
takes the others' ticks (`ClaimGroup.take`) and claims them all, its own first, in one
``store.claim_many`` call; each of the others finds its answer when it wakes
(`Runner.preclaim`) and runs, or skips, without waiting for the store.

Used only when the store has ``claim_many`` (the stores of ``repeat_every.stores`` do) and the
task has no ``jitter`` (with a jitter, peers claim at moments of their own, on purpose).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._runner import Runner
    from ._schedule import Tick

_GROUPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, ClaimGroup]] = (
    weakref.WeakKeyDictionary()
)


def claim_group(store: Any, loop: asyncio.AbstractEventLoop) -> ClaimGroup:
    """The group of ``store``'s tasks on ``loop`` (made on first use, gone with the loop)."""
    groups = _GROUPS.get(loop)
    if groups is None:
        groups = _GROUPS[loop] = {}
    group = groups.get(id(store))  # the group holds the store: its id is not reused meanwhile
    if group is None:
        group = groups[id(store)] = ClaimGroup(store)
    return group


class ClaimGroup:
    """The tasks of one claim store on one event loop, by the instant their tick is due.

    An entry lives while its task waits for that tick: `expect` before the task sleeps,
    removed by `take` (the first task of the instant to claim) or by `leave` (the task left
    its wait another way: stopped, paused, rescheduled).
    """

    __slots__ = ("_due", "store")

    def __init__(self, store: Any) -> None:
        self.store = store
        # instant (ns since the epoch) → the tasks waiting for a tick due then: tick, ttl (ns)
        self._due: dict[int, dict[Runner, tuple[Tick, int]]] = {}

    def expect(self, runner: Runner, tick: Tick, instant: int, ttl: int) -> None:
        """``runner`` waits for ``tick``, due at ``instant``, whose claim lives ``ttl``."""
        due = self._due.get(instant)
        if due is None:
            due = self._due[instant] = {}
        due[runner] = (tick, ttl)

    def leave(self, runner: Runner, instant: int) -> None:
        """``runner`` no longer waits for its tick due at ``instant`` (nothing if it did not)."""
        due = self._due.get(instant)
        if due is not None and due.pop(runner, None) is not None and not due:
            del self._due[instant]

    def take(self, runner: Runner, instant: int) -> list[tuple[Runner, Tick, int]]:
        """The other tasks still waiting for a tick due at ``instant``, for ``runner`` to
        claim with its own: each with its tick and ttl.

        A task is taken only while it still waits for that very tick and may run it: not
        stopping, not paused, no run_now() run or reschedule pending (each checked again
        when it wakes; see `Runner._main`).
        """
        due = self._due.pop(instant, None)
        if due is None:
            return []
        return [
            (peer, tick, ttl)
            for peer, (tick, ttl) in due.items()
            if peer is not runner
            and peer.next is tick
            and not (peer.in_tick or peer.held or peer.stop_requested)
        ]


class Preclaim:
    """The claims one task made for its peers: their answers once ``claim_many`` returned.

    Each peer's `Runner.preclaim` holds ``(tick, this, index)``. ``won`` is ``None`` while the
    call is in progress (``done`` is then set when it ends), and stays ``None`` if the claiming
    task was cancelled meanwhile: each peer then claims its tick itself.
    """

    __slots__ = ("done", "error", "settled", "won")

    def __init__(self) -> None:
        self.won: list[bool] | None = None
        self.error: Exception | None = None
        self.settled = False
        self.done: asyncio.Event | None = None  # made only if a peer has to wait

    def settle(self, won: list[bool] | None, error: Exception | None) -> None:
        self.won, self.error, self.settled = won, error, True
        if self.done is not None:
            self.done.set()

    async def wait(self) -> None:
        """Until ``claim_many`` ended (at once if it has)."""
        if not self.settled:
            if self.done is None:
                self.done = asyncio.Event()
            await self.done.wait()
