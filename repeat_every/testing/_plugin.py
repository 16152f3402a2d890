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

_MARKER = "fake_clock"
_OPTIONS = ("start", "timeout", "travel", "history")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(start=None, timeout=5.0, travel=True, history=10000): configure the "
        "fake_clock fixture (the keyword arguments of repeat_every.testing.FakeClock)",
    )


@pytest.fixture
def fake_clock(request: pytest.FixtureRequest) -> Iterator[FakeClock]:
    """A `FakeClock`, installed for this test.

    Tasks started during the test step in virtual time; works in ``async def`` tests (any
    pytest-asyncio mode) and in sync tests (use the ``*_blocking`` methods there). The clock's
    wall time starts at the real current time, or at the time of a freezegun or time-machine
    travel — one active before the fixture, or one started later (the clock adopts it at its
    next step). ``@pytest.mark.fake_clock(start=datetime(...), timeout=...)`` passes keyword
    arguments to the clock, like time-machine's marker does for its fixture.
    """
    from ._fake_clock import FakeClock

    marker = request.node.get_closest_marker(_MARKER)
    options: dict[str, object] = {}
    if marker is not None:
        if marker.args:
            raise TypeError(
                f"@pytest.mark.{_MARKER} takes keyword arguments only ({', '.join(_OPTIONS)}), "
                f"got positional {marker.args!r}"
            )
        unknown = sorted(set(marker.kwargs) - set(_OPTIONS))
        if unknown:
            raise TypeError(
                f"@pytest.mark.{_MARKER} got unknown argument(s) {', '.join(unknown)}; it takes "
                f"{', '.join(_OPTIONS)}"
            )
        options = dict(marker.kwargs)
    with FakeClock(**options) as clock:  # type: ignore[arg-type]
        yield clock
