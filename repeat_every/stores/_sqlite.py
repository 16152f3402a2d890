"""The embedded claim store: one SQLite file shared by every process on one host."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._common import (
    STATUS_COLUMNS,
    PerLoop,
    TaskStatus,
    check_claim,
    check_run,
    check_seconds,
    check_table,
    check_task_name,
    error_text,
    owner,
    require,
    status_from_row,
)

if TYPE_CHECKING:
    import sqlite3
    from types import TracebackType

log = logging.getLogger("repeat_every")

T = TypeVar("T")
Op = Callable[["sqlite3.Connection"], Any]

_CHECKPOINT_EVERY = 500  # write transactions on the event loop's thread between checkpoints


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
    - **No late winner, given the deadline.** With ``deadline=`` (the tick's due instant), the
      claim lives until ``deadline + ttl`` and a claim made at or after that instant loses
      without touching the file: a worker however late (a stalled event loop, jitter, a slow
      disk) can never win a tick another worker claimed. Without it, a claim lives ``ttl``
      seconds from the moment it is made.
    - **Expiry.** Measured on this host's wall clock (``time.time()``, so freezegun or
      time-machine move it too). Expired claims are deleted at most every
      ``cleanup_interval`` seconds, so the file stays small.
    - **Run records.** A won claim also notes the task's last claimed tick; `record_run`
      notes its last success or failure; `status` and `statuses` read them
      (table ``<table>_tasks``, one row per task, never expired).
    - **The event loop never waits.** A claim runs on the event loop's thread only when SQLite
      can do it at once (its busy timeout is 0 there, and WAL checkpoints are left to the
      store's thread); if another process holds the write lock, or the file is being opened,
      the claim goes to the store's own thread, which waits up to ``timeout`` and runs every
      claim queued meanwhile in one transaction. ``sqlite3`` is imported when the store is
      made (``import repeat_every.stores`` alone does not import it).
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

        ``table``: the claims table's name (created if missing; the run records go to
        ``<table>_tasks``). ``timeout``: seconds a claim may wait for another process's write
        lock before it fails. ``cleanup_interval``: seconds between two deletions of expired
        claims by this store (0: after every claim).
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
        self._tasks = f"{self._table}_tasks"
        self._timeout = check_seconds(timeout, "timeout")
        self._cleanup_interval = check_seconds(
            cleanup_interval, "cleanup_interval", allow_zero=True
        )
        require("sqlite3", "", "SQLiteClaimStore")
        self._files: PerLoop[_File] = PerLoop(self._open, _close, _abandon)
        t, s = self._table, self._tasks
        self._claim_sql = (
            f"INSERT INTO {t} (task, tick, owner, expires) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (task, tick) DO UPDATE "
            "SET owner = excluded.owner, expires = excluded.expires "
            f"WHERE {t}.expires <= ?"
        )
        self._note_claim_sql = (
            f"INSERT INTO {s} (task, claimed_tick, claimed_at, claimed_by) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (task) DO UPDATE SET claimed_tick = excluded.claimed_tick, "
            "claimed_at = excluded.claimed_at, claimed_by = excluded.claimed_by "
            f"WHERE {s}.claimed_tick IS NULL OR {s}.claimed_tick <= excluded.claimed_tick"
        )
        self._note_run_sql = {
            ok: f"INSERT INTO {s} (task, {p}_tick, {p}_at, {p}_by, {p}_duration, {p}_error) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (task) DO UPDATE SET "
            f"{p}_tick = excluded.{p}_tick, {p}_at = excluded.{p}_at, "
            f"{p}_by = excluded.{p}_by, {p}_duration = excluded.{p}_duration, "
            f"{p}_error = excluded.{p}_error "
            f"WHERE {s}.{p}_at IS NULL OR {s}.{p}_at <= excluded.{p}_at"
            for ok, p in ((True, "ok"), (False, "failed"))
        }
        self._status_sql = f"SELECT {', '.join(STATUS_COLUMNS)} FROM {s}"
        self._last_tick_sql = f"SELECT claimed_tick FROM {s} WHERE task = ?"

    @property
    def path(self) -> str:
        """The SQLite file."""
        return self._path

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

        Without ``deadline`` the claim lives ``ttl`` seconds from now. With ``deadline`` (the
        tick's due instant, seconds since the Unix epoch) it lives until ``deadline + ttl``,
        and a claim made at or after that instant loses.
        With ``if_newest=True`` the claim also loses if the store's run records show that a
        worker claimed this tick or a later one of ``task``, at any time (for a catch-up run
        of a tick missed while every worker was down: once across the fleet, even after the
        tick's own claims expired).

        Raises whatever SQLite raised when the file cannot be used.
        """
        seconds = check_claim(task, tick, ttl, deadline)
        if deadline is not None and time.time() >= deadline + seconds:
            return False  # too late (checked again when the claim runs)
        who = owner()

        def op(conn: sqlite3.Connection) -> bool:
            now = time.time()
            expires = now + seconds if deadline is None else deadline + seconds
            if now >= expires:
                return False  # too late: the winner's claim may be gone; never win it again
            if if_newest:
                row = conn.execute(self._last_tick_sql, (task,)).fetchone()
                if row is not None and row[0] is not None and row[0] >= tick:
                    return False
            # One statement decides: inserting a new claim, or taking over an expired one, is
            # atomic under SQLite's write lock; a live claim makes it change nothing.
            if conn.execute(self._claim_sql, (task, tick, who, expires, now)).rowcount != 1:
                return False
            conn.execute(self._note_claim_sql, (task, tick, now, who))
            return True

        return bool(await self._do(op, write=True))

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
        """
        check_run(task, tick, started_at, duration)
        text = error_text(error)
        row = (task, tick, float(started_at), worker or owner(), float(duration), text)
        sql = self._note_run_sql[text is None]
        await self._do(lambda conn: conn.execute(sql, row), write=True)

    async def status(self, task: str) -> TaskStatus:
        """What the store remembers of ``task`` (all ``None`` for a task it never saw)."""
        check_task_name(task)
        sql = f"{self._status_sql} WHERE task = ?"
        rows = await self._do(lambda conn: conn.execute(sql, (task,)).fetchall(), write=False)
        return status_from_row(rows[0]) if rows else TaskStatus(task)

    async def statuses(self) -> list[TaskStatus]:
        """What the store remembers of every task, by name."""
        sql = f"{self._status_sql} ORDER BY task"
        rows = await self._do(lambda conn: conn.execute(sql).fetchall(), write=False)
        return [status_from_row(row) for row in rows]

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

    # -- where each operation runs ------------------------------------------------------------

    async def _do(self, op: Op, *, write: bool) -> Any:
        """Run ``op(connection)`` on the event loop's thread if SQLite can do it without
        waiting, else in the store's thread (batched with the operations queued there).

        Writes that other tasks make in the same turn of the event loop as an earlier one (a
        thousand tasks due at the same instant) share one transaction, at the end of that turn.
        """
        file = await self._files.get()
        if not self._inline_ok(file):
            return await file.submit(self, op)
        if write and file.burst is not None and file.burst is not asyncio.current_task():
            job = _Job(op, asyncio.get_running_loop())
            file.pending.append(job)
            if len(file.pending) == 1:
                job.loop.call_soon(self._flush, file)
            return await job.future
        try:
            [result] = self._inline(file, [op], write=write)
        except _Busy:
            return await file.submit(self, op)
        if write and file.burst is None:
            file.burst = asyncio.current_task()
            asyncio.get_running_loop().call_soon(file.end_burst)
        return result

    def _inline_ok(self, file: _File) -> bool:
        """Whether the event loop's thread may use the connection now: it is open, the
        store's thread is idle (so the connection is ours), and no cleanup is due."""
        return file.conn is not None and not file.busy and not self._cleanup_due(file)

    def _inline(self, file: _File, ops: list[Op], *, write: bool) -> list[Any]:
        """Run ``ops`` on the event loop's thread, in one transaction if they write.

        The connection's busy timeout is 0 here: a lock held by another process raises
        `_Busy` at once (nothing done) instead of blocking the event loop.
        """
        import sqlite3

        conn = file.conn
        assert conn is not None
        try:
            if not write:
                return [op(conn) for op in ops]
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = [op(conn) for op in ops]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                raise _Busy from exc
            file.disconnect()  # reopened by the next operation, in the store's thread
            raise
        except BaseException:
            file.disconnect()
            raise
        file.writes += 1
        if file.writes >= _CHECKPOINT_EVERY:
            file.checkpoint(self)
        return results

    def _flush(self, file: _File) -> None:
        """At the end of a turn of the event loop: the writes queued during it, together."""
        batch, file.pending = file.pending, []
        if self._inline_ok(file):
            try:
                results = self._inline(file, [job.op for job in batch], write=True)
            except _Busy:
                pass
            except BaseException as exc:
                for job in batch:
                    _settle(job.future, None, exc)
                return
            else:
                for job, result in zip(batch, results, strict=True):
                    _settle(job.future, result, None)
                return
        file.enqueue(self, batch)

    def _cleanup_due(self, file: _File) -> bool:
        return time.monotonic() - file.last_cleanup >= self._cleanup_interval

    # -- in the store's thread ----------------------------------------------------------------

    async def _open(self) -> _File:
        return _File()  # the connection itself is opened in the thread, by the first claim

    def _connect(self, file: _File) -> sqlite3.Connection:
        import sqlite3

        deadline = time.monotonic() + self._timeout
        conn = sqlite3.connect(
            self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
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
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the store's thread checkpoints
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table} ("
            " task TEXT NOT NULL,"
            " tick INTEGER NOT NULL,"
            " owner TEXT NOT NULL,"
            " expires REAL NOT NULL,"
            " PRIMARY KEY (task, tick)"
            ") WITHOUT ROWID"
        )
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._tasks} ("
            " task TEXT PRIMARY KEY,"
            " claimed_tick INTEGER, claimed_at REAL, claimed_by TEXT,"
            " ok_tick INTEGER, ok_at REAL, ok_by TEXT, ok_duration REAL, ok_error TEXT,"
            " failed_tick INTEGER, failed_at REAL, failed_by TEXT, failed_duration REAL,"
            " failed_error TEXT"
            ")"
        )

    def _run_batch(self, file: _File, batch: list[_Job]) -> list[tuple[Any, BaseException | None]]:
        """Run queued operations in one transaction, then the cleanup if it is due: each
        job's result, or the error that failed them all."""
        try:
            conn = file.conn or self._connect(file)
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    results = [job.op(conn) for job in batch]
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                conn.execute("PRAGMA busy_timeout = 0")
        except BaseException as exc:
            file.disconnect()  # reopened by the next operation
            return [(None, exc)] * len(batch)
        if self._cleanup_due(file):
            file.last_cleanup = time.monotonic()
            self._maintain(file, cleanup=True)
        return [(result, None) for result in results]

    def _maintain(self, file: _File, *, cleanup: bool) -> None:
        """Delete expired claims and checkpoint the WAL: never part of a claim, so a failure
        here is only logged, and retried later."""
        conn = file.conn
        if conn is None:
            return
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            try:
                if cleanup:
                    conn.execute(f"DELETE FROM {self._table} WHERE expires <= ?", (time.time(),))
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                conn.execute("PRAGMA busy_timeout = 0")
        except Exception:
            log.debug("cleaning up the SQLite claim store %s failed", self._path, exc_info=True)


