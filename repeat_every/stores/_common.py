"""What the claim stores share: who claims, argument checks, run records, the loop a client
belongs to."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import logging
import math
import os
import re
import socket
import sys
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")


if sys.version_info >= (3, 11):

    async def within(seconds: float, coro: Awaitable[T]) -> T:
        """``await coro``, cancelled with ``TimeoutError`` after ``seconds``."""
        async with asyncio.timeout(seconds):  # no extra task, unlike wait_for before 3.12
            return await coro

else:  # pragma: no cover - Python 3.10

    async def within(seconds: float, coro: Awaitable[T]) -> T:
        """``await coro``, cancelled with ``TimeoutError`` after ``seconds``."""
        return await asyncio.wait_for(coro, seconds)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_owner: str | None = None  # "host:pid" of this process, made on first use, forgotten at fork


def owner() -> str:
    """``host:pid`` of the caller: written beside each claim, to see who ran a tick.

    Made on first use (not at import) and made again in a forked child, which has its own pid.
    """
    global _owner
    if _owner is None:
        _owner = f"{socket.gethostname()}:{os.getpid()}"
    return _owner


def _forgotten_at_fork() -> None:
    global _owner
    _owner = None


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows, which never forks
    os.register_at_fork(after_in_child=_forgotten_at_fork)


def require(module: str, extra: str, store: str) -> None:
    """Import a store's driver now, when the store is made, rather than at its first claim.

    Importing a driver takes a tenth of a second or more: done during the first claim, it
    would make every worker that starts at the same moment late for the same tick. A missing
    driver is also better reported when the store is made.
    """
    try:
        importlib.import_module(module)
    except ImportError as exc:
        hint = f": pip install 'repeat-every[{extra}]'" if extra else ""
        raise ImportError(f"{store} needs the {module} module{hint} ({exc})") from exc


def check_table(table: object) -> str:
    """A table name (optionally ``schema.table``) that is safe to put in SQL unquoted."""
    if not isinstance(table, str) or not all(
        _IDENTIFIER.fullmatch(part) for part in table.split(".", 1)
    ):
        raise ValueError(
            "table must be a plain SQL name (letters, digits, underscores; optionally "
            f"schema.table), got {table!r}"
        )
    return table


def check_seconds(value: object, argument: str, *, allow_zero: bool = False) -> float:
    """A finite number of seconds, > 0 (or ≥ 0), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{argument} must be finite and {bound} seconds, got {value!r}")
    return seconds


MAX_TASK_NAME_BYTES = 1000
"""The longest task name every store accepts, in bytes of UTF-8.

PostgreSQL refuses an index entry longer than about 2.7 kB (a third of a page), so the claims
table's primary key ``(task, tick)`` caps a name there; 1,000 bytes leaves room for the tick
and any future column, and is far beyond a module path and function name.
"""

MAX_ERROR_CHARS = 2000
"""A run record keeps the first this many characters of the failure's text."""

_TICK_MIN, _TICK_MAX = -(2**63), 2**63 - 1
# Unicode's control characters (category Cc) and surrogates (Cs): what check_task_name refuses.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_good_names: set[str] = set()  # a SQL bigint, as the SQL stores keep it


def check_task_name(name: object, argument: str = "task") -> str:
    """``name`` if every claim store accepts it as a task name; else a ``ValueError``/``TypeError``.

    A task name is a non-empty ``str`` of at most `MAX_TASK_NAME_BYTES` bytes of UTF-8,
    without control characters (a NUL cannot be stored in PostgreSQL; a newline or an escape
    sequence would split or forge log lines) and without lone surrogates (not encodable).
    ``argument`` names the argument in the message (``name`` at decoration).
    """
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a string, got {name!r}")
    if name in _good_names:
        return name
    if not name:
        raise ValueError(f"{argument} must not be empty")
    if found := _UNSAFE.search(name):
        bad = found.group()
        raise ValueError(
            f"{argument} must not contain control characters (newline, NUL, escape…) or lone "
            f"surrogates: found {bad!r} in {name[:80]!r}; use a name like 'reports.send_digest'"
        )
    size = len(name.encode("utf-8"))
    if size > MAX_TASK_NAME_BYTES:
        raise ValueError(
            f"{argument} must be at most {MAX_TASK_NAME_BYTES} bytes of UTF-8 (the claim stores' "
            f"limit), got {size}: {name[:40]!r}…"
        )
    if len(_good_names) < 10_000:  # a task claims with the same name every tick
        _good_names.add(name)
    return name


