"""Shared fixtures of the test suite.

The ``fake_clock`` fixture comes from the package's own pytest plugin. pyproject.toml disables
the entry-point copy (``-p no:repeat_every``) so that the plugin is imported here, after
coverage measurement has started.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest_plugins = ["repeat_every.testing._plugin", "servers"]

# pytest-asyncio calls asyncio.get_event_loop() around sync tests, which would create a loop
# nobody closes (a ResourceWarning under -W error); with no policy loop set it never does.
asyncio.set_event_loop(None)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the running event loop's exception handler during the test."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(previous)
