"""The demo's FastAPI app: API tokens, and the periodic jobs that look after them.

Two jobs, started and stopped with the app by ``repeat_every.lifespan``:

- ``remove_expired_tokens`` runs every ``CLEANUP_SECONDS`` (hourly by default). It is a plain
  ``def`` doing blocking SQLAlchemy I/O: repeat-every runs it in a worker thread.
- ``report_tokens`` runs at the times of the cron expression ``REPORT_CRON`` in the zone
  ``REPORT_TZ`` (weekdays at 09:00 Paris time by default).

Both claim each tick in a :class:`~repeat_every.stores.SQLiteClaimStore`, so with
``uvicorn --workers 4`` each tick runs in one worker, not four. ``repeat_every.fastapi``'s
router serves ``GET /tasks`` (what they did, here and fleet-wide), ``GET /health/tasks``
(503 when one has not succeeded for too long) and, when ``ADMIN_TOKEN`` is set, the control
routes (run now, pause, resume) for callers that send that token. ``GET /metrics`` serves the
jobs' Prometheus series (``repeat_every.metrics.prometheus``; each worker process its own, see
docs/operating.md for multiprocess mode). Run it with
``python -m examples.tokens_app`` (see ``__main__.py``) or
``uvicorn examples.tokens_app.main:app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Header, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from repeat_every import lifespan, repeat_at, repeat_every
from repeat_every.fastapi import tasks_router
from repeat_every.metrics.prometheus import PrometheusMetrics
from repeat_every.stores import SQLiteClaimStore

from .db import Token, count_tokens, create_tables, create_token, list_tokens, utcnow
from .db import remove_expired_tokens as delete_expired_tokens
from .settings import Settings

log = logging.getLogger("examples.tokens_app")


class TokenRequest(BaseModel):
    """``POST /tokens``: a name, and how long the token lives."""

    name: str = Field(min_length=1, max_length=100, examples=["ci"])
    lifetime_seconds: float = Field(gt=0, le=366 * 24 * 3600, examples=[3600])


class TokenInfo(BaseModel):
    """A stored token (without its secret)."""

    id: int
    name: str
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime
    expired: bool

    @classmethod
    def of(cls, token: Token, now: dt.datetime) -> TokenInfo:
        return cls(
            id=token.id,
            name=token.name,
            prefix=token.prefix,
            created_at=token.created_at,
            expires_at=token.expires_at,
            expired=token.expires_at <= now,
        )


class NewToken(TokenInfo):
    """A token just created: the only time its secret is shown."""

    token: str


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app, its database and its periodic jobs, configured by ``settings`` (default: env)."""
    settings = settings or Settings.from_env()
    engine = create_engine(settings.database_url)
    new_session = sessionmaker(engine)
    claims = SQLiteClaimStore(settings.claims_path)  # one tick, one run, across workers
    registry = CollectorRegistry()  # this app's metrics (GET /metrics)

    @repeat_every(seconds=settings.cleanup_seconds, store=claims, name="remove_expired_tokens")
    def remove_expired_tokens() -> None:
        with new_session.begin() as db:
            removed = delete_expired_tokens(db)
        log.info("remove_expired_tokens: removed %d expired token(s)", removed)

    @repeat_at(cron=settings.report_cron, tz=settings.report_tz, store=claims, name="report_tokens")
    def report_tokens() -> None:
        with new_session() as db:
            valid, soon = count_tokens(db, expiring_within=dt.timedelta(days=1))
        log.info("report_tokens: %d valid token(s), %d expiring within 24 h", valid, soon)

    tasks = (remove_expired_tokens, report_tokens)

    @contextlib.asynccontextmanager
    async def database(app: FastAPI) -> AsyncIterator[None]:
        # Entered before the tasks start and left after they have stopped.
        settings.claims_path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(create_tables, engine)
        log.info(
            "tokens app ready: remove_expired_tokens every %g s, report_tokens at %r in %s",
            settings.cleanup_seconds,
            settings.report_cron,
            settings.report_tz,
        )
        # The jobs' series are recorded while the app runs (installed before the tasks start).
        with PrometheusMetrics(registry=registry):
            async with claims:
                yield
        engine.dispose()

    app = FastAPI(
        title="repeat-every demo: API tokens",
        lifespan=lifespan(*tasks, app_lifespan=database),
    )

    @app.post("/tokens", status_code=201)
    def post_token(request: TokenRequest) -> NewToken:
        """Create a token that expires ``lifetime_seconds`` from now; shows its secret once."""
        with new_session.begin() as db:
            token, secret = create_token(
                db, request.name, dt.timedelta(seconds=request.lifetime_seconds)
            )
            info = TokenInfo.of(token, utcnow())
        return NewToken(**info.model_dump(), token=secret)

    @app.get("/tokens")
    def get_tokens() -> list[TokenInfo]:
        """Every stored token, soonest expiry first; expired ones stay until the clean-up."""
        now = utcnow()
        with new_session() as db:
            return [TokenInfo.of(token, now) for token in list_tokens(db)]

    # -- operating the jobs -------------------------------------------------------------------
    # GET /tasks, GET /tasks/{name}, GET /health/tasks; with ADMIN_TOKEN set, also
    # POST /tasks/{name}/run, /pause and /resume, for callers that send that token.
    token = settings.admin_token
    app.include_router(
        tasks_router(*tasks, control=token is not None, authorize=bearer(token) if token else None)
    )

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus: runs by outcome, durations, lateness, skipped ticks, last success."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def bearer(token: str) -> Callable[[str], None]:
    """A FastAPI dependency that lets through only ``Authorization: Bearer <token>``."""

    def verify(authorization: str = Header("")) -> None:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(
                401, "send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
            )
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "this token may not control the jobs")

    return verify


app = create_app()
