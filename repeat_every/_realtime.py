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
from collections.abc import Iterator
from typing import Any

virtual_scope: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "repeat_every_virtual_scope", default=None
)
"""The FakeClock scope of the current context (``None``: real time)."""


@contextlib.contextmanager
def real_time() -> Iterator[None]:
    """Run the block (and the tasks and threads it starts) in real time, even inside a run
    stepped by a ``FakeClock``. Does nothing when no clock is involved."""
    token = virtual_scope.set(None)
    try:
        yield
    finally:
        virtual_scope.reset(token)
