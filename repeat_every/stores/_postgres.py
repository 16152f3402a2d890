"""The PostgreSQL claim store: one row per claimed tick, for workers on many hosts."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ._common import PerLoop, check_claim, check_seconds, check_table, owner, require, within

if TYPE_CHECKING:
    from types import TracebackType

log = logging.getLogger("repeat_every")


class PostgresClaimStore:
    """Claims as rows of a PostgreSQL table: once per tick across every process and host.

    Uses asyncpg (``pip install 'repeat-every[postgres]'``), imported when the store is made
    (``import repeat_every.stores`` alone does not import it).
    Works with PostgreSQL ≥ 9.5 (``ON CONFLICT``) and compatible servers.

    Users may rely on:

    - **One winner.** A claim is one ``INSERT … ON CONFLICT (task, tick) DO UPDATE … WHERE
      expired RETURNING``: PostgreSQL's unique index makes concurrent claimers of the same
      row wait for each other, and exactly one of them gets ``True`` until the claim expires.
    - **Expiry by the server.** A claim lasts ``ttl`` seconds on the database server's clock
      (``clock_timestamp()``), so the workers' clocks do not matter for it. Each store deletes
      expired rows at most every ``cleanup_interval`` seconds, so the table stays small.
    - **The table is made for you.** ``table`` is created if missing, on the first claim,
      under an advisory lock so that many workers starting at once do not trip over each
      other. Its columns: ``task text``, ``tick bigint`` (primary key together),
      ``owner text`` (``host:pid`` of the winner), ``expires_at timestamptz``.
    - **Lazy and self-healing.** Given a ``dsn``, the store makes its own small connection pool
      on the first claim (one per event loop, and a new one in a forked process, each closed
      when its loop ends); after any failure that pool is discarded and the next claim
      connects afresh, so claims resume when the server is back. A claim never waits more
      than ``timeout`` seconds.
    - **Your pool, your lifetime.** Given an asyncpg ``pool``, the store uses it and
      `aclose` leaves it open.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Any = None,
        table: str = "repeat_every_claims",
        timeout: float = 5.0,
        cleanup_interval: float = 60.0,
        pool_size: int = 2,
    ) -> None:
        """Claim in the database at ``dsn`` (``postgresql://user:password@host:5432/db``), or
        through an existing ``asyncpg.Pool``: one of the two.

        ``table``: the claims table (``name`` or ``schema.name``). ``timeout``: seconds a claim
        may take, connecting included. ``cleanup_interval``: seconds between two deletions of
        expired claims by this store (0: after every claim). ``pool_size``: connections of the
        store's own pool (with ``dsn``).
        """
        if (dsn is None) == (pool is None):
            raise TypeError(
                "PostgresClaimStore needs either dsn='postgresql://user@host/db' or "
                "pool=<an asyncpg.Pool>, not both and not neither"
            )
        if dsn is not None and (not isinstance(dsn, str) or not dsn):
            raise TypeError(f"dsn must be a PostgreSQL URL such as 'postgresql://…', got {dsn!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int ≥ 1, got {pool_size!r}")
        if dsn is not None:
            require("asyncpg", "postgres", "PostgresClaimStore")
        self._dsn = dsn
        self._given = pool
        self._table = check_table(table)
        self._timeout = check_seconds(timeout, "timeout")
        self._cleanup_interval = check_seconds(
            cleanup_interval, "cleanup_interval", allow_zero=True
        )
        self._pool_size = pool_size
        self._own: PerLoop[Any] = PerLoop(self._connect, self._close, _terminate)
        self._table_ready = False  # with a given pool: the table was created
        self._last_cleanup = -float("inf")  # time.monotonic() of the last cleanup
        t = self._table
        self._claim_sql = (
            f"INSERT INTO {t} AS c (task, tick, owner, expires_at) "
            "VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4)) "
            "ON CONFLICT (task, tick) DO UPDATE "
            "SET owner = excluded.owner, expires_at = excluded.expires_at "
            "WHERE c.expires_at <= clock_timestamp() "
            "RETURNING true"
        )
        self._cleanup_sql = f"DELETE FROM {t} WHERE expires_at <= clock_timestamp()"

    @property
    def table(self) -> str:
        """The claims table."""
        return self._table

    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        """Claim ``(task, tick)`` for ``ttl`` seconds; ``True`` if this caller won it.

        Raises asyncpg's or the OS's error (or ``TimeoutError``) when the database cannot be
        reached.
        """
        check_claim(task, tick, ttl)
        try:
            won = await within(self._timeout, self._claim(task, tick, float(ttl)))
        except Exception:  # not on cancellation: other claims may be using the pool
            await self._discard()
            raise
        if time.monotonic() - self._last_cleanup >= self._cleanup_interval:
            await self._cleanup()
        return won

    async def aclose(self) -> None:
        """Close the pool the store made (not a given one); a later claim makes a new one.

        Closes the pool of the running event loop; the store's pools in other loops are
        closed when their loops end.
        """
        await self._own.aclose()

    async def __aenter__(self) -> PostgresClaimStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        target = "dsn=…" if self._dsn is not None else f"pool={self._given!r}"
        return f"{type(self).__name__}({target}, table={self._table!r})"

    # -- internals ----------------------------------------------------------------------------

    async def _claim(self, task: str, tick: int, ttl: float) -> bool:
        pool = await self._pool()
        won = await pool.fetchval(self._claim_sql, task, tick, owner(), ttl)
        return bool(won)

    async def _pool(self) -> Any:
        if self._given is None:
            return await self._own.get()
        if not self._table_ready:
            await self._create_table(self._given)
            self._table_ready = True
        return self._given

    async def _connect(self) -> Any:
        import asyncpg  # type: ignore[import-untyped,unused-ignore]

        pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            timeout=self._timeout,
            command_timeout=self._timeout,
            reset=_keep_session,
        )
        try:
            await self._create_table(pool)
        except BaseException:
            pool.terminate()
            raise
        return pool

    async def _close(self, pool: Any) -> None:
        try:
            await within(self._timeout, pool.close())
        except Exception:
            pool.terminate()

    async def _create_table(self, pool: Any) -> None:
        async with pool.acquire() as conn, conn.transaction():
            # CREATE TABLE IF NOT EXISTS is not safe against itself: two sessions running it
            # at once can both try to create the table's row type. Serialize them.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._table)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} ("
                " task text NOT NULL,"
                " tick bigint NOT NULL,"
                " owner text NOT NULL,"
                " expires_at timestamptz NOT NULL,"
                " PRIMARY KEY (task, tick))"
            )

    async def _discard(self) -> None:
        """After a failure: drop the store's own pool, so the next claim connects afresh."""
        await self._own.discard()
        if self._given is not None:
            self._table_ready = False  # maybe the table was dropped: make sure again

    async def _cleanup(self) -> None:
        # Not part of the claim: a failure here is retried at the next interval and must not
        # turn a decided claim into a "store unreachable".
        self._last_cleanup = time.monotonic()
        try:
            pool = await self._pool()
            await within(self._timeout, pool.execute(self._cleanup_sql))
        except Exception:
            log.debug("deleting expired claims from %s failed", self._table, exc_info=True)


def _terminate(pool: Any) -> None:
    try:
        pool.terminate()
    except Exception:  # its event loop may be gone already; the sockets go with the pool
        log.debug("terminating the PostgreSQL claim pool failed", exc_info=True)


async def _keep_session(conn: Any) -> None:
    """Replaces asyncpg's reset of a connection given back to the pool (a round trip per
    claim): the store's statements change no session state (no SET, LISTEN, session lock or
    temporary table), and asyncpg still rolls back a transaction left open."""
