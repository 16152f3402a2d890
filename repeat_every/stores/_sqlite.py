"""The embedded claim store: one SQLite file shared by every process on one host."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from typing import TYPE_CHECKING

from ._common import PerLoop, check_claim, check_seconds, check_table, owner, require

if TYPE_CHECKING:
    import sqlite3
    from types import TracebackType

log = logging.getLogger("repeat_every")


class SQLiteClaimStore:
    """Claims in a SQLite file: once per tick across the worker processes of one host.

    No server to run: every process that opens the same ``path`` (``uvicorn --workers 4``,
    several services on one machine) shares the claims. It is the store to pick when all the
    workers run on one host; for several hosts use [`RedisClaimStore`][] or
    [`PostgresClaimStore`][] (a SQLite file on a network file system is not safe: its
    locks are not reliable there).

    Users may rely on:

    - **One winner.** A claim is a single ``INSERT … ON CONFLICT … DO UPDATE … WHERE
      expired`` statement, which SQLite runs under its write lock: of all the processes and
      coroutines claiming ``(task, tick)``, exactly one gets ``True`` until the claim expires.
    - **Expiry.** A claim lasts ``ttl`` seconds on this host's wall clock (``time.time()``,
      so freezegun or time-machine move it too); after that the tick can be claimed again.
      Expired claims are deleted at most every ``cleanup_interval`` seconds, so the file
      stays small.
    - **The event loop never blocks.** The file is opened and written in one worker thread
      of the store's own. ``sqlite3`` is imported when the store is made
      (``import repeat_every.stores`` alone does not import it).
    - **Lazy and self-healing.** Nothing is opened until the first claim. Any error (the file
      cannot be opened, the disk is full, the lock was held longer than ``timeout``) is raised
      from `claim`, which the task treats as "store unreachable" (see
      ``on_store_error``); the connection is then reopened on the next claim, so claims resume
      when the problem goes away.
    - **Closing.** Each event loop that uses the store gets its own connection and thread,
      closed when that loop ends (see [`RedisClaimStore`][] for how) or by `aclose`
      (or ``async with store:``); a later claim opens them again.

    The file uses write-ahead logging (``journal_mode=WAL``) so readers never wait for the
    writer, and ``synchronous=NORMAL``: a power cut may lose the last claims, which matters
    only for ticks that are long past when the machine is back.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "repeat_every_claims",
        timeout: float = 5.0,
        cleanup_interval: float = 60.0,
    ) -> None:
        """Keep claims in the SQLite file ``path`` (created if missing; its folder must exist).

        ``table``: the table's name (created if missing). ``timeout``: seconds a claim may
        wait for another process's write lock before it fails. ``cleanup_interval``: seconds
        between two deletions of expired claims by this store (0: after every claim).
        """
        fspath: object = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if not isinstance(fspath, str):
            raise TypeError(f"path must be a file path (str or os.PathLike[str]), not {path!r}")
        self._path = fspath
        if self._path in ("", ":memory:") or self._path.startswith("file::memory:"):
            raise ValueError(
                "path must be a file that every worker process opens (an in-memory database "
                "belongs to one connection): e.g. SQLiteClaimStore('/var/run/myapp/claims.db')"
            )
        self._table = check_table(table)
        self._timeout = check_seconds(timeout, "timeout")
        self._cleanup_interval = check_seconds(
            cleanup_interval, "cleanup_interval", allow_zero=True
        )
        require("sqlite3", "", "SQLiteClaimStore")
        self._files: PerLoop[_File] = PerLoop(self._open, _close, _abandon)

    @property
    def path(self) -> str:
        """The SQLite file."""
        return self._path

    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        """Claim ``(task, tick)`` for ``ttl`` seconds; ``True`` if this caller won it.

        Raises whatever SQLite raised when the file cannot be used.
        """
        check_claim(task, tick, ttl)
        file = await self._files.get()
        return await asyncio.get_running_loop().run_in_executor(
            file.thread, self._claim_in_thread, file, task, tick, float(ttl), owner()
        )

    async def aclose(self) -> None:
        """Close the file and end the store's thread (a later claim opens them again).

        Closes what the running event loop uses; what other loops used is closed when they
        end.
        """
        await self._files.aclose()

    async def __aenter__(self) -> SQLiteClaimStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r}, table={self._table!r})"

    # -- in the store's thread ----------------------------------------------------------------

    async def _open(self) -> _File:
        return _File()  # the connection itself is opened in the thread, by the first claim

    def _connect(self, file: _File) -> sqlite3.Connection:
        import sqlite3

        deadline = time.monotonic() + self._timeout
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            while True:
                try:
                    self._prepare(conn)
                    break
                except sqlite3.OperationalError as exc:
                    # Switching a new file to WAL takes a lock that SQLite does not wait for
                    # (no busy handler): a worker starting at the same moment as another gets
                    # "database is locked" at once. Try again until the timeout.
                    if "locked" not in str(exc) or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.005)
        except BaseException:
            conn.close()
            raise
        file.conn = conn
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table} ("
            " task TEXT NOT NULL,"
            " tick INTEGER NOT NULL,"
            " owner TEXT NOT NULL,"
            " expires REAL NOT NULL,"
            " PRIMARY KEY (task, tick)"
            ") WITHOUT ROWID"
        )

    def _claim_in_thread(self, file: _File, task: str, tick: int, ttl: float, who: str) -> bool:
        try:
            conn = file.conn or self._connect(file)
            now = time.time()
            # One statement, so one write transaction: inserting a new claim, or taking over
            # an expired one, is atomic; a live claim makes it change nothing (rowcount 0).
            won = (
                conn.execute(
                    f"INSERT INTO {self._table} (task, tick, owner, expires) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (task, tick) DO UPDATE "
                    "SET owner = excluded.owner, expires = excluded.expires "
                    f"WHERE {self._table}.expires <= ?",
                    (task, tick, who, now + ttl, now),
                ).rowcount
                == 1
            )
        except BaseException:
            file.disconnect()  # reopened by the next claim
            raise
        if time.monotonic() - file.last_cleanup >= self._cleanup_interval:
            # Not part of the claim: a failure here is retried at the next interval and must
            # not turn a decided claim into a "store unreachable".
            file.last_cleanup = time.monotonic()
            try:
                conn.execute(f"DELETE FROM {self._table} WHERE expires <= ?", (now,))
            except Exception:
                log.debug("deleting expired claims from %s failed", self._path, exc_info=True)
        return won


class _File:
    """The store's connection for one event loop, and the one thread that uses it."""

    def __init__(self) -> None:
        self.thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="repeat_every-sqlite"
        )
        self.conn: sqlite3.Connection | None = None  # touched only in self.thread
        self.last_cleanup = -float("inf")  # time.monotonic() of the last cleanup

    def disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing after an error: the error is what matters
                log.debug("closing the SQLite claim store failed", exc_info=True)


async def _close(file: _File) -> None:
    try:
        await asyncio.get_running_loop().run_in_executor(file.thread, file.disconnect)
    finally:
        file.thread.shutdown(wait=False)


def _abandon(file: _File) -> None:  # pragma: no cover - the SQLite store never discards
    file.thread.submit(file.disconnect)
    file.thread.shutdown(wait=False)
