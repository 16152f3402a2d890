import contextlib
import datetime as dt
from collections.abc import AsyncIterator

from fastapi import FastAPI
from sqlalchemy import create_engine, delete
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from repeat_every import lifespan, repeat_every

database_uri = "sqlite:///./test.db"
engine = create_engine(database_uri)
SessionLocal = sessionmaker(engine)


class Base(DeclarativeBase):
    pass


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    expires_at: Mapped[dt.datetime]  # naive, in UTC


def remove_expired_tokens(db: Session) -> None:
    """Delete the tokens whose expiry has passed."""
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    db.execute(delete(Token).where(Token.expires_at <= now))


@repeat_every(seconds=60 * 60)  # 1 hour
def remove_expired_tokens_task() -> None:
    with SessionLocal.begin() as db:
        remove_expired_tokens(db=db)


@contextlib.asynccontextmanager
async def database(app: FastAPI) -> AsyncIterator[None]:
    Base.metadata.create_all(engine)  # was: another @app.on_event("startup") handler
    yield
    engine.dispose()  # after the task has stopped


app = FastAPI(lifespan=lifespan(remove_expired_tokens_task, app_lifespan=database))