def check_tick(tick: object) -> int:
    """A tick key: an ``int`` that fits a SQL ``bigint``."""
    if isinstance(tick, bool) or not isinstance(tick, int):
        raise TypeError(f"tick must be an int, got {tick!r}")
    if not _TICK_MIN <= tick <= _TICK_MAX:
        raise ValueError(f"tick must fit in 64 bits, got {tick!r}")
    return tick


def check_claim(task: object, tick: object, ttl: object, deadline: object = None) -> float:
    """Refuse a malformed claim before it reaches the store (a bug, not an outage).

    Returns the ttl as a float.
    """
    if (  # what the task loop passes, every tick: checked without a call
        type(task) is str
        and task in _good_names
        and type(tick) is int
        and _TICK_MIN <= tick <= _TICK_MAX
        and type(ttl) is float
        and 0.0 < ttl < math.inf
        and (deadline is None or (type(deadline) is float and -math.inf < deadline < math.inf))
    ):
        return ttl
    check_task_name(task)
    check_tick(tick)
    seconds = check_seconds(ttl, "ttl")
    if deadline is not None:
        check_instant(deadline, "deadline")
    return seconds


Checked = tuple[str, int, float, float | None]
"""A ``claim_many`` item once checked: task, tick, ttl in seconds, deadline (or ``None``)."""


def check_claims(claims: object) -> list[Checked]:
    """The items of a ``claim_many`` call, each checked as ``claim`` checks its arguments.

    Refuses a malformed item with the error ``claim`` would raise, its message prefixed by the
    item's place (``claims[3]: ttl must be finite and > 0 seconds, got 0``), before any item
    reaches a store.
    """
    if isinstance(claims, (str, bytes)) or not isinstance(claims, Sequence):
        raise TypeError(
            "claims must be a list of (task, tick, ttl, deadline) tuples, got "
            f"{type(claims).__name__}"
        )
    items: list[Checked] = []
    for i, item in enumerate(claims):
        if not isinstance(item, (tuple, list)) or len(item) != 4:
            raise TypeError(
                f"claims[{i}] must be a (task, tick, ttl, deadline) tuple, got {item!r:.200}"
            )
        task, tick, ttl, deadline = item
        try:
            seconds = check_claim(task, tick, ttl, deadline)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"claims[{i}]: {exc}") from None
        items.append((task, tick, seconds, None if deadline is None else float(deadline)))
    return items


def check_instant(value: object, argument: str) -> float:
    """A finite wall-clock instant in seconds since the Unix epoch, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be seconds since the Unix epoch, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{argument} must be finite, got {value!r}")
    return float(value)


def check_run(task: object, tick: object, started_at: object, duration: object) -> None:
    """Refuse a malformed run record before it reaches the store."""
    if (  # what the task loop passes after every run: checked without a call
        type(task) is str
        and task in _good_names
        and type(tick) is int
        and _TICK_MIN <= tick <= _TICK_MAX
        and type(started_at) is float
        and -math.inf < started_at < math.inf
        and type(duration) is float
        and 0.0 <= duration < math.inf
    ):
        return
    check_task_name(task)
    check_tick(tick)
    check_instant(started_at, "started_at")
    check_seconds(duration, "duration", allow_zero=True)


def error_text(error: object) -> str | None:
    """What a run record keeps of a failure: ``None`` for a success, else its text, capped."""
    if error is None:
        return None
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return text[:MAX_ERROR_CHARS]


def redact_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` parameter) as ``***``.

    For reprs and log lines: ``redis://:s3cret@host/0`` → ``redis://:***@host/0``. A libpq
    keyword string (``host=… password=…``) is redacted too.
    """
    text = re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&;]*)", r"\1***", url)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
    except ValueError:  # not a URL: nothing more to hide than the keywords above
        return text
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    return text


def utc(seconds: float) -> dt.datetime:
    """A Unix instant as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


@dataclass(frozen=True)
class LastClaim:
    """The last tick of a task that a worker won in the store."""

    tick: int
    """The tick's key (what the task passed to ``claim``)."""
    at: dt.datetime
    """When it was won, on the winner's wall clock (UTC)."""
    worker: str
    """``host:pid`` of the winner."""


@dataclass(frozen=True)
class LastRun:
    """A run a worker recorded with ``record_run``: the last success, or the last failure."""

    tick: int
    """The tick the run belonged to."""
    started_at: dt.datetime
    """When it started, on the worker's wall clock (UTC)."""
    worker: str
    """``host:pid`` of the worker that ran it."""
    duration: float
    """Seconds it took."""
    error: str | None
    """The failure's text (first ``MAX_ERROR_CHARS`` characters); ``None`` for a success."""


