"""The demo's settings, read from environment variables (so ``uvicorn --workers N`` shares them)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(tempfile.gettempdir()) / "repeat-every-demo"
"""Where the SQLite database and the claim store live unless told otherwise."""


@dataclass(frozen=True)
class Settings:
    """What the app needs to know; :meth:`from_env` documents each variable."""

    database_url: str
    """SQLAlchemy URL of the token database."""
    claims_path: Path
    """SQLite file through which the worker processes of one host share ticks."""
    cleanup_seconds: float
    """Period of the expired-token clean-up."""
    report_cron: str
    """When the token report runs (five cron fields)."""
    report_tz: str
    """The time zone ``report_cron`` is read in."""
    admin_token: str | None = None
    """The bearer token the control routes (``POST /tasks/{name}/run``, ``/pause``,
    ``/resume``) require; ``None``: those routes are off."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read the settings from ``environ``.

        - ``DATA_DIR``: folder of the default database and claim store (default: a
          ``repeat-every-demo`` folder in the system's temporary directory).
        - ``DATABASE_URL``: e.g. ``postgresql+psycopg://app:secret@localhost/app`` (default:
          ``sqlite:///$DATA_DIR/tokens.db``).
        - ``CLAIMS_PATH``: the claim store's SQLite file (default: ``$DATA_DIR/claims.db``).
        - ``CLEANUP_SECONDS``: seconds between two clean-ups (default 3600: hourly).
        - ``REPORT_CRON`` and ``REPORT_TZ``: the report's schedule (default
          ``0 9 * * MON-FRI`` in ``Europe/Paris``: weekdays at 09:00 Paris time).
        - ``ADMIN_TOKEN``: turns on the control routes, for callers that send
          ``Authorization: Bearer $ADMIN_TOKEN`` (default: unset, the routes are off).
        """
        data_dir = Path(environ.get("DATA_DIR", DEFAULT_DATA_DIR))
        return cls(
            database_url=environ.get("DATABASE_URL", f"sqlite:///{data_dir / 'tokens.db'}"),
            claims_path=Path(environ.get("CLAIMS_PATH", data_dir / "claims.db")),
            cleanup_seconds=float(environ.get("CLEANUP_SECONDS", 3600)),
            report_cron=environ.get("REPORT_CRON", "0 9 * * MON-FRI"),
            report_tz=environ.get("REPORT_TZ", "Europe/Paris"),
            admin_token=environ.get("ADMIN_TOKEN") or None,
        )
