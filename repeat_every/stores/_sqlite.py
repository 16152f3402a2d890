"""The embedded claim store: one SQLite file shared by every process on one host."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._common import (
    STATUS_COLUMNS,
    PerLoop,
    TaskStatus,
    check_claim,
    check_claims,
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
# Claims and run records wait for their transaction as flat lists of their values (a claim:
# task, tick, ttl in seconds, deadline; a record: the 6 values of its statement's row): a
# thousand tasks due at once then allocate no tuple that the garbage collector must scan.
Flat = list[Any]
Outcome = tuple[list[bool], list[Any]]  # of a _Writes: each claim's result, each job's

_CHECKPOINT_EVERY = 500  # write transactions on the event loop's thread between checkpoints

_forks = 0  # forks since this process started: a child must not use its parent's file


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows, which never forks
    os.register_at_fork(after_in_child=_forked)


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
    - **The event loop never waits.** A write runs on the event loop's thread only when
      SQLite can do it at once (its busy timeout is 0 there, and WAL checkpoints are left to
      the store's thread); if another process holds the write lock, or the file is being
      opened, it goes to the store's own thread, which waits up to ``timeout`` and runs every
      write queued meanwhile in one transaction. ``sqlite3`` is imported when the store is
      made (``import repeat_every.stores`` alone does not import it).
    - **Writes of one turn share one transaction.** The first write of a turn of the event
      loop runs at once; the claims, run records and other writes that other tasks make
      during the same turn (a thousand tasks due at the same instant) are queued and written
      together at the end of that turn, and each claimer gets its own answer (or, if the
      transaction fails, the error, which its task treats as "store unreachable").
    - **Run records are written soon, and not waited for.** `record_run` writes its record
      at once when SQLite can; else it queues it and returns: a queued record is written at
      the end of the turn of the event loop in which it was made, with that turn's claims
      (later only if another process holds the write lock: then as soon as the store's
      thread gets it, within ``timeout``). `status`, `statuses` and `aclose` write the
      queued records first, so they always see them. A queued record whose transaction
      fails is logged at WARNING (``could not write the run records of …``, naming the
      tasks) and dropped, as the task loop does when `record_run` raises.
    - **Lazy and self-healing.** Nothing is opened until the first claim. Any error (the file
      cannot be opened, the disk is full, the lock was held longer than ``timeout``) is raised
      from `claim`, which the task treats as "store unreachable" (see
      ``on_store_error``); the connection is then reopened on the next claim, so claims resume
      when the problem goes away.
    - **Closing.** Each event loop that uses the store gets its own connection and thread,
      closed when that loop ends (see [`RedisClaimStore`][] for how) or by `aclose`
      (or ``async with store:``), after the writes still queued; a later claim opens them
      again.

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
        self._files: PerLoop[_File] = PerLoop(self._open, self._close, _abandon)
        # The file of the loop that used the store last, to find it without a coroutine call
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], int, _File] | None = None
        # (its loop, by weak reference, the process's fork generation, and the file)
        import sqlite3

        self._error = sqlite3.OperationalError
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
        if if_newest:
            return bool(await self._write(self._newest, [task, tick, seconds, deadline]))
        # No closure and no tuple here: what this coroutine holds while it waits for the
        # batch is what the garbage collector scans, a thousand times when a thousand wait.
        file = self._file_now() or await self._file()
        batch = self._joined(file)
        if batch is None:  # the first write of this turn: at once if SQLite answers at once
            if self._inline_ok(file):
                try:
                    [won] = self._inline(file, self._claims, [task, tick, seconds, deadline])
                except _Busy:
                    pass
                else:
                    self._burst(file)
                    return won
            batch = self._new_batch(file)
        return await batch.add_claim(task, tick, seconds, deadline)

    async def claim_many(self, claims: Sequence[tuple[str, int, float, float]]) -> list[bool]:
        """Claim several ticks in one transaction: each ``(task, tick, ttl, deadline)`` as
        ``claim(task, tick, ttl, deadline=deadline)`` claims it; whether each was won, in order.

        What the task loop calls when several tasks of this store are due at the same instant
        (one of them claims for all). The same ``(task, tick)`` twice: the first may win, the
        second loses. Every claim is checked before any reaches the file; raises whatever
        SQLite raised when the file cannot be used (no claim of the call is then won).

        The won claims are noted in the run records (`status`'s ``last_claim``) right after,
        in the transaction of the next writes (at the end of this turn of the event loop, with
        the run records of the tasks that ran meanwhile), not in the claims' own: the callers
        wait for the claims alone. A tick whose claim is live needs no note to stay claimed.
        """
        flat: Flat = []
        for item in check_claims(claims):
            flat += item
        if not flat:
            return []
        won, noted = await self._write(self._claims_unnoted, flat)
        if noted:
            file = self._file_now() or await self._file()
            (file.batch or self._new_batch(file)).notes.extend(noted)
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

        Writes the record at once when SQLite can take it at once; else (other writes of this
        turn of the event loop are queued already, as when many tasks end at once, or another
        process holds the write lock, or the store's thread is at work) queues it with them
        and returns without waiting: it is written at the end of this turn, or by the store's
        thread as soon as the lock allows (see the class's docstring). Only a record that
        must open the file (the store's first write, or the first after an error) waits, so
        that an unusable file is reported to the caller. Raises what SQLite raised for a
        record written or waited for; a queued record that cannot be written is logged.
        """
        check_run(task, tick, started_at, duration)
        text = None if error is None else error_text(error)
        row = (task, tick, float(started_at), worker or owner(), float(duration), text)
        ok = text is None
        file = self._file_now() or await self._file()
        batch = self._joined(file)
        if batch is None:  # the first write of this turn
            if self._inline_ok(file):
                try:
                    self._inline(file, self._records, row if ok else (), () if ok else row)
                except _Busy:
                    pass
                else:
                    self._burst(file)
                    return
            batch = self._new_batch(file)
            if file.conn is None and not file.busy:  # the file is to be opened: wait for it
                (batch.successes if ok else batch.failures).extend(row)
                batch.waited = task  # its failure is raised here, not logged as lost
                await batch.add_job(_nothing)  # resolved when the batch is written
                return
        (batch.successes if ok else batch.failures).extend(row)

    async def status(self, task: str) -> TaskStatus:
        """What the store remembers of ``task`` (all ``None`` for a task it never saw).

        Sees every run record this store was given, queued ones included.
        """
        check_task_name(task)
        sql = f"{self._status_sql} WHERE task = ?"
        rows = await self._read(lambda conn: conn.execute(sql, (task,)).fetchall())
        return status_from_row(rows[0]) if rows else TaskStatus(task)

    async def statuses(self) -> list[TaskStatus]:
        """What the store remembers of every task, by name (queued run records included)."""
        sql = f"{self._status_sql} ORDER BY task"
        rows = await self._read(lambda conn: conn.execute(sql).fetchall())
        return [status_from_row(row) for row in rows]

    async def flush(self) -> None:
        """Write what this event loop still queues (run records, notes of claims), and wait
        for the store's thread to be done with it: `run_tasks` and `lifespan` call it after
        stopping their tasks, so a shutdown loses none. Raises what SQLite raised."""
        file = self._files.current()
        if file is None:
            return  # this loop never used the store: nothing is queued
        if file.batch is not None:
            self._flush(file)
        if file.busy:
            await file.submit(self, _nothing)  # runs after what the thread has queued

    async def aclose(self) -> None:
        """Write what is queued, close the file and end the store's thread (a later claim
        opens them again).

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

    # -- the statements ------------------------------------------------------------------------

    def _claims(self, conn: sqlite3.Connection, claims: Flat) -> list[bool]:
        """Run ``claims`` (flat, inside a transaction): whether each was won; the won ones
        noted as their task's last claim."""
        won, noted = self._claims_unnoted(conn, claims)
        if noted:
            conn.executemany(self._note_claim_sql, noted)
        return won

    def _claims_unnoted(
        self, conn: sqlite3.Connection, claims: Flat
    ) -> tuple[list[bool], list[tuple[str, int, float, str]]]:
        """Run ``claims`` (flat, inside a transaction): whether each was won, and the notes
        of the won ones, for `_note_claim_sql`."""
        now = time.time()
        who = owner()
        execute, sql = conn.execute, self._claim_sql
        won: list[bool] = []
        noted: list[tuple[str, int, float, str]] = []
        values = iter(claims)
        for task, tick, seconds, deadline in zip(values, values, values, values, strict=True):
            expires = now + seconds if deadline is None else deadline + seconds
            # One statement decides: inserting a new claim, or taking over an expired one, is
            # atomic under SQLite's write lock; a live claim makes it change nothing. A claim
            # too late for its deadline never wins: the winner's claim may be gone.
            if now < expires and execute(sql, (task, tick, who, expires, now)).rowcount == 1:
                noted.append((task, tick, now, who))
                won.append(True)
            else:
                won.append(False)
        return won, noted

    def _newest(self, conn: sqlite3.Connection, claim: Flat) -> bool:
        """A claim that also loses if a tick as new as its own was ever claimed."""
        row = conn.execute(self._last_tick_sql, (claim[0],)).fetchone()
        if row is not None and row[0] is not None and row[0] >= claim[1]:
            return False
        return self._claims(conn, claim)[0]

    def _records(
        self, conn: sqlite3.Connection, successes: Sequence[Any], failures: Sequence[Any]
    ) -> None:
        """Write run records given flat (6 values each), inside a transaction."""
        for ok, flat in ((True, successes), (False, failures)):
            if flat:
                values = iter(flat)
                conn.executemany(self._note_run_sql[ok], zip(*[values] * 6, strict=True))

    def _apply(self, conn: sqlite3.Connection, writes: _Writes) -> Outcome:
        """Everything ``writes`` holds (inside a transaction): claims, operations, notes of
        claims made before, records."""
        won = self._claims(conn, writes.claims) if writes.claims else []
        done = [op(conn, *args) for op, args, _ in writes.jobs]
        if writes.notes:
            conn.executemany(self._note_claim_sql, writes.notes)
        if writes.successes or writes.failures:
            self._records(conn, writes.successes, writes.failures)
        return won, done

    def _apply_all(self, conn: sqlite3.Connection, batch: list[_Writes]) -> list[Outcome]:
        return [self._apply(conn, writes) for writes in batch]

    def _lost(self, writes: list[_Writes], error: BaseException) -> None:
        """Queued run records whose transaction failed: nobody waits for them, so say so
        (the record whose caller waits gets the error instead)."""
        tasks = sorted(
            {
                name
                for w in writes
                for name in (*w.successes[::6], *w.failures[::6], *(n[0] for n in w.notes))
            }
            - {w.waited for w in writes}
        )
        if tasks:
            shown = ", ".join(tasks[:5]) + (f" and {len(tasks) - 5} more" if len(tasks) > 5 else "")
            log.warning(
                "could not write the run records of %s to the SQLite claim store %s: %s",
                shown,
                self._path,
                error_text(error),
                exc_info=error,
            )

    # -- where each operation runs ------------------------------------------------------------

    def _file_now(self) -> _File | None:
        """The running loop's file if it used the store last (the common case), else None."""
        last = self._last
        if last is not None and last[1] == _forks and last[0]() is asyncio.get_running_loop():
            return last[2]
        return None

    async def _file(self) -> _File:
        file = await self._files.get()
        self._last = (weakref.ref(asyncio.get_running_loop()), _forks, file)
        return file

    def _joined(self, file: _File) -> _Writes | None:
        """The batch a write of the running task joins (made now if needed), written at the
        end of this turn of the loop; ``None`` if the write goes first (the first write of
        this turn, or another one of the same task): at once if it can."""
        if file.batch is not None:
            return file.batch
        if file.burst is not None and file.burst is not asyncio.current_task():
            return self._new_batch(file)
        return None

    def _new_batch(self, file: _File) -> _Writes:
        batch = file.batch = _Writes(file.loop)
        file.loop.call_soon(self._flush, file)
        return batch

    def _burst(self, file: _File) -> None:
        """A write ran at once: other tasks' writes of this turn now wait for its end."""
        if file.burst is None:
            file.burst = asyncio.current_task()
            file.loop.call_soon(file.end_burst)

    async def _write(self, op: Callable[..., T], *args: Any) -> T:
        """Run the write ``op(connection, *args)`` as `claim` runs a claim; its result."""
        file = self._file_now() or await self._file()
        batch = self._joined(file)
        if batch is None:
            if self._inline_ok(file):
                try:
                    result = self._inline(file, op, *args)
                except _Busy:
                    pass
                else:
                    self._burst(file)
                    return result
            batch = self._new_batch(file)
        return cast("T", await batch.add_job(op, *args))

    async def _read(self, op: Op) -> Any:
        """Run the read ``op(connection)`` after the writes queued so far."""
        file = self._file_now() or await self._file()
        if file.batch is not None:
            self._flush(file)  # this turn's writes first: a status shows the records given
        if self._inline_ok(file):
            conn = file.conn
            assert conn is not None
            try:
                return op(conn)
            except self._error as exc:
                if not _busy(exc):
                    file.disconnect()  # reopened by the next operation, in the store's thread
                    raise
            except BaseException:
                file.disconnect()
                raise
        return await file.submit(self, op)

    def _inline_ok(self, file: _File) -> bool:
        """Whether the event loop's thread may use the connection now: it is open, the
        store's thread is idle (so the connection is ours), and no cleanup is due."""
        return file.conn is not None and not file.busy and not self._cleanup_due(file)

    def _inline(self, file: _File, work: Callable[..., T], *args: Any) -> T:
        """Run ``work(connection, *args)`` on the event loop's thread, in one write
        transaction.

        The connection's busy timeout is 0 here: a lock held by another process raises
        `_Busy` at once (nothing done) instead of blocking the event loop.
        """
        conn = file.conn
        assert conn is not None
        try:
            result = _transaction(conn, work, *args)
        except self._error as exc:
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
        return result

    def _flush(self, file: _File) -> None:
        """At the end of a turn of the event loop (or before a read, or at close): the writes
        queued during it, in one transaction."""
        writes, file.batch = file.batch, None
        if writes is None:
            return  # written already, by a read or at close
        if self._inline_ok(file):
            try:
                outcome = self._inline(file, self._apply, writes)
            except _Busy:
                pass
            except BaseException as exc:
                writes.settle(None, exc)
                self._lost([writes], exc)
                return
            else:
                writes.settle(outcome, None)
                return
        file.enqueue(self, writes)

    def _cleanup_due(self, file: _File) -> bool:
        return time.monotonic() - file.last_cleanup >= self._cleanup_interval

    # -- in the store's thread ----------------------------------------------------------------

    async def _open(self) -> _File:
        # The connection itself is opened in the thread, by the first operation.
        return _File(asyncio.get_running_loop())

    async def _close(self, file: _File) -> None:
        if self._last is not None and self._last[2] is file:
            self._last = None
        self._flush(file)  # what is queued goes to the thread (or is written) before the end
        try:
            await file.loop.run_in_executor(file.thread, file.disconnect)
        finally:
            file.thread.shutdown(wait=False)

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

    def _run_batch(self, file: _File, batch: list[_Writes]) -> list[Outcome] | BaseException:
        """Run queued writes in one transaction, then the cleanup if it is due: each one's
        outcome, or the error that failed them all."""
        try:
            conn = file.conn or self._connect(file)
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            try:
                outcomes = _transaction(conn, self._apply_all, batch)
            finally:
                conn.execute("PRAGMA busy_timeout = 0")
        except BaseException as exc:
            file.disconnect()  # reopened by the next operation
            self._lost(batch, exc)
            return exc
        if self._cleanup_due(file):
            file.last_cleanup = time.monotonic()
            self._maintain(file, cleanup=True)
        return outcomes

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


def _nothing(conn: sqlite3.Connection) -> None:
    """A job that writes nothing: its future tells when the rest of its batch is written."""


def _transaction(conn: sqlite3.Connection, work: Callable[..., T], *args: Any) -> T:
    """``work(conn, *args)`` inside ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back if it
    raises)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _busy(exc: Exception) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class _Busy(Exception):
    """Another process holds SQLite's write lock: try again in the store's thread."""


class _Writes:
    """Writes for one transaction, and the futures of the callers waiting for them.

    Claims and operations (``jobs``) each have a future that their caller awaits; run records
    have none (`SQLiteClaimStore.record_run` does not wait).
    """

    __slots__ = ("claims", "failures", "futures", "jobs", "loop", "notes", "successes", "waited")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.claims: Flat = []  # 4 values per claim
        self.futures: list[asyncio.Future[bool]] = []  # one per claim, in the same order
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self.successes: Flat = []  # run records, 6 values each
        self.failures: Flat = []
        self.notes: list[tuple[str, int, float, str]] = []  # claims won before (claim_many)
        self.waited: str | None = None  # the task whose record's caller waits for the batch

    def add_claim(
        self, task: str, tick: int, seconds: float, deadline: float | None
    ) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = self.loop.create_future()
        self.claims += (task, tick, seconds, deadline)
        self.futures.append(future)
        return future

    def add_job(self, op: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue ``op(connection, *args)``."""
        future: asyncio.Future[Any] = self.loop.create_future()
        self.jobs.append((op, args, future))
        return future

    @property
    def waited_for(self) -> bool:
        return bool(self.futures or self.jobs)

    def settle(self, outcome: Outcome | None, error: BaseException | None) -> None:
        """In the event loop: hand each waiting caller its result, or the error."""
        if outcome is not None:
            won, done = outcome
            for future, result in zip(self.futures, won, strict=True):
                if not future.cancelled():
                    future.set_result(result)
            for (_, _, job), result in zip(self.jobs, done, strict=True):
                if not job.cancelled():
                    job.set_result(result)
            return
        assert error is not None
        for future in (*self.futures, *(job for _, _, job in self.jobs)):
            if not future.cancelled():
                future.set_exception(error)

    def settle_threadsafe(self, outcome: Outcome | None, error: BaseException | None) -> None:
        """From the store's thread: `settle` in the event loop, if anybody waits."""
        if self.waited_for:
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: nobody waits
                self.loop.call_soon_threadsafe(self.settle, outcome, error)


class _File:
    """The store's connection for one event loop, and the one thread that shares it.

    The connection is used by the event loop's thread while ``busy`` is false, and by the
    store's thread while it is true: ``busy`` is set by the event loop before it hands work
    to the thread, and cleared by the thread, under ``lock``, once its queue is empty.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="repeat_every-sqlite"
        )
        self.conn: sqlite3.Connection | None = None
        self.lock = threading.Lock()
        self.queue: list[_Writes] = []  # waiting for the thread
        self.busy = False  # the thread owns the connection
        self.last_cleanup = -float("inf")  # time.monotonic() of the last cleanup
        self.writes = 0  # write transactions on the loop's thread since the last checkpoint
        # The task that wrote on the loop's thread during this turn of the loop: other tasks'
        # writes of the same turn (many tasks due at once) wait for one transaction at its end.
        self.burst: asyncio.Task[Any] | None = None
        self.batch: _Writes | None = None  # writes of this turn, for one transaction at its end

    async def submit(self, store: SQLiteClaimStore, op: Op) -> Any:
        """Queue ``op`` for the thread and wait for its result."""
        writes = _Writes(self.loop)
        future = writes.add_job(op)
        self.enqueue(store, writes)
        return await future

    def enqueue(self, store: SQLiteClaimStore, writes: _Writes) -> None:
        """Hand ``writes`` to the thread (which starts unless it is at work already)."""
        with self.lock:
            self.queue.append(writes)
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
            if isinstance(outcomes, BaseException):
                for writes in done:
                    writes.settle_threadsafe(None, outcomes)
            else:
                for writes, outcome in zip(done, outcomes, strict=True):
                    writes.settle_threadsafe(outcome, None)
            if not batch:
                return

    def disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing after an error: the error is what matters
                log.debug("closing the SQLite claim store failed", exc_info=True)


def _abandon(file: _File) -> None:  # pragma: no cover - the SQLite store never discards
    file.thread.submit(file.disconnect)
    file.thread.shutdown(wait=False)
