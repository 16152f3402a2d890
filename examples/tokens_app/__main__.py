"""``python -m examples.tokens_app``: seed a few short-lived tokens and serve the demo.

The app's own defaults are production-like (clean-up hourly, report on weekdays at 09:00);
this command shortens them so you can watch the jobs work: clean-up every 5 s, report every
minute. Environment variables (see ``settings.py``) and options override them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import logging.config
import os
from typing import Any

import uvicorn
from sqlalchemy import create_engine, delete
from sqlalchemy.orm import sessionmaker

from .db import Token, create_tables, create_token
from .settings import Settings

LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"}
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    # uvicorn's, the app's and repeat_every's loggers all propagate to the root's handler.
    "root": {"handlers": ["stderr"], "level": "INFO"},
}
"""One format for every logger, with the process id (handy with ``--workers``)."""

SEED = (("expires-in-4s", 4), ("expires-in-12s", 12), ("expires-tomorrow", 24 * 3600))


def seed(database_url: str) -> None:
    """Store the demo tokens, replacing those of an earlier run.

    The database outlives the process (it is a file in the temporary directory), so a restart
    must not add the same tokens again: the seed tokens are deleted, then created afresh.
    """
    engine = create_engine(database_url)
    create_tables(engine)
    with sessionmaker(engine).begin() as db:
        db.execute(delete(Token).where(Token.name.in_([name for name, _ in SEED])))
        for name, seconds in SEED:
            create_token(db, name, dt.timedelta(seconds=seconds))
    engine.dispose()


def main(argv: list[str] | None = None) -> None:
    """Parse the options, seed the database and run uvicorn."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.tokens_app", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (each tick still runs once)"
    )
    parser.add_argument(
        "--cleanup-seconds",
        type=float,
        default=float(os.environ.get("CLEANUP_SECONDS", 5)),
        help="period of the clean-up (default: $CLEANUP_SECONDS, else 5)",
    )
    parser.add_argument(
        "--report-cron",
        default=os.environ.get("REPORT_CRON", "* * * * *"),
        help="when the report runs (default: $REPORT_CRON, else every minute)",
    )
    parser.add_argument("--no-seed", action="store_true", help="do not add the demo tokens")
    args = parser.parse_args(argv)

    # Through the environment, so that every worker process uvicorn starts reads the same.
    os.environ["CLEANUP_SECONDS"] = str(args.cleanup_seconds)
    os.environ["REPORT_CRON"] = args.report_cron
    settings = Settings.from_env()
    logging.config.dictConfig(LOG_CONFIG)
    log = logging.getLogger("examples.tokens_app")
    if not args.no_seed:
        seed(settings.database_url)
        log.info("seeded %d tokens into %s", len(SEED), settings.database_url)
    log.info(
        "try: curl localhost:%d/tasks   curl localhost:%d/health/tasks   curl localhost:%d/tokens"
        "   (Ctrl+C stops)",
        args.port,
        args.port,
        args.port,
    )
    uvicorn.run(
        "examples.tokens_app.main:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=LOG_CONFIG,
    )


if __name__ == "__main__":
    main()
