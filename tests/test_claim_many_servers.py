"""``claim_many`` on the Redis and PostgreSQL stores: many ticks claimed in one round trip.

The task loop hands a store every tick due at the same instant in one ``claim_many`` call; each
item must be decided exactly as ``claim`` would decide it. Every test runs against the real
Valkey and PostgreSQL servers that tests/servers.py starts for the session; the only real
waits are a few tens of milliseconds for a claim to expire on the server's clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped,unused-ignore]
import pytest
import redis.asyncio
import redis.exceptions
from servers import PostgresServer, RedisServer, free_port, silent_server

from repeat_every.stores import PostgresClaimStore, RedisClaimStore
from repeat_every.stores._common import owner

Store = RedisClaimStore | PostgresClaimStore
Claims = list[tuple[str, int, float, float]]


class Stores:
    """Makes store instances (one per "process") on one real server; closes them all."""

    def __init__(self, kind: str, server: RedisServer | PostgresServer) -> None:
        self.kind = kind
        self.server = server
        self._made: list[Store] = []

    def store(self, **options: Any) -> Store:
        if isinstance(self.server, RedisServer):
            made: Store = RedisClaimStore(self.server.url, **options)
        else:
            made = PostgresClaimStore(self.server.dsn, **options)
        self._made.append(made)
        return made

    def at(self, url: str, **options: Any) -> Store:
        """A store at ``url`` (a Redis URL or a PostgreSQL DSN, as the kind wants)."""
        made: Store = (
            RedisClaimStore(url, **options)
            if self.kind == "redis"
            else PostgresClaimStore(url, **options)
        )
        self._made.append(made)
        return made

    def closed_port_url(self, password: str) -> str:
        """A URL with ``password`` for a port of 127.0.0.1 that nothing listens on."""
        if self.kind == "redis":
            return f"redis://:{password}@127.0.0.1:{free_port()}/0"
        return f"postgresql://postgres:{password}@127.0.0.1:{free_port()}/postgres"

    async def claimed_ticks(self, task: str) -> list[int]:
        """The ticks of ``task`` that hold a claim on the server, read without the store."""
        if isinstance(self.server, RedisServer):
            client = redis.asyncio.Redis.from_url(self.server.url)
            try:
                keys = await client.keys(f"repeat_every:claim:{task}:*")
            finally:
                await client.aclose()
            names = (key.decode() if isinstance(key, bytes) else key for key in keys)
            return sorted(int(name.rsplit(":", 1)[1]) for name in names)
        conn = await asyncpg.connect(self.server.dsn)
        try:
            rows = await conn.fetch(
                "SELECT tick FROM repeat_every_claims WHERE task = $1 ORDER BY tick", task
            )
        finally:
            await conn.close()
        return [row["tick"] for row in rows]

    async def aclose(self) -> None:
        for made in self._made:
            await made.aclose()


@pytest.fixture
async def stores(
    network_server: tuple[str, RedisServer | PostgresServer],
) -> AsyncIterator[Stores]:
    made = Stores(*network_server)
    yield made
    await made.aclose()


@pytest.fixture
def task() -> Callable[[str], str]:
    """Task names no other test uses: the servers live for the whole session."""
    run = uuid.uuid4().hex[:12]
    return lambda label: f"many-{run}-{label}"


# -- the same answers as claim() -----------------------------------------------------------


async def test_claim_many_answers_what_the_same_claims_one_by_one_answer(
    stores: Stores, task: Callable[[str], str]
) -> None:
    # Two twin tasks get the same history; then one claims the mix one by one, the other in
    # one claim_many, and both must end the same, with the answers a claim is known to give.
    store, other = stores.store(), stores.store()
    now = time.time()

    def mix(name: str) -> Claims:
        return [
            (name, 1, 60.0, now),  # new: won
            (name, 2, 60.0, now),  # claimed by another worker, still live: lost
            (name, 3, 60.0, now),  # claimed by another worker, expired since: won
            (name, 4, 1.0, now - 10),  # too late for its deadline: lost, never written
            (name, 1, 60.0, now),  # the same tick again in the call: lost to the first
            (name, 5, 1.0, now - 10),  # too late...
            (name, 5, 60.0, now),  # ...so this later item of the same tick wins it
            (name + "-other", 1, 60.0, now),  # another task in the same call: won
            (name, 6, 60.0, None),  # type: ignore[list-item]  # no deadline, as claim allows
        ]

    for name in (task("one-by-one"), task("batch")):
        assert await other.claim(name, 2, 60.0) is True
        assert await other.claim(name, 3, 0.05) is True
    await asyncio.sleep(0.15)  # real time: the server's clock expires the 50 ms claims

    one_by_one = [
        await store.claim(t, tick, ttl, deadline=deadline)
        for t, tick, ttl, deadline in mix(task("one-by-one"))
    ]
    batch = await store.claim_many(mix(task("batch")))

    assert batch == one_by_one == [True, False, True, False, False, False, True, True, True]
    assert await stores.claimed_ticks(task("batch")) == [1, 2, 3, 5, 6]
    assert await stores.claimed_ticks(task("one-by-one")) == [1, 2, 3, 5, 6]
    # A tick won by claim_many is lost to every later claim, batched or not, and vice versa.
    assert await other.claim(task("batch"), 1, 60.0) is False
    assert await other.claim_many([(task("batch"), 1, 60.0, now)]) == [False]
    assert await other.claim_many([(task("one-by-one"), 5, 60.0, now)]) == [False]


async def test_two_concurrent_claim_many_of_the_same_500_ticks_win_each_tick_once(
    stores: Stores, task: Callable[[str], str]
) -> None:
    first, second, single = stores.store(), stores.store(), stores.store()
    name = task("race")
    now = time.time()
    ticks = list(range(500))
    shuffled = random.Random(14).sample(ticks, len(ticks))  # the other order: no deadlock
    for store in (first, second, single):  # connected before the race
        await store.claim(task("warm"), 0, 60.0)

    alone = ticks[::50]  # also claimed one by one, by a third worker, during the race
    batches = [
        asyncio.ensure_future(first.claim_many([(name, tick, 60.0, now) for tick in ticks])),
        asyncio.ensure_future(second.claim_many([(name, tick, 60.0, now) for tick in shuffled])),
    ]
    singles = await asyncio.gather(
        *(single.claim(name, tick, 60.0, deadline=now) for tick in alone)
    )
    a, b = await asyncio.gather(*batches)

    wins = dict.fromkeys(ticks, 0)
    for order, won in ((ticks, a), (shuffled, b), (alone, singles)):
        for tick, one in zip(order, won, strict=True):
            wins[tick] += one
    assert set(wins.values()) == {1}, {t: n for t, n in wins.items() if n != 1}
    assert await stores.claimed_ticks(name) == ticks


async def test_status_after_claim_many_shows_each_tasks_last_claimed_tick(
    stores: Stores, task: Callable[[str], str]
) -> None:
    store = stores.store()
    now = time.time()
    before = time.time()
    won = await store.claim_many(
        [
            (task("a"), 5, 60.0, now),
            (task("a"), 9, 60.0, now),
            (task("b"), 3, 60.0, now),
            (task("a"), 7, 60.0, now),
            (task("c"), 1, 60.0, now - 100),  # too late: lost, so not noted
        ]
    )
    after = time.time()
    assert won == [True, True, True, True, False]

    a, b, c = [await store.status(task(label)) for label in "abc"]
    assert a.last_claim is not None
    assert b.last_claim is not None
    assert (a.last_claim.tick, a.last_claim.worker) == (9, owner())
    assert before - 1 <= a.last_claim.at.timestamp() <= after + 1
    assert (b.last_claim.tick, b.last_claim.worker) == (3, owner())
    assert c.last_claim is None
    # An older tick won later does not replace the newest one, as with claim().
    assert await store.claim_many([(task("a"), 2, 60.0, now)]) == [True]
    assert (await store.status(task("a"))).last_claim == a.last_claim
    assert task("a") in {s.task for s in await store.statuses()}


async def test_thousands_of_claims_are_decided_in_one_call(
    stores: Stores, task: Callable[[str], str]
) -> None:
    # 2,500: more than one chunk where the store splits a call (Redis: 200 per script call).
    store, other = stores.store(), stores.store()
    now = time.time()
    claims = [(task(f"job{n % 10}"), n, 60.0, now) for n in range(2500)]
    assert await store.claim_many(claims) == [True] * 2500
    assert await other.claim_many(claims) == [False] * 2500
    assert await stores.claimed_ticks(task("job3")) == list(range(3, 2500, 10))
    last = await store.status(task("job9"))
    assert last.last_claim is not None
    assert last.last_claim.tick == 2499


async def test_an_empty_call_answers_an_empty_list_without_touching_the_server(
    stores: Stores,
) -> None:
    unreachable = stores.at(stores.closed_port_url("pw"), timeout=1)
    assert await unreachable.claim_many([]) == []
    assert await unreachable.claim_many(()) == []


# -- bad input, unreachable servers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (("", 1, 60.0, 0.0), ValueError, r"^claims\[1\]: task must not be empty"),
        (("job", 1.5, 60.0, 0.0), TypeError, r"^claims\[1\]: tick must be an int"),
        (("job", 2**63, 60.0, 0.0), ValueError, r"^claims\[1\]: tick must fit in 64 bits"),
        (("job", 1, 0.0, 0.0), ValueError, r"^claims\[1\]: ttl must be finite and > 0"),
        (("job", 1, 60.0, math.nan), ValueError, r"^claims\[1\]: deadline must be finite"),
        (("job\n", 1, 60.0, 0.0), ValueError, r"^claims\[1\]: task must not contain control"),
        (("job", 1, 60.0), TypeError, r"^claims\[1\] must be a \(task, tick, ttl, deadline\)"),
        ("job", TypeError, r"^claims\[1\] must be a \(task, tick, ttl, deadline\) tuple"),
    ],
)
async def test_a_malformed_item_is_refused_before_any_item_reaches_the_server(
    stores: Stores, task: Callable[[str], str], bad: Any, error: type[Exception], message: str
) -> None:
    store = stores.store()
    now = time.time()
    good = (task("good"), 1, 60.0, now)
    with pytest.raises(error, match=message):
        await store.claim_many([good, bad])
    # Nothing was sent: the good item, first in the call, is still free.
    assert await store.claim(task("good"), 1, 60.0, deadline=now) is True
    # The same check as claim(), on an unreachable store too: a bug, not an outage.
    unreachable = stores.at(stores.closed_port_url("pw"), timeout=1)
    with pytest.raises(error, match=message):
        await unreachable.claim_many([good, bad])


async def test_claims_that_are_not_a_list_of_tuples_are_refused(stores: Stores) -> None:
    store = stores.store()
    with pytest.raises(TypeError, match=r"^claims must be a list of \(task, tick, ttl, "):
        await store.claim_many("job")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"claims must be a list .* got generator"):
        await store.claim_many(c for c in [("job", 1, 60.0, 0.0)])  # type: ignore[arg-type]


async def test_an_unreachable_server_raises_what_claim_raises_without_the_password(
    stores: Stores, task: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-pw-" + uuid.uuid4().hex[:6]
    store = stores.at(stores.closed_port_url(secret), timeout=2)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as by_claim:
        await store.claim(task("x"), 1, 60.0, deadline=time.time())
    with pytest.raises(Exception) as by_many:
        await store.claim_many([(task("x"), 1, 60.0, time.time())] * 3)
    assert type(by_many.value) is type(by_claim.value)
    assert isinstance(by_many.value, (OSError, redis.exceptions.ConnectionError))
    for text in (str(by_many.value), repr(by_many.value), repr(store), caplog.text):
        assert secret not in text


async def test_claim_many_gives_up_after_the_stores_timeout_when_the_server_never_answers(
    stores: Stores, task: Callable[[str], str]
) -> None:
    async with silent_server() as port:  # a hung or overloaded server
        url = (
            f"redis://127.0.0.1:{port}/0"
            if stores.kind == "redis"
            else f"postgresql://postgres@127.0.0.1:{port}/postgres"
        )
        store = stores.at(url, timeout=0.2)
        started = time.monotonic()
        try:
            with pytest.raises((TimeoutError, asyncio.TimeoutError, redis.exceptions.TimeoutError)):
                await store.claim_many([(task("x"), n, 60.0, time.time()) for n in range(100)])
            assert time.monotonic() - started < 3  # not the drivers' defaults (none, or 60 s)
        finally:
            await store.aclose()


# -- Redis only: the script cache and errors of the server ----------------------------------


@pytest.mark.servers
async def test_redis_claim_many_works_after_the_server_forgot_the_script(
    redis_server: RedisServer, task: Callable[[str], str]
) -> None:
    # A restarted server (or SCRIPT FLUSH) no longer knows the claim's script: the claims it
    # refused with NOSCRIPT were not run, so they are sent again once the script is loaded.
    async with RedisClaimStore(redis_server.url) as store:
        now = time.time()
        assert await store.claim_many([(task("a"), 1, 60.0, now)]) == [True]
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            await client.script_flush()
        finally:
            await client.aclose()
        # Eleven script calls (200 claims each, the last 2): all refused, all sent again.
        claims = [(task("a"), 1, 60.0, now), *((task("b"), n, 60.0, now) for n in range(2001))]
        assert await store.claim_many(claims) == [False] + [True] * 2001
        assert await store.claim_many(claims) == [False] * 2002


@pytest.mark.servers
async def test_redis_claim_many_raises_the_servers_error_as_claim_does(
    redis_server: RedisServer, task: Callable[[str], str]
) -> None:
    # The task's status key holds a string instead of a hash: the script's HGET fails.
    prefix = f"{task('status')}:"
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await client.set(f"{prefix}{task('broken')}", "not a hash")
    finally:
        await client.aclose()
    async with RedisClaimStore(redis_server.url, status_prefix=prefix) as store:
        now = time.time()
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE") as by_claim:
            await store.claim(task("broken"), 1, 60.0, deadline=now)
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE") as by_many:
            await store.claim_many([(task("fine"), 1, 60.0, now), (task("broken"), 1, 60.0, now)])
        assert type(by_many.value) is type(by_claim.value)


@pytest.mark.servers
async def test_redis_store_serves_more_concurrent_claims_than_its_pool_has_connections(
    redis_server: RedisServer, task: Callable[[str], str]
) -> None:
    # 1,000 tasks due at one instant without claim_many: 1,000 claims at once, then as many
    # run records. redis-py's default pool has 100 connections and raised MaxConnectionsError
    # for the 101st; the store's own pool makes the others wait for a free connection.
    async with RedisClaimStore(redis_server.url) as store:
        now = time.time()
        won = await asyncio.gather(
            *(store.claim(task(f"job{n}"), 1, 60.0, deadline=now) for n in range(300))
        )
        assert won == [True] * 300
        await asyncio.gather(
            *(store.record_run(task(f"job{n}"), 1, now, 0.001) for n in range(300))
        )
        last = await store.status(task("job299"))
        assert last.last_success is not None
        assert last.last_success.tick == 1
