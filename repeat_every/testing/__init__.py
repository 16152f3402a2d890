"""Test periodic jobs in virtual time: ``FakeClock`` and the ``fake_clock`` pytest fixture.

Installing the package registers a pytest plugin (entry point ``pytest11``) that provides the
``fake_clock`` fixture: a [`FakeClock`][] installed for the duration of one test.
"""

from .._realtime import real_time as real_time
from ._fake_clock import FakeClock as FakeClock
from ._fake_clock import RunHistory as RunHistory
from ._fake_clock import RunStalledError as RunStalledError

__all__ = ["FakeClock", "RunHistory", "RunStalledError", "real_time"]
