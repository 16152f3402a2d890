"""The token table (SQLAlchemy 2.x) and the queries the app and its jobs run."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, String, TypeDecorator, delete, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.schema import CreateIndex, CreateTable

UTC = dt.timezone.utc


def utcnow() -> dt.datetime:
    """The current instant, aware, in UTC (``FakeClock(start=...)`` moves it in tests)."""
    return dt.datetime.now(UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime on every database: SQLite keeps no offset, so store naive UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give an aware one (e.g. in UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """The demo's tables."""


class Token(Base):
    """An API token. Only a hash of its secret is stored; the secret is shown once."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(8))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


def create_tables(engine: Engine) -> None:
    """Create the tables if missing; safe when several worker processes start at once.

    ``metadata.create_all`` checks, then creates: two workers can both see no table and the
    second ``CREATE TABLE`` fails. ``IF NOT EXISTS`` leaves the check to the database.
    """
    if engine.url.get_backend_name() == "sqlite" and engine.url.database not in (None, ":memory:"):
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            connection.execute(CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                connection.execute(CreateIndex(index, if_not_exists=True))


def create_token(db: Session, name: str, lifetime: dt.timedelta) -> tuple[Token, str]:
    """Add a token that expires ``lifetime`` from now; return it and its secret."""
    secret = secrets.token_urlsafe(24)
    now = utcnow()
    token = Token(
        name=name,
        prefix=secret[:8],
        secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
        created_at=now,
        expires_at=now + lifetime,
    )
    db.add(token)
    db.flush()
    return token, secret


def list_tokens(db: Session) -> list[Token]:
    """Every stored token, expired ones included (until the clean-up removes them)."""
    return list(db.scalars(select(Token).order_by(Token.expires_at, Token.id)))


def remove_expired_tokens(db: Session) -> int:
    """Delete the tokens whose expiry has passed; return how many were deleted."""
    result = db.execute(delete(Token).where(Token.expires_at <= utcnow()))
    return int(result.rowcount)  # type: ignore[attr-defined]


def count_tokens(db: Session, *, expiring_within: dt.timedelta) -> tuple[int, int]:
    """How many tokens are still valid, and how many of them expire within ``expiring_within``."""
    now = utcnow()
    valid = db.scalar(select(func.count()).where(Token.expires_at > now)) or 0
    soon = (
        db.scalar(
            select(func.count()).where(
                Token.expires_at > now, Token.expires_at <= now + expiring_within
            )
        )
        or 0
    )
    return valid, soon
