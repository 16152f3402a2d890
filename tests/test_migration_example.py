"""The worked example of docs/migration.md: fastapi-utils' task tests, rewritten with FakeClock.

``docs/src/migration_tests.py`` is collected here as it is, fixtures included.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs" / "src"))

from migration_tests import *  # noqa: F403
