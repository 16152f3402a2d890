"""The Redis claim store: ``SET key owner NX PX ttl``, for workers on many hosts."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._common import (
    Checked,
    LastClaim,
    LastRun,
    PerLoop,
    RecordQueue,
    Row,
    TaskStatus,
    check_claim,
    check_claims,
    check_run,
    check_seconds,
    check_task_name,
    error_text,
    owner,
    redact_url,
    require,
    utc,
    within,
)

if TYPE_CHECKING:
    from types import TracebackType

    from redis.asyncio import Redis

_SCHEMES = ("redis://", "rediss://", "unix://")
_POOL_SIZE = 50  # connections of the store's own client, per event loop

# One claim: the claim's key, the task's status hash, the set of task names; the owner, ttl
# (ms), deadline (ms since the epoch, or ""), tick, now (s, owner's clock), task, and "1" to
# win only a tick newer than every tick of the task claimed so far (else ""). 1 if won, else 0.
# With a deadline the claim lives until deadline + ttl on the server's clock, and a claim that
# reaches the server after that instant loses: however late the caller, it cannot win a tick
# whose first claim may have expired. (TIME before a write needs effects replication: the
# default since Redis 5; asked for explicitly where the function still exists.)
_CLAIM_FUNCTION = """
if redis.replicate_commands then redis.replicate_commands() end
local function claim(key, status, names, owner, ttl, deadline, tick, now, task, if_newest)
  ttl = tonumber(ttl)
  if deadline ~= '' then
    local t = redis.call('TIME')
    local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    ttl = math.floor(tonumber(deadline) + ttl - ms)
    if ttl <= 0 then return 0 end
  end
  local last = redis.call('HGET', status, 'claimed_tick')
  if if_newest ~= '' and last and tonumber(last) >= tonumber(tick) then return 0 end
  if not redis.call('SET', key, owner, 'NX', 'PX', ttl) then return 0 end
  if not last or tonumber(last) <= tonumber(tick) then
    redis.call('HSET', status, 'claimed_tick', tick, 'claimed_at', now, 'claimed_by', owner)
  end
  redis.call('SADD', names, task)
  return 1
end
"""

# KEYS: the claim, the task's status hash, the set of task names.
# ARGV: owner, ttl (ms), deadline (ms or ""), tick, now, task, if_newest ("1" or "").
_CLAIM = (
    _CLAIM_FUNCTION
    + "return claim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], "
    "ARGV[6], ARGV[7])"
)

# Many claims, one after the other, as many _CLAIM would make them; a list of 1 or 0.
# KEYS: the set of task names, then the claim's key and the task's status hash of each claim.
# ARGV: owner, now, then the ttl (ms), deadline (ms or ""), tick and task of each claim.
_CLAIM_MANY = (
    _CLAIM_FUNCTION
    + """
