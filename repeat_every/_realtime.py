"""The marker of code that runs in virtual time, and the way out of it for real I/O.

``repeat_every.testing.FakeClock`` makes time inside a periodic task's runs virtual by setting
this context variable in the task's context (every task and thread it spawns inherits it).
The library's own machinery that talks to real servers (a claim store's request and its
timeout) leaves the scope with `real_time`, so a network timeout is never fired early by
a test's ``advance``. Users may do the same around real I/O in a job under test.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

virtual_scope: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "repeat_every_virtual_scope", default=None
)
"""The FakeClock scope of the current context (``None``: real time)."""


class _RealTime:
    """Leaves the virtual scope for the block, and restores it after."""

    __slots__ = ("_token",)

    def __init__(self) -> None:
        self._token: contextvars.Token[Any] | None = None

    def __enter__(self) -> None:
        self._token = virtual_scope.set(None)

    def __exit__(self, *exc_info: object) -> None:
        assert self._token is not None
        virtual_scope.reset(self._token)


class _AlreadyReal:
    """The block is in real time already (no FakeClock): nothing to leave, nothing to make."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_ALREADY_REAL = _AlreadyReal()


def real_time() -> contextlib.AbstractContextManager[None]:
    """Run the block (and the tasks and threads it starts) in real time, even inside a run
    stepped by a ``FakeClock``. Does nothing when no clock is involved."""
    # Claim stores use it around every claim: with no clock, it allocates nothing.
    return _RealTime() if virtual_scope.get() is not None else _ALREADY_REAL
