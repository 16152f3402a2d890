import datetime as dt

from fastapi import FastAPI
from sqlalchemy import create_engine, delete
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from repeat_every import repeat_every  # was: from fastapi_utils.tasks import repeat_every

database_uri = "sqlite:///./test.db?check_same_thread=False"
engine = create_engine(database_uri)
SessionLocal = sessionmaker(engine)  # was: FastAPISessionMaker(database_uri)

app = FastAPI()


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


@app.on_event("startup")
def create_tables() -> None:
    Base.metadata.create_all(engine)


@app.on_event("startup")
@repeat_every(seconds=60 * 60)  # 1 hour
def remove_expired_tokens_task() -> None:
    with SessionLocal.begin() as db:  # was: sessionmaker.context_session()
        remove_expired_tokens(db=db)
