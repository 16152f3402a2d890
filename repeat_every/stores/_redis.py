"""The Redis claim store: ``SET key owner NX PX ttl``, for workers on many hosts."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ._common import PerLoop, check_claim, check_seconds, owner, require, within

if TYPE_CHECKING:
    from types import TracebackType

    from redis.asyncio import Redis


class RedisClaimStore:
    """Claims as Redis keys: once per tick across every process and host using one Redis.

    Works with Redis ≥ 2.6.12 and its compatible servers (Valkey, KeyDB, Dragonfly…), through
    the official client (``pip install 'repeat-every[redis]'``), imported when the store is made
    (``import repeat_every.stores`` alone does not import it).

    Users may rely on:

    - **One winner.** A claim is ``SET <prefix><task>:<tick> <host:pid> NX PX <ttl>``, which
      Redis runs atomically: exactly one caller gets ``True`` until the key expires.
    - **Expiry by the server.** The key lasts ``ttl`` seconds on the Redis server's clock
      (rounded up to the millisecond), so the workers' clocks do not matter for it; Redis
      deletes expired keys itself, so nothing grows.
    - **Lazy and self-healing.** Given a ``url``, the store makes its own client on the first
      claim (one per event loop, and a new one in a forked process, each closed when its
      loop ends); the client reconnects by itself once the server is back. A failing claim
      raises (the task then applies ``on_store_error``); a claim never waits more than
      ``timeout`` seconds for the server. A connection error is retried once at once (a
      pooled connection the server had closed), a time-out is not: a ``SET`` that may have
      reached the server is never sent twice, so a lost reply costs a tick rather than
      running it twice.
    - **Your client, your lifetime.** Given a ``client``, the store uses it as it is (its own
      retry and time-out settings) and `aclose` does not close it.

    A Redis primary that fails over to a replica before replicating a claim can let a second
    process win that tick: see docs/many-workers.md.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        prefix: str = "repeat_every:claim:",
        timeout: float = 5.0,
    ) -> None:
        """Claim in the Redis at ``url`` (``redis://host:6379/0``, ``rediss://…``,
        ``unix://…``), or through an existing ``redis.asyncio.Redis`` ``client``: one of the two.

        ``prefix``: what every key starts with. ``timeout``: seconds a claim may take,
        connecting included (also the client's connect and read time-outs, with ``url``).
        """
        if (url is None) == (client is None):
            raise TypeError(
                "RedisClaimStore needs either url='redis://host:6379/0' or client=<a "
                "redis.asyncio.Redis>, not both and not neither"
            )
        if url is not None and (not isinstance(url, str) or not url):
            raise TypeError(f"url must be a Redis URL like 'redis://localhost:6379/0', got {url!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
        if url is not None:
            require("redis.asyncio", "redis", "RedisClaimStore")
        self._url = url
        self._timeout = check_seconds(timeout, "timeout")
        self._prefix = prefix
        self._given = client
        self._own: PerLoop[Redis] = PerLoop(self._connect, _close, _abandon)

    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        """Claim ``(task, tick)`` for ``ttl`` seconds; ``True`` if this caller won it.

        Raises the client's error (``redis.exceptions.ConnectionError``, ``TimeoutError``…)
        when the server cannot be reached.
        """
        check_claim(task, tick, ttl)
        client = self._given if self._given is not None else await self._own.get()
        request = client.set(
            f"{self._prefix}{task}:{tick}",
            owner(),
            nx=True,
            px=max(1, math.ceil(ttl * 1000)),
        )
        return bool(await within(self._timeout, request))

    async def aclose(self) -> None:
        """Close the client the store made (not a given one); a later claim makes a new one.

        Closes the client of the running event loop; the store's clients in other loops are
        closed when their loops end.
        """
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
        target = repr(self._url) if self._url is not None else f"client={self._given!r}"
        return f"{type(self).__name__}({target}, prefix={self._prefix!r})"

    async def _connect(self) -> Redis:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        assert self._url is not None
        return Redis.from_url(
            self._url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )


async def _close(client: Redis) -> None:
    await client.aclose()


def _abandon(client: Redis) -> None:  # pragma: no cover - the Redis store never discards
    pass