def _busy(exc: Exception) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class _Busy(Exception):
    """Another process holds SQLite's write lock: try again in the store's thread."""


class _Job:
    """An operation queued for the store's thread, and the future of the caller waiting for it."""

    __slots__ = ("future", "loop", "op")

    def __init__(self, op: Op, loop: asyncio.AbstractEventLoop) -> None:
        self.op = op
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def settle(self, result: Any, error: BaseException | None) -> None:
        """From the store's thread: hand the outcome to the waiting coroutine."""
        with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: nobody waits
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _File:
    """The store's connection for one event loop, and the one thread that shares it.

    The connection is used by the event loop's thread while ``busy`` is false, and by the
    store's thread while it is true: ``busy`` is set by the event loop before it hands work
    to the thread, and cleared by the thread, under ``lock``, once its queue is empty.
    """

    def __init__(self) -> None:
        self.thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="repeat_every-sqlite"
        )
        self.conn: sqlite3.Connection | None = None
        self.lock = threading.Lock()
        self.queue: list[_Job] = []  # waiting for the thread
        self.busy = False  # the thread owns the connection
        self.last_cleanup = -float("inf")  # time.monotonic() of the last cleanup
        self.writes = 0  # write transactions on the loop's thread since the last checkpoint
        # The task that wrote on the loop's thread during this turn of the loop: other tasks'
        # writes of the same turn (many tasks due at once) wait for one transaction at its end.
        self.burst: asyncio.Task[Any] | None = None
        self.pending: list[_Job] = []  # writes of this turn, for one transaction at its end

    async def submit(self, store: SQLiteClaimStore, op: Op) -> Any:
        """Queue ``op`` for the thread and wait for its result."""
        job = _Job(op, asyncio.get_running_loop())
        self.enqueue(store, [job])
        return await job.future

    def enqueue(self, store: SQLiteClaimStore, jobs: list[_Job]) -> None:
        """Hand ``jobs`` to the thread (which starts unless it is at work already)."""
        with self.lock:
            self.queue.extend(jobs)
            start = not self.busy
            self.busy = True
        if start:
            self.thread.submit(self._drain, store)

    def end_burst(self) -> None:
        self.burst = None

    def checkpoint(self, store: SQLiteClaimStore) -> None:
        """Checkpoint the WAL in the thread (the loop's thread never does); nobody waits."""
        with self.lock:
            if self.busy:
                return  # the thread is at work; the next write will ask again
            self.busy = True
        self.writes = 0
        self.thread.submit(self._drain, store, True)

    def _drain(self, store: SQLiteClaimStore, checkpoint: bool = False) -> None:
        if checkpoint:
            store._maintain(self, cleanup=False)
        with self.lock:
            batch, self.queue = self.queue, []
            if not batch:
                self.busy = False
                return
        while True:
            done, outcomes = batch, store._run_batch(self, batch)
            with self.lock:
                batch, self.queue = self.queue, []
                if not batch:
                    # Given back before the callers hear: once they resume, the event loop's
                    # thread may use the connection again.
                    self.busy = False
            for job, (result, error) in zip(done, outcomes, strict=True):
                job.settle(result, error)
            if not batch:
                return

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
