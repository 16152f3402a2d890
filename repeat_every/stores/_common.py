"""What the claim stores share: who claims, argument checks, the loop a client belongs to."""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import re
import socket
import sys
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


if sys.version_info >= (3, 11):

    async def within(seconds: float, coro: Awaitable[T]) -> T:
        """``await coro``, cancelled with ``TimeoutError`` after ``seconds``."""
        async with asyncio.timeout(seconds):  # no extra task, unlike wait_for before 3.12
            return await coro

else:  # pragma: no cover - Python 3.10

    async def within(seconds: float, coro: Awaitable[T]) -> T:
        """``await coro``, cancelled with ``TimeoutError`` after ``seconds``."""
        return await asyncio.wait_for(coro, seconds)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_hostname: str | None = None


def owner() -> str:
    """``host:pid`` of the caller: written beside each claim, to see who ran a tick.

    Read at each claim (not at import): a worker forked after the import has its own pid.
    """
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname()
    return f"{_hostname}:{os.getpid()}"


def require(module: str, extra: str, store: str) -> None:
    """Import a store's driver now, when the store is made, rather than at its first claim.

    Importing a driver takes a tenth of a second or more: done during the first claim, it
    would make every worker that starts at the same moment late for the same tick. A missing
    driver is also better reported when the store is made.
    """
    try:
        importlib.import_module(module)
    except ImportError as exc:
        hint = f": pip install 'repeat-every[{extra}]'" if extra else ""
        raise ImportError(f"{store} needs the {module} module{hint} ({exc})") from exc


def check_table(table: object) -> str:
    """A table name (optionally ``schema.table``) that is safe to put in SQL unquoted."""
    if not isinstance(table, str) or not all(
        _IDENTIFIER.fullmatch(part) for part in table.split(".", 1)
    ):
        raise ValueError(
            "table must be a plain SQL name (letters, digits, underscores; optionally "
            f"schema.table), got {table!r}"
        )
    return table


def check_seconds(value: object, argument: str, *, allow_zero: bool = False) -> float:
    """A finite number of seconds, > 0 (or ≥ 0), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{argument} must be finite and {bound} seconds, got {value!r}")
    return seconds


def check_claim(task: object, tick: object, ttl: object) -> None:
    """Refuse a malformed claim before it reaches the store (a bug, not an outage)."""
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty string, got {task!r}")
    if isinstance(tick, bool) or not isinstance(tick, int):
        raise TypeError(f"tick must be an int, got {tick!r}")
    check_seconds(ttl, "ttl")


class PerLoop(Generic[T]):
    """One client (or pool) per event loop, closed by `aclose` or when its loop ends.

    Async clients (redis.asyncio, asyncpg) belong to the event loop that made them, and a
    forked worker must not share its parent's sockets. A store is often made once, at import
    time, and used from several loops in turn: one per test in a test suite, one per
    ``TestClient``. So each loop (in each process) gets its own client, made on first use.

    Each client is tied to its loop by an async generator suspended in ``try/finally``:
    ``asyncio.run()``, ``asyncio.Runner``, uvicorn and pytest-asyncio all finalize the async
    generators of a loop before closing it (``loop.shutdown_asyncgens()``), so the client is
    closed while its loop still runs, instead of leaking sockets ("unclosed transport").
    """

    def __init__(
        self,
        make: Callable[[], Awaitable[T]],
        close: Callable[[T], Awaitable[None]],
        abandon: Callable[[T], None],
    ) -> None:
        self._make = make
        self._close = close  # graceful, in the client's loop
        self._abandon = abandon  # immediate, after a failure
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slot[T]] = (
            weakref.WeakKeyDictionary()
        )

    async def get(self) -> T:
        """The running loop's client, made now if it has none."""
        loop = asyncio.get_running_loop()
        slot = self._slots.get(loop)
        if slot is None or slot.pid != os.getpid():
            slot = self._slots[loop] = _Slot()
        async with slot.lock:
            if slot.value is None:
                value = await self._make()
                guard = self._guard(loop, slot, value)
                await guard.asend(None)  # now the loop knows it: it will finalize it
                slot.value, slot.guard = value, guard
            return slot.value

    async def aclose(self) -> None:
        """Close the running loop's client (the others close when their loops end)."""
        slot = self._slots.pop(asyncio.get_running_loop(), None)
        if slot is not None and slot.guard is not None and slot.pid == os.getpid():
            await slot.guard.aclose()

    async def discard(self) -> None:
        """Drop the running loop's client at once (after a failure); the next get() makes one."""
        slot = self._slots.pop(asyncio.get_running_loop(), None)
        if slot is not None and slot.guard is not None and slot.pid == os.getpid():
            slot.abandoned = True
            await slot.guard.aclose()

    async def _guard(
        self, loop: asyncio.AbstractEventLoop, slot: _Slot[T], value: T
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            if self._slots.get(loop) is slot:
                del self._slots[loop]
            if slot.abandoned:
                self._abandon(value)
            else:
                await self._close(value)


class _Slot(Generic[T]):
    __slots__ = ("abandoned", "guard", "lock", "pid", "value")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = asyncio.Lock()
        self.value: T | None = None
        self.guard: AsyncGenerator[None, None] | None = None
        self.abandoned = False
