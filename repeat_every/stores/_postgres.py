"""The PostgreSQL claim store: one row per claimed tick, for workers on many hosts."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._common import (
    STATUS_COLUMNS,
    PerLoop,
    RecordQueue,
    Row,
    TaskStatus,
    check_claim,
    check_claims,
    check_run,
    check_seconds,
    check_table,
    check_task_name,
    error_text,
    owner,
    redact_url,
    require,
    status_from_row,
    within,
)

if TYPE_CHECKING:
    from types import TracebackType

log = logging.getLogger("repeat_every")

_RUN_FIELDS = ("tick", "at", "by", "duration", "error")  # of a run record: <ok|failed>_<field>


def _newer(p: str, field: str) -> str:
    """``SET`` of a run record's column: the batch's value if its record (success ``p="ok"``
    or failure ``p="failed"``) is there and not older than the kept one, else the kept one."""
    newer = f"excluded.{p}_at IS NOT NULL AND (s.{p}_at IS NULL OR s.{p}_at <= excluded.{p}_at)"
    return f"{p}_{field} = CASE WHEN {newer} THEN excluded.{p}_{field} ELSE s.{p}_{field} END"


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
    - **No late winner, given the deadline.** With ``deadline=`` (the tick's due instant), the
      claim lives until ``deadline + ttl`` on the server's clock, and a claim reaching the
      server at or after that instant loses: a worker however late cannot win a tick another
      worker claimed.
    - **Run records.** A won claim also notes the task's last claimed tick, in the same
      statement; `record_run` notes its last success or failure; `status` and
      `statuses` read them (table ``<table>_tasks``, one row per task, never expired).
    - **Run records are sent together, and waited for only alone.** A `record_run` given
      while no other record of this event loop is queued or on its way is sent at once, and
      its caller waits for it (so a task alone at its instant learns that its record failed).
      Any other is queued and `record_run` returns at once: the records queued during one
      turn of the event loop (the thousand tasks ending at one instant) go to the database
      together at the end of that turn, in one round trip, within ``timeout``. Of the same
      task's records, the one that started last is kept, queued or not. `status`,
      `statuses` and `aclose` write the queued records first, so they always see them. A
      queued record whose write fails is logged at WARNING (``could not write the run
      records of …``, naming the tasks) and dropped, as the task loop does when `record_run`
      raises. `flush` writes them and waits (`run_tasks` and `lifespan` call it once their
      tasks stop): records still queued when the event loop ends without `flush` or
      `aclose` may be lost.
    - **The tables are made for you.** ``table`` and ``<table>_tasks`` are created if missing,
      on the first claim, under an advisory lock so that many workers starting at once do
      not trip over each other. The claims' columns: ``task text``, ``tick bigint`` (primary
      key together), ``owner text`` (``host:pid`` of the winner), ``expires_at timestamptz``.
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

        ``table``: the claims table (``name`` or ``schema.name``; the run records go to
        ``<table>_tasks``). ``timeout``: seconds a claim
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
            raise TypeError("dsn must be a PostgreSQL URL such as 'postgresql://user@host/db'")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int ≥ 1, got {pool_size!r}")
        if dsn is not None:
            require("asyncpg", "postgres", "PostgresClaimStore")
        self._dsn = dsn
        self._given = pool
        self._table = check_table(table)
        if len(self._table.rsplit(".", 1)[-1]) > 57:
            raise ValueError(
                f"table must be at most 57 characters (after any schema) so that "
                f"'{{table}}_tasks' fits PostgreSQL's 63, got {table!r}"
            )
        self._tasks = f"{self._table}_tasks"
        self._timeout = check_seconds(timeout, "timeout")
        self._cleanup_interval = check_seconds(
            cleanup_interval, "cleanup_interval", allow_zero=True
        )
        self._pool_size = pool_size
        self._own: PerLoop[Any] = PerLoop(self._connect, self._close, _terminate)
        self._table_ready = False  # with a given pool: the table was created
        self._last_cleanup = -float("inf")  # time.monotonic() of the last cleanup
        t, n = self._table, self._tasks
        # $5, the deadline, is NULL for a claim without one; $6 the claimer's wall clock; $7
        # true to win only a tick newer than every tick of the task claimed so far.
        self._claim_sql = (
            f"WITH won AS (INSERT INTO {t} AS c (task, tick, owner, expires_at) "
            "SELECT $1, $2, $3, e.at FROM (SELECT CASE WHEN $5::float8 IS NULL "
            "THEN clock_timestamp() + make_interval(secs => $4) "
            "ELSE to_timestamp($5::float8 + $4) END AS at) AS e "
            "WHERE e.at > clock_timestamp() AND (NOT $7::bool OR NOT EXISTS ("
            f"SELECT 1 FROM {n} AS l WHERE l.task = $1 AND l.claimed_tick >= $2)) "
            "ON CONFLICT (task, tick) DO UPDATE "
            "SET owner = excluded.owner, expires_at = excluded.expires_at "
            "WHERE c.expires_at <= clock_timestamp() RETURNING c.task), "
            f"noted AS (INSERT INTO {n} AS s (task, claimed_tick, claimed_at, claimed_by) "
            "SELECT task, $2, to_timestamp($6), $3 FROM won "
            "ON CONFLICT (task) DO UPDATE SET claimed_tick = excluded.claimed_tick, "
            "claimed_at = excluded.claimed_at, claimed_by = excluded.claimed_by "
            "WHERE s.claimed_tick IS NULL OR s.claimed_tick <= excluded.claimed_tick) "
            "SELECT count(*) FROM won"
        )
        # Many claims in one statement, from arrays (six parameters, whatever their number):
        # $1..$4 the tasks, ticks, ttls and deadlines (NULL: none), $5 the owner, $6 the
        # claimer's wall clock. ON CONFLICT DO UPDATE cannot touch a row twice in one
        # statement, so `chosen` keeps one item per (task, tick): the first that is not too
        # late, as sequential claims would have it (a later duplicate loses to it or to the
        # claim that beats it). Rows are written in (task, tick) order so that two batches
        # over the same ticks queue behind each other instead of deadlocking; `noted` writes
        # each task's highest won tick, as that task's sequential claims would leave it.
        self._claim_many_sql = (
            "WITH req AS (SELECT r.task, r.tick, r.i, CASE WHEN r.deadline IS NULL "
            "THEN clock_timestamp() + make_interval(secs => r.ttl) "
            "ELSE to_timestamp(r.deadline + r.ttl) END AS at "
            "FROM unnest($1::text[], $2::int8[], $3::float8[], $4::float8[]) "
            "WITH ORDINALITY AS r(task, tick, ttl, deadline, i)), "
            "chosen AS (SELECT DISTINCT ON (task, tick) task, tick, i, at FROM req "
            "WHERE at > clock_timestamp() ORDER BY task, tick, i), "
            f"won AS (INSERT INTO {t} AS c (task, tick, owner, expires_at) "
            "SELECT task, tick, $5, at FROM chosen ORDER BY task, tick "
            "ON CONFLICT (task, tick) DO UPDATE "
            "SET owner = excluded.owner, expires_at = excluded.expires_at "
            "WHERE c.expires_at <= clock_timestamp() RETURNING c.task, c.tick), "
            f"noted AS (INSERT INTO {n} AS s (task, claimed_tick, claimed_at, claimed_by) "
            "SELECT task, max(tick), to_timestamp($6), $5 FROM won GROUP BY task ORDER BY task "
            "ON CONFLICT (task) DO UPDATE SET claimed_tick = excluded.claimed_tick, "
            "claimed_at = excluded.claimed_at, claimed_by = excluded.claimed_by "
            "WHERE s.claimed_tick IS NULL OR s.claimed_tick <= excluded.claimed_tick) "
            "SELECT chosen.i FROM chosen JOIN won USING (task, tick)"
        )
        self._cleanup_sql = f"DELETE FROM {t} WHERE expires_at <= clock_timestamp()"

        # One run record (the lone one, waited for): ~90 µs less for the server than the
        # statement over arrays below.
        self._record_sql = {
            ok: f"INSERT INTO {n} AS s (task, {p}_tick, {p}_at, {p}_by, {p}_duration, {p}_error) "
            "VALUES ($1, $2, to_timestamp($3), $4, $5, $6) ON CONFLICT (task) DO UPDATE SET "
            f"{p}_tick = excluded.{p}_tick, {p}_at = excluded.{p}_at, "
            f"{p}_by = excluded.{p}_by, {p}_duration = excluded.{p}_duration, "
            f"{p}_error = excluded.{p}_error "
            f"WHERE s.{p}_at IS NULL OR s.{p}_at <= excluded.{p}_at"
            for ok, p in ((True, "ok"), (False, "failed"))
        }
        # Run records in one statement, from arrays (seven parameters, whatever their number):
        # $1..$7 each record's task, tick, start (Unix s), worker, duration, error text, and
        # whether it is a success. ON CONFLICT DO UPDATE cannot touch a row twice in one
        # statement, so each task gets one row: its newest success and its newest failure of
        # the batch (the later one of two that started at the same instant, as sequential
        # writes would keep), each replacing the kept one only if not older than it.
        self._record_many_sql = (
            "WITH r AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::float8[], $4::text[], "
            "$5::float8[], $6::text[], $7::bool[]) "
            "WITH ORDINALITY AS r(task, tick, started, worker, duration, error, ok, i)), "
            "o AS (SELECT DISTINCT ON (task) * FROM r WHERE ok "
            "ORDER BY task, started DESC, i DESC), "
            "f AS (SELECT DISTINCT ON (task) * FROM r WHERE NOT ok "
            "ORDER BY task, started DESC, i DESC) "
            f"INSERT INTO {n} AS s (task, "
            + ", ".join(f"{p}_{c}" for p in ("ok", "failed") for c in _RUN_FIELDS)
            + ") SELECT task, o.tick, to_timestamp(o.started), o.worker, o.duration, o.error, "
            "f.tick, to_timestamp(f.started), f.worker, f.duration, f.error "
            "FROM o FULL JOIN f USING (task) ORDER BY task "
            "ON CONFLICT (task) DO UPDATE SET "
            + ", ".join(_newer(p, c) for p in ("ok", "failed") for c in _RUN_FIELDS)
        )
        columns = ", ".join(
            f"extract(epoch FROM {c})::float8" if c.endswith("_at") else c for c in STATUS_COLUMNS
        )
        self._status_sql = f"SELECT {columns} FROM {n}"
        self._records = RecordQueue(self._record_many, self._timeout, repr(self))

    @property
    def table(self) -> str:
        """The claims table."""
        return self._table

    async def claim(
        self,
        task: str,
        tick: int,
        ttl: float,
        *,
        deadline: float | None = None,
        if_newest: bool = False,
    ) -> bool:
        """Claim ``(task, tick)``; ``True`` if this caller won it.

        Without ``deadline`` the claim lives ``ttl`` seconds from when the server runs it.
        With ``deadline`` (the tick's due instant, seconds since the Unix epoch) it lives until
        ``deadline + ttl`` on the server's clock, and a claim the server runs at or after that
        instant loses.
        With ``if_newest=True`` the claim also loses if the store's run records show that a
        worker claimed this tick or a later one of ``task``, at any time (for a catch-up run
        of a tick missed while every worker was down: once across the fleet, even after the
        tick's own claims expired).

        Raises asyncpg's or the OS's error (or ``TimeoutError``) when the database cannot be
        reached.
        """
        seconds = check_claim(task, tick, ttl, deadline)
        args = (task, tick, owner(), seconds, deadline, time.time(), bool(if_newest))
        won = await self._fetchval(self._claim_sql, *args)
        if time.monotonic() - self._last_cleanup >= self._cleanup_interval:
            await self._cleanup()
        return bool(won)

    async def claim_many(self, claims: Sequence[tuple[str, int, float, float]]) -> list[bool]:
        """Claim several ticks in one round trip: each ``(task, tick, ttl, deadline)`` as
        ``claim(task, tick, ttl, deadline=deadline)`` would claim it; whether each was won, in
        order.

        One statement (the items sent as arrays, so any number fits), one transaction: the
        winner rules and the run records are those of as many ``claim`` calls, and a
        ``(task, tick)`` given twice is won at most once, by the first item that is not too
        late for its deadline. Every item is checked before anything is sent (the same errors
        as ``claim``, naming the item: ``claims[3]: ttl must be…``); ``[]`` sends nothing. The
        whole call takes at most ``timeout`` seconds and raises what ``claim`` raises when the
        database cannot be used. A claim of the batch that waits for another caller's claim of
        the same row waits for that caller's whole statement.
        """
        items = check_claims(claims)
        if not items:
            return []
        tasks, ticks, ttls, deadlines = (list(column) for column in zip(*items, strict=True))
        rows = await self._fetch(
            self._claim_many_sql, tasks, ticks, ttls, deadlines, owner(), time.time()
        )
        won = [False] * len(items)
        for (i,) in rows:
            won[i - 1] = True  # WITH ORDINALITY counts from 1
        if time.monotonic() - self._last_cleanup >= self._cleanup_interval:
            await self._cleanup()
        return won

    async def record_run(
        self,
        task: str,
        tick: int,
        started_at: float,
        duration: float,
        error: BaseException | str | None = None,
        *,
        worker: str | None = None,
    ) -> None:
        """Note a finished run of ``task``: its last success (``error`` is ``None``) or its
        last failure (``error``: the exception or its text).

        ``started_at``: when it started (seconds since the Unix epoch); ``duration``: seconds
        it took; ``worker``: who ran it (default: ``host:pid`` of the caller). A record older
        than the one kept (by ``started_at``) does not replace it.

        Sent at once and waited for when it is the only record of this event loop under way;
        else queued and not waited for: the records queued during one turn of the event loop
        go to the database together at its end (see "Run records are sent together" in the
        class's docstring). Raises asyncpg's error for a record waited for; a queued record
        that cannot be written is logged.
        """
        check_run(task, tick, started_at, duration)
        text = error_text(error)
        await self._records.add(
            (task, tick, float(started_at), worker or owner(), float(duration), text)
        )

    async def status(self, task: str) -> TaskStatus:
        """What the store remembers of ``task`` (all ``None`` for a task it never saw).

        Sees every run record this store was given in this event loop, queued ones included.
        """
        check_task_name(task)
        await self._records.flush()
        rows = await self._fetch(f"{self._status_sql} WHERE task = $1", task)
        return status_from_row(rows[0]) if rows else TaskStatus(task)

    async def statuses(self) -> list[TaskStatus]:
        """What the store remembers of every task, by name (queued run records included)."""
        await self._records.flush()
        rows = await self._fetch(f"{self._status_sql} ORDER BY task")
        return [status_from_row(row) for row in rows]

    async def flush(self) -> None:
        """Write the run records this event loop still queues, and wait for them (and for
        those already under way): `run_tasks` and `lifespan` call it after stopping their
        tasks, so a shutdown loses none. Raises what the write raised."""
        await self._records.flush()

    async def aclose(self) -> None:
        """Write the run records still queued, then close the pool the store made (not a given
        one); a later claim makes a new one.

        Closes the pool of the running event loop; the store's pools in other loops are
        closed when their loops end.
        """
        await self._records.flush()
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
        # Never the password: reprs end up in logs and error pages.
        target = f"dsn={redact_url(self._dsn)!r}" if self._dsn is not None else "pool=…"
        return f"{type(self).__name__}({target}, table={self._table!r})"

    # -- internals ----------------------------------------------------------------------------

    async def _record_many(self, rows: list[Row]) -> None:
        """Write run records in one statement (`RecordQueue`'s ``write``)."""
        if len(rows) == 1:
            sql, args = self._record_sql[rows[0][5] is None], rows[0]
        else:
            columns: list[Any] = [list(column) for column in zip(*rows, strict=True)]
            sql, args = self._record_many_sql, (*columns, [row[5] is None for row in rows])
        try:
            await self._run("execute", sql, args)
        except Exception:
            await self._discard()
            raise

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await within(self._timeout, self._run("fetchval", sql, args))
        except Exception:  # not on cancellation: other claims may be using the pool
            await self._discard()
            raise

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            rows: list[Any] = await within(self._timeout, self._run("fetch", sql, args))
        except Exception:
            await self._discard()
            raise
        return rows

    async def _run(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        pool = await self._pool()
        return await getattr(pool, method)(sql, *args)

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
        # One round trip: statements sent together (without parameters) run as one
        # transaction, so the advisory lock is held until both tables exist.
        # CREATE TABLE IF NOT EXISTS is not safe against itself: two sessions running it at
        # once can both try to create the table's row type. The lock serializes them. The
        # tasks table came with run records: an older database gets it here, its claims
        # table untouched. (The names are checked identifiers: safe to put in a literal.)
        async with pool.acquire() as conn:
            await conn.execute(
                f"SELECT pg_advisory_xact_lock(hashtext('{self._table}'));"
                f"CREATE TABLE IF NOT EXISTS {self._table} ("
                " task text NOT NULL,"
                " tick bigint NOT NULL,"
                " owner text NOT NULL,"
                " expires_at timestamptz NOT NULL,"
                " PRIMARY KEY (task, tick));"
                f"CREATE TABLE IF NOT EXISTS {self._tasks} ("
                " task text PRIMARY KEY,"
                " claimed_tick bigint, claimed_at timestamptz, claimed_by text,"
                " ok_tick bigint, ok_at timestamptz, ok_by text, ok_duration float8,"
                " ok_error text,"
                " failed_tick bigint, failed_at timestamptz, failed_by text,"
                " failed_duration float8, failed_error text);"
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