local won = {}
for i = 1, (#KEYS - 1) / 2 do
  local a = 2 + (i - 1) * 4
  won[i] = claim(KEYS[2 * i], KEYS[2 * i + 1], KEYS[1], ARGV[1], ARGV[a + 1], ARGV[a + 2],
                 ARGV[a + 3], ARGV[2], ARGV[a + 4], '')
end
return won
"""
)
_CHUNK = 200  # claims per script call (each blocks the server ~3.5 ms); one pipeline for all

# Run records, one after the other: an older one (by start) does not replace a newer one.
# KEYS: the set of task names, then each record's task status hash.
# ARGV: per record, "ok" or "failed", tick, started at (s), worker, duration (s), error text,
# task.
_RECORD_MANY = """
for i = 2, #KEYS do
  local a = (i - 2) * 7
  local p = ARGV[a + 1]
  local last = redis.call('HGET', KEYS[i], p .. '_at')
  if not last or tonumber(last) <= tonumber(ARGV[a + 3]) then
    redis.call('HSET', KEYS[i], p .. '_tick', ARGV[a + 2], p .. '_at', ARGV[a + 3],
               p .. '_by', ARGV[a + 4], p .. '_duration', ARGV[a + 5], p .. '_error', ARGV[a + 6])
  end
  redis.call('SADD', KEYS[1], ARGV[a + 7])
end
return 1
"""
# Records per script call (each blocks the server ~2 ms on the test machine's Valkey); one
# pipeline for all. A script looping over 1,000 records costs the client 12 ms of CPU, a
# pipeline of 1,000 one-record scripts 50 ms (mostly encoding the commands).
_RECORD_CHUNK = 200


class RedisClaimStore:
    """Claims as Redis keys: once per tick across every process and host using one Redis.

    Works with Redis ≥ 5 and its compatible servers that run Lua scripts (Valkey, KeyDB…),
    through the official client (``pip install 'repeat-every[redis]'``), imported when the store
    is made (``import repeat_every.stores`` alone does not import it). Not with Redis Cluster
    (a claim's script touches three keys).

    Users may rely on:

    - **One winner.** A claim is one Lua script around ``SET <prefix><task>:<tick> <host:pid>
      NX PX <ms>``, which Redis runs atomically: exactly one caller gets ``True`` until the key
      expires.
    - **Expiry by the server.** The key lasts ``ttl`` seconds (rounded up to the millisecond)
      on the Redis server's clock, so the workers' clocks do not matter for it; Redis deletes
      expired keys itself, so nothing grows.
    - **No late winner, given the deadline.** With ``deadline=`` (the tick's due instant), the
      key lasts until ``deadline + ttl`` on the server's clock (``TIME``), and a claim reaching
      the server at or after that instant loses: a worker however late cannot win a tick
      another worker claimed.
    - **Run records.** A won claim also notes the task's last claimed tick, in the same
      script; `record_run` notes its last success or failure; `status` and
      `statuses` read them (a hash ``<status_prefix><task>`` per task, and the set
      ``<status_prefix>`` of task names; never expired).
    - **Run records are sent together, and waited for only alone.** A `record_run` given
      while no other record of this event loop is queued or on its way is sent at once, and
      its caller waits for it (so a task alone at its instant learns that its record failed).
      Any other is queued and `record_run` returns at once: the records queued during one
      turn of the event loop (the thousand tasks ending at one instant) go to the server
      together at the end of that turn, in one round trip, within ``timeout``. Of the same
      task's records, the one that started last is kept, queued or not. `status`,
      `statuses` and `aclose` write the queued records first, so they always see them. A
      queued record whose write fails is logged at WARNING (``could not write the run
      records of …``, naming the tasks) and dropped, as the task loop does when `record_run`
      raises. `flush` writes them and waits (`run_tasks` and `lifespan` call it once their
      tasks stop): records still queued when the event loop ends without `flush` or
      `aclose` may be lost.
    - **Lazy and self-healing.** Given a ``url``, the store makes its own client on the first
      claim (one per event loop, and a new one in a forked process, each closed when its
      loop ends), with at most 50 connections: a claim beyond them waits for one, within
      ``timeout``; the client reconnects by itself once the server is back. A failing claim
      raises (the task then applies ``on_store_error``); a claim never waits more than
      ``timeout`` seconds for the server. A connection error is retried once at once (a
      pooled connection the server had closed), a time-out is not: a claim that may have
      reached the server is never sent twice, so a lost reply costs a tick rather than
      running it twice.
    - **Your client, your lifetime.** Given a ``client``, the store uses it as it is (its own
      retry and time-out settings) and `aclose` does not close it.

    A Redis primary that fails over to a replica before replicating a claim can let a second
    process win that tick: see docs/many-workers.md. Its ``repr`` never shows the URL's
    password.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        prefix: str = "repeat_every:claim:",
        status_prefix: str = "repeat_every:task:",
        timeout: float = 5.0,
    ) -> None:
        """Claim in the Redis at ``url`` (``redis://host:6379/0``, ``rediss://…``,
        ``unix://…``), or through an existing ``redis.asyncio.Redis`` ``client``: one of the two.

        ``prefix``: what every claim's key starts with. ``status_prefix``: what each task's
        run-record hash starts with (the key ``status_prefix`` itself holds the set of task
        names). ``timeout``: seconds a claim may take, connecting included (also the client's
        connect and read time-outs, with ``url``).
        """
        if (url is None) == (client is None):
            raise TypeError(
                "RedisClaimStore needs either url='redis://host:6379/0' or client=<a "
                "redis.asyncio.Redis>, not both and not neither"
            )
        if url is not None and (not isinstance(url, str) or not url):
            raise TypeError("url must be a Redis URL like 'redis://localhost:6379/0'")
        if url is not None and not url.lower().startswith(_SCHEMES):
            scheme = url.split("://", 1)[0] if "://" in url else "(none)"
            raise ValueError(
                f"url must start with redis://, rediss:// (TLS) or unix:// (a socket), got the "
                f"scheme {scheme!r} in {redact_url(url)!r}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
        if not isinstance(status_prefix, str) or not status_prefix:
            raise TypeError(f"status_prefix must be a non-empty string, got {status_prefix!r}")
        if url is not None:
            require("redis.asyncio", "redis", "RedisClaimStore")
        self._url = url
        self._timeout = check_seconds(timeout, "timeout")
        self._prefix = prefix
        self._status_prefix = status_prefix
        self._given = client
        self._own: PerLoop[Redis] = PerLoop(self._connect, _close, _abandon)
        self._scripts: dict[str, Any] = {}  # source → redis-py Script (called with a client)
        self._records = RecordQueue(self._record_many, self._timeout, repr(self))

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

        Without ``deadline`` the claim lives ``ttl`` seconds from when the server gets it.
        With ``deadline`` (the tick's due instant, seconds since the Unix epoch) it lives until
        ``deadline + ttl`` on the server's clock, and a claim reaching the server at or after
        that instant loses.
        With ``if_newest=True`` the claim also loses if the store's run records show that a
        worker claimed this tick or a later one of ``task``, at any time (for a catch-up run
        of a tick missed while every worker was down: once across the fleet, even after the
        tick's own claims expired).

        Raises the client's error (``redis.exceptions.ConnectionError``, ``TimeoutError``…)
        when the server cannot be reached.
        """
        seconds = check_claim(task, tick, ttl, deadline)
        client = await self._client()
        script = self._script(client, _CLAIM)
        args = (
            owner(),
            max(1, math.ceil(seconds * 1000)),
            "" if deadline is None else repr(math.floor(deadline * 1000)),
            tick,
            repr(time.time()),
            task,
            "1" if if_newest else "",
        )
        keys = (f"{self._prefix}{task}:{tick}", self._status_key(task), self._status_prefix)
        return bool(await within(self._timeout, script(keys=keys, args=args, client=client)))

    async def claim_many(self, claims: Sequence[tuple[str, int, float, float]]) -> list[bool]:
        """Claim several ticks in one round trip: each ``(task, tick, ttl, deadline)`` as
        ``claim(task, tick, ttl, deadline=deadline)`` would claim it; whether each was won, in
        order.

        One round trip: a script that makes the claims one after the other, in order, each
        as ``claim``'s script makes it (they share its code), 200 claims per script call,
        the calls in one pipeline. So the winner rules, the run records and a ``(task,
        tick)`` given twice (the second loses unless the first lost for its own deadline)
        are those of as many ``claim`` calls. Every item is checked before anything is sent
        (the same errors as ``claim``, naming the item: ``claims[3]: ttl must be…``); ``[]``
        sends nothing. The whole call takes at most ``timeout`` seconds and raises what
        ``claim`` raises when the server cannot be used; a script that fails half-way keeps
        the claims it made (Redis does not roll back), so a failed call may have won some
        of its ticks, which nobody then runs. Another caller's commands wait while a script
        call runs (3.5 ms per call of 200 claims on the test machine's Valkey).
        """
        items = check_claims(claims)
        if not items:
            return []
        return await within(self._timeout, self._claim_many(items))

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
        go to the server together at its end (see "Run records are sent together" in the
        class's docstring). Raises the client's error for a record waited for; a queued record
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
        client = await self._client()
        fields = await within(self._timeout, client.hgetall(self._status_key(task)))
        return _status(task, fields)

    async def statuses(self) -> list[TaskStatus]:
        """What the store remembers of every task, by name (queued run records included)."""
        await self._records.flush()
        client = await self._client()
        names = sorted(
            name.decode() if isinstance(name, bytes) else name
            for name in await within(self._timeout, client.smembers(self._status_prefix))
        )
        async with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._status_key(name))
            rows = await within(self._timeout, pipe.execute())
        return [_status(name, fields) for name, fields in zip(names, rows, strict=True) if fields]

    async def flush(self) -> None:
        """Write the run records this event loop still queues, and wait for them (and for
        those already under way): `run_tasks` and `lifespan` call it after stopping their
        tasks, so a shutdown loses none. Raises what the write raised."""
        await self._records.flush()

    async def aclose(self) -> None:
        """Write the run records still queued, then close the client the store made (not a
        given one); a later claim makes a new one.

        Closes the client of the running event loop; the store's clients in other loops are
        closed when their loops end.
        """
        await self._records.flush()
        await self._own.aclose()

    async def __aenter__(self) -> RedisClaimStore:
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
        target = repr(redact_url(self._url)) if self._url is not None else "client=…"
        return f"{type(self).__name__}({target}, prefix={self._prefix!r})"

    async def _claim_many(self, items: list[Checked]) -> list[bool]:
        client = await self._client()
        head = (owner(), repr(time.time()))
        calls: list[tuple[Any, ...]] = []  # EVALSHA's arguments after the sha, per chunk
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            keys: list[str] = [self._status_prefix]
            args: list[str | int] = [*head]
            for task, tick, ttl, deadline in chunk:
                keys += (f"{self._prefix}{task}:{tick}", self._status_key(task))
                args += (
                    max(1, math.ceil(ttl * 1000)),
                    "" if deadline is None else repr(math.floor(deadline * 1000)),
                    tick,
                    task,
                )
            calls.append((len(keys), *keys, *args))
        won: list[bool] = []
        for reply in await self._scripted(client, _CLAIM_MANY, calls):
            won += (bool(w) for w in reply)
        return won

    async def _record_many(self, rows: list[Row]) -> None:
        """Write run records in one round trip (`RecordQueue`'s ``write``), in order: a
        script that writes them one after the other, 200 per call, the calls in one pipeline
        (a lone record: the script called directly, no pipeline to set up).
        """
        client = await self._client()
        calls: list[tuple[list[str], list[str | int]]] = []  # keys and arguments, per call
        for start in range(0, len(rows), _RECORD_CHUNK):
            keys: list[str] = [self._status_prefix]
            args: list[str | int] = []
            chunk = rows[start : start + _RECORD_CHUNK]
            for task, tick, started_at, worker, duration, text in chunk:
                keys.append(self._status_key(task))
                args += (
                    "ok" if text is None else "failed",
                    tick,
                    repr(started_at),
                    worker,
                    repr(duration),
                    text or "",
                    task,
                )
            calls.append((keys, args))
        if len(rows) == 1:
            script = self._script(client, _RECORD_MANY)
            await script(keys=calls[0][0], args=calls[0][1], client=client)
            return
        await self._scripted(
            client, _RECORD_MANY, [(len(keys), *keys, *args) for keys, args in calls]
        )

    async def _scripted(
        self, client: Redis, source: str, calls: list[tuple[Any, ...]]
    ) -> list[Any]:
        """The script ``source`` run once per call (``EVALSHA``'s arguments after the sha),
        all in one pipeline: each call's reply. Raises the first call's error, if any."""
        from redis.exceptions import NoScriptError

        sha = self._script(client, source).sha
        replies = await self._evalsha(client, sha, calls)
        refused = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if refused:
            # The server lost its scripts (restarted, SCRIPT FLUSH) and ran none of these
            # calls: load the script and send them again, once.
            await client.script_load(source)
            again = await self._evalsha(client, sha, [calls[i] for i in refused])
            for i, reply in zip(refused, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    @staticmethod
    async def _evalsha(client: Redis, sha: str, calls: list[tuple[Any, ...]]) -> list[Any]:
        """One ``EVALSHA`` per call, all in one pipeline: their replies, errors included.

        Straight into the pipeline: redis-py's ``Script`` in a pipeline would first ask
        ``SCRIPT EXISTS``, a second round trip on every call.
        """
        async with client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(sha, *call)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _status_key(self, task: str) -> str:
        return f"{self._status_prefix}{task}"

    async def _client(self) -> Redis:
        return self._given if self._given is not None else await self._own.get()

    def _script(self, client: Redis, source: str) -> Any:
        """The script, sent by ``EVALSHA`` (redis-py loads it again into a restarted server).

        Made once, with the first client; every call names its own client.
        """
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = client.register_script(source)
        return script

    async def _connect(self) -> Redis:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        assert self._url is not None
        # A blocking pool: a claim beyond its connections waits for one (within the claim's
        # timeout). redis-py's default pool raises MaxConnectionsError past 100 connections
        # (redis-py ≥ 6): 1,000 tasks due at one instant lost 900 claims.
        pool = BlockingConnectionPool.from_url(
            self._url,
            max_connections=_POOL_SIZE,
            timeout=self._timeout,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return Redis.from_pool(pool)


async def _close(client: Redis) -> None:
    await client.aclose()


def _abandon(client: Redis) -> None:  # pragma: no cover - the Redis store never discards
    pass


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _status(task: str, raw: dict[Any, Any]) -> TaskStatus:
    fields = {_text(k): _text(v) for k, v in raw.items()}

    def run(p: str) -> LastRun | None:
        if fields.get(f"{p}_tick") is None:
            return None
        return LastRun(
            int(fields[f"{p}_tick"] or 0),
            utc(float(fields[f"{p}_at"] or 0)),
            fields[f"{p}_by"] or "",
            float(fields[f"{p}_duration"] or 0),
            fields.get(f"{p}_error") or None,
        )

    claimed = fields.get("claimed_tick")
    return TaskStatus(
        task,
        None
        if claimed is None
        else LastClaim(
            int(claimed), utc(float(fields["claimed_at"] or 0)), fields["claimed_by"] or ""
        ),
        run("ok"),
        run("failed"),
    )
