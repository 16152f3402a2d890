"""The pytest plugin registered by the ``pytest11`` entry point: the ``fake_clock`` fixture.

pytest imports this module before coverage measurement starts, so it imports the library only
when the fixture is used (and the library's own coverage is measured).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._fake_clock import FakeClock


@pytest.fixture
def fake_clock() -> Iterator[FakeClock]:
    """A `FakeClock`, installed for this test.

    Tasks started during the test step in virtual time; works in ``async def`` tests (any
    pytest-asyncio mode) and in sync tests (use the ``*_blocking`` methods there). The clock's
    wall time starts at the real current time, or at the frozen time when freezegun or
    time-machine is active; for another start, build your own ``FakeClock(start=...)``.
    """
    from ._fake_clock import FakeClock

    with FakeClock() as clock:
        yield clock