@dataclass(frozen=True)
class TaskStatus:
    """What a store remembers of one task, fleet-wide: ``None`` where nothing happened yet.

    Written by every worker that shares the store: ``last_claim`` by the claim a worker won,
    ``last_success``/``last_failure`` by `record_run`. Kept across restarts, for as long
    as the store keeps its data (the claims' expiry does not touch it).
    """

    task: str
    last_claim: LastClaim | None = None
    last_success: LastRun | None = None
    last_failure: LastRun | None = None


STATUS_COLUMNS = (  # of the SQL stores' tasks table, in this order
    "task",
    "claimed_tick",
    "claimed_at",
    "claimed_by",
    "ok_tick",
    "ok_at",
    "ok_by",
    "ok_duration",
    "ok_error",
    "failed_tick",
    "failed_at",
    "failed_by",
    "failed_duration",
    "failed_error",
)


def status_from_row(row: Sequence[Any]) -> TaskStatus:
    """A `TaskStatus` from the ``STATUS_COLUMNS`` of a SQL row (instants as Unix seconds)."""
    (
        task,
        c_tick,
        c_at,
        c_by,
        o_tick,
        o_at,
        o_by,
        o_dur,
        o_err,
        f_tick,
        f_at,
        f_by,
        f_dur,
        f_err,
    ) = row
    return TaskStatus(
        task,
        None if c_tick is None else LastClaim(c_tick, utc(c_at), c_by),
        None if o_tick is None else LastRun(o_tick, utc(o_at), o_by, o_dur, o_err),
        None if f_tick is None else LastRun(f_tick, utc(f_at), f_by, f_dur, f_err),
    )


class PerLoop(Generic[T]):
    """One client (or pool) per event loop, closed by `aclose` or when its loop ends.

    Async clients (redis.asyncio, asyncpg) belong to the event loop that made them, and a
    forked worker must not share its parent's sockets. A store is often made once, at import
    time, and used from several loops in turn: one per test in a test suite, one per
    ``TestClient``. So each loop (in each process) gets its own client, made on first use.

    Each client is tied to its loop by an async generator suspended in ``try/finally``:
    ``asyncio.run()``, ``asyncio.Runner``, uvicorn and pytest-asyncio all finalize the async
    generators of a loop before closing it (``loop.shutdown_asyncgens()``), so the client is
    closed while its loop still runs, instead of leaking sockets ("unclosed transport").
    """

    def __init__(
        self,
        make: Callable[[], Awaitable[T]],
        close: Callable[[T], Awaitable[None]],
        abandon: Callable[[T], None],
    ) -> None:
        self._make = make
        self._close = close  # graceful, in the client's loop
        self._abandon = abandon  # immediate, after a failure
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Slot[T]] = (
            weakref.WeakKeyDictionary()
        )

    async def get(self) -> T:
        """The running loop's client, made now if it has none."""
        loop = asyncio.get_running_loop()
        slot = self._slots.get(loop)
        if slot is None or slot.pid != os.getpid():
            slot = self._slots[loop] = _Slot()
        elif slot.value is not None:
            return slot.value  # the common case: no lock to take
        async with slot.lock:
            if slot.value is None:
                value = await self._make()
                guard = self._guard(loop, slot, value)
                await guard.asend(None)  # now the loop knows it: it will finalize it
                slot.value, slot.guard = value, guard
            return slot.value

    def current(self) -> T | None:
        """The running loop's client if it has one (none is made)."""
        slot = self._slots.get(asyncio.get_running_loop())
        if slot is None or slot.pid != os.getpid():
            return None
        return slot.value

    async def aclose(self) -> None:
        """Close the running loop's client (the others close when their loops end)."""
        slot = self._slots.pop(asyncio.get_running_loop(), None)
        if slot is not None and slot.guard is not None and slot.pid == os.getpid():
            await slot.guard.aclose()

    async def discard(self) -> None:
        """Drop the running loop's client at once (after a failure); the next get() makes one."""
        slot = self._slots.pop(asyncio.get_running_loop(), None)
        if slot is not None and slot.guard is not None and slot.pid == os.getpid():
            slot.abandoned = True
            await slot.guard.aclose()

    async def _guard(
        self, loop: asyncio.AbstractEventLoop, slot: _Slot[T], value: T
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            if self._slots.get(loop) is slot:
                del self._slots[loop]
            if slot.abandoned:
                self._abandon(value)
            else:
                await self._close(value)


class _Slot(Generic[T]):
    __slots__ = ("abandoned", "guard", "lock", "pid", "value")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = asyncio.Lock()
        self.value: T | None = None
        self.guard: AsyncGenerator[None, None] | None = None
        self.abandoned = False


# -- run records written together (the Redis and PostgreSQL stores) -----------------------

Row = tuple[str, int, float, str, float, "str | None"]
"""A checked run record: task, tick, started at (Unix s), worker, duration (s), error text
(``None`` for a success)."""

_log = logging.getLogger("repeat_every")


class RecordQueue:
    """A network store's run records, sent together: one round trip for the records that many
    tasks give during one turn of the event loop.

    What a store using it may promise (`add` is its ``record_run``):

    - **A lone record is waited for.** A record given while nothing of this event loop is
      queued or being sent goes at once, and its caller waits for it (within ``timeout``):
      a task alone at its instant still learns that its record failed.
    - **Others are queued, and not waited for.** A record given while another one is being
      sent or queued joins the queue and `add` returns at once; the queue goes to the server
      in one ``write`` call at the end of the current turn of the event loop (so the thousand
      tasks ending at one instant cost one or two round trips, not a thousand). A queued
      record whose write fails is logged at WARNING, naming its tasks (never raised into a
      task that did not wait for it).
    - **Readers see them.** `flush` sends what is queued and waits for every write of this
      event loop still under way (each bounded by ``timeout``): the store calls it before a
      read and before closing.
    - **Per event loop**, as the stores' clients: each loop (in each process) has its own
      queue.

    ``write(rows)`` sends rows (in the order given; a task may appear more than once) in one
    round trip; ``where`` names the store in log lines (no secret).
    """

    def __init__(
        self, write: Callable[[list[Row]], Awaitable[None]], timeout: float, where: str
    ) -> None:
        self._write = write
        self._timeout = timeout
        self._where = where
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queued] = (
            weakref.WeakKeyDictionary()
        )

    async def add(self, row: Row) -> None:
        """Send ``row`` now and wait for it, or queue it (see the class's docstring)."""
        queued = self._queued()
        if queued.rows is None and not queued.sending:
            sent = queued.loop.create_future()  # what a flush meanwhile waits for
            queued.sending.add(sent)
            try:
                await within(self._timeout, self._write([row]))
            finally:
                queued.sending.discard(sent)
                sent.set_result(None)
            return
        if queued.rows is None:
            queued.rows = []
            queued.loop.call_soon(self._start, queued)
        queued.rows.append(row)

    async def flush(self) -> None:
        """Send what this event loop queued; wait for its writes under way to end."""
        loop = asyncio.get_running_loop()
        queued = self._loops.get(loop)
        if queued is None or queued.pid != os.getpid():
            return
        self._start(queued)
        if queued.sending:
            await asyncio.wait(set(queued.sending))  # not cancelled if this caller is

    def _queued(self) -> _Queued:
        loop = asyncio.get_running_loop()
        queued = self._loops.get(loop)
        if queued is None or queued.pid != os.getpid():
            queued = self._loops[loop] = _Queued(loop)
        return queued

    def _start(self, queued: _Queued) -> None:
        """At the end of the turn (or at a flush): the queued rows go, in one write."""
        rows, queued.rows = queued.rows, None
        if rows:
            sending = queued.loop.create_task(self._send(rows))
            queued.sending.add(sending)  # (the loop itself keeps only a weak reference)
            sending.add_done_callback(queued.sending.discard)

    async def _send(self, rows: list[Row]) -> None:
        """Write queued rows; nobody waits for them, so a failure is logged here."""
        try:
            await within(self._timeout, self._write(rows))
        except Exception as exc:
            tasks = sorted({row[0] for row in rows})
            shown = ", ".join(tasks[:5]) + (f" and {len(tasks) - 5} more" if len(tasks) > 5 else "")
            _log.warning(
                "could not write the run records of %s to %s: %s",
                shown,
                self._where,
                error_text(exc),
                exc_info=exc,
            )


class _Queued:
    """One event loop's queue of a `RecordQueue`: ``rows`` queued during this turn (``None``:
    none, and no write planned), ``sending`` the writes under way (the waited-for record's
    future, the queued rows' tasks), each done when its write ends."""

    __slots__ = ("loop", "pid", "rows", "sending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pid = os.getpid()
        self.rows: list[Row] | None = None
        self.sending: set[asyncio.Future[None]] = set()
