"""Tasks of one store due at the same instant claim together (issue 14, many jobs on one store).

The first task to wake claims its peers' ticks with its own in one ``claim_many`` call; the
others find their answer when they wake. Under a FakeClock, on real SQLite files; a store is
wrapped only to count its calls or to inject a fault.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from repeat_every import TaskHandle, repeat_at, repeat_every
from repeat_every._claim_group import _GROUPS
from repeat_every.stores import SQLiteClaimStore
from repeat_every.testing import FakeClock

START = dt.datetime(2031, 3, 4, 5, 6, 0, tzinfo=dt.timezone.utc)


class Counting(SQLiteClaimStore):
    """A real SQLite store that counts how the loop calls it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.single: list[tuple[str, int]] = []
        self.many: list[list[tuple[str, int]]] = []

    async def claim(self, task: str, tick: int, ttl: float, **kwargs: Any) -> bool:
        self.single.append((task, tick))
        return await super().claim(task, tick, ttl, **kwargs)

    async def claim_many(self, claims: Sequence[tuple[str, int, float, float]]) -> list[bool]:
        self.many.append([(task, tick) for task, tick, _, _ in claims])
        return await super().claim_many(claims)


def _jobs(
    store: object, count: int, ran: list[tuple[str, float]], clock: FakeClock, **options: Any
) -> list[TaskHandle]:
    handles = []
    for i in range(count):

        def make(name: str) -> Any:
            @repeat_every(seconds=10, store=store, name=name, **options)  # type: ignore[call-overload]
            async def job() -> None:
                ran.append((name, clock.now))

            return job

        handles.append(make(f"job-{i}")())
    return handles


def _due(store: object) -> dict[int, Any]:
    """The instants the store's group still expects claims for, on the running loop."""
    groups = _GROUPS.get(asyncio.get_running_loop(), {})
    group = groups.get(id(store))
    return {} if group is None else group._due


async def test_tasks_due_at_the_same_instant_claim_in_one_call(tmp_path: Path) -> None:
    store = Counting(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = _jobs(store, 20, ran, clock)
        await clock.advance(30)
        for handle in handles:
            await handle.aclose()
    # The first tick (start) is claimed one by one: nobody slept for it yet. Every later tick:
    # one call for the 20 tasks, the waker's own tick first.
    assert len(store.many) == 3
    assert all(len(call) == 20 for call in store.many)
    assert all(len({tick for _, tick in call}) == 1 for call in store.many)
    assert len(store.single) == 20
    assert len(ran) == 20 * 4
    assert all(h.runs == 4 and h.elsewhere == 0 and h.skipped == 0 for h in handles)
    statuses = await store.statuses()
    last = START.timestamp() + 30
    assert [s.last_claim.tick * 10 for s in statuses if s.last_claim] == [last] * 20
    assert _due(store) == {}
    await store.aclose()


async def test_two_workers_each_claiming_together_run_every_tick_once(tmp_path: Path) -> None:
    # Two "processes": two store instances on one file, each with the same 30 tasks.
    stores = [Counting(tmp_path / "claims.db") for _ in range(2)]
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = [h for store in stores for h in _jobs(store, 30, ran, clock)]
        await clock.advance(100)
        for handle in handles:
            await handle.aclose()
    assert sorted(ran) == sorted({(f"job-{i}", 10.0 * k) for i in range(30) for k in range(11)})
    assert sum(h.runs for h in handles) == 30 * 11
    assert sum(h.elsewhere for h in handles) == 30 * 11
    assert all(len(call) == 30 for store in stores for call in store.many)
    for store in stores:
        await store.aclose()


async def test_a_paused_or_stopped_peer_is_not_claimed_for(tmp_path: Path) -> None:
    store = Counting(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = _jobs(store, 5, ran, clock)
        await clock.advance(5)
        handles[1].pause()
        await handles[2].aclose()
        await clock.advance(10)  # the tick at 10
        assert store.many == [[(f"job-{i}", store.many[0][0][1]) for i in (0, 3, 4)]]
        assert [name for name, at in ran if at == 10] == ["job-0", "job-3", "job-4"]
        assert handles[1].state.paused_ticks == 1
        handles[1].resume()
        await clock.advance(10)
        assert sorted(name for name, at in ran if at == 20) == ["job-0", "job-1", "job-3", "job-4"]
        for handle in handles:
            await handle.aclose()
    assert _due(store) == {}
    await store.aclose()


async def test_a_peer_paused_after_its_tick_was_claimed_skips_it(tmp_path: Path) -> None:
    # The claim stands (no other worker will run the tick), and the pause is honoured: the
    # tick is counted as paused, as when the pause comes a moment earlier.
    store = SQLiteClaimStore(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles: list[TaskHandle] = []

        @repeat_every(seconds=10, store=store, name="first")
        async def first() -> None:
            ran.append(("first", clock.now))
            if clock.now == 10:
                handles[1].pause()  # its tick was claimed with this one's, a moment ago

        @repeat_every(seconds=10, store=store, name="second")
        async def second() -> None:
            ran.append(("second", clock.now))

        handles += [first(), second()]
        await clock.advance(10)
        assert ("second", 10.0) not in ran
        assert handles[1].state.paused_ticks == 1
        for handle in handles:
            await handle.aclose()
    status = await store.status("second")
    assert status.last_claim is not None
    assert status.last_claim.tick * 10 == START.timestamp() + 10
    await store.aclose()


class Failing(SQLiteClaimStore):
    """claim_many fails (the store is unreachable), or answers the wrong number of claims."""

    def __init__(self, path: Path, answer: str) -> None:
        super().__init__(path)
        self.answer = answer

    async def claim_many(self, claims: Sequence[tuple[str, int, float, float]]) -> list[bool]:
        if self.answer == "raise":
            raise ConnectionError("store down")
        return [True]


@pytest.mark.parametrize("answer", ["raise", "short"])
@pytest.mark.parametrize("policy", ["skip", "run"])
async def test_a_failing_claim_many_applies_each_tasks_store_error_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, answer: str, policy: str
) -> None:
    store = Failing(tmp_path / "claims.db", answer)
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = _jobs(store, 3, ran, clock, on_store_error=policy)
        await clock.advance(10)
        for handle in handles:
            await handle.aclose()
    at_ten = sorted(name for name, at in ran if at == 10)
    if policy == "skip":
        assert at_ten == []
        assert [h.skipped for h in handles] == [1, 1, 1]
    else:
        assert at_ten == ["job-0", "job-1", "job-2"]
    failed = [r for r in caplog.records if "claim store failed" in r.getMessage()]
    assert len(failed) == 3
    assert {r.repeat_every_task for r in failed} == {"job-0", "job-1", "job-2"}  # type: ignore[attr-defined]
    error = failed[0].exc_info[1] if failed[0].exc_info else None
    if answer == "raise":
        assert isinstance(error, ConnectionError)
    else:
        assert isinstance(error, TypeError)
        assert "one bool per claim" in str(error)
    await store.aclose()


class Slow(SQLiteClaimStore):
    """claim_many waits until the test lets it go on (a slow network)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = asyncio.Event()
        self.go = asyncio.Event()
        self.by = ""  # the task that calls: its own claim comes first

    async def claim_many(self, claims: Sequence[tuple[str, int, float, float]]) -> list[bool]:
        self.by = claims[0][0]
        self.entered.set()
        await self.go.wait()
        return await super().claim_many(claims)


async def test_peers_that_wake_during_a_slow_claim_wait_for_its_answer(tmp_path: Path) -> None:
    store = Slow(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = _jobs(store, 3, ran, clock)
        await clock.advance(1)
        stepping = asyncio.ensure_future(clock.advance(9))
        await asyncio.wait_for(store.entered.wait(), 5)
        for _ in range(10):  # turns of the event loop: the peers wake, find the call going
            await asyncio.sleep(0)
        assert sorted(name for name, at in ran if at == 10) == []
        store.go.set()
        await stepping
        assert sorted(name for name, at in ran if at == 10) == ["job-0", "job-1", "job-2"]
        for handle in handles:
            await handle.aclose()
    await store.aclose()


async def test_peers_claim_alone_when_the_claiming_task_is_cancelled_meanwhile(
    tmp_path: Path,
) -> None:
    store = Slow(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = _jobs(store, 3, ran, clock)
        await clock.advance(1)
        stepping = asyncio.ensure_future(clock.advance(9))
        await asyncio.wait_for(store.entered.wait(), 5)
        claimer = next(h for h in handles if h.name == store.by)
        claimer.cancel()
        await stepping
        others = sorted(name for name, at in ran if at == 10)
        assert others == sorted(h.name for h in handles if h is not claimer)
        for handle in handles:
            await handle.aclose()
    await store.aclose()


async def test_with_a_jitter_each_task_claims_alone(tmp_path: Path) -> None:
    store = Counting(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = _jobs(store, 4, ran, clock, jitter=1)
        await clock.advance(35)
        for handle in handles:
            await handle.aclose()
    assert store.many == []
    assert len(store.single) == 4 * 4
    await store.aclose()


@pytest.mark.fake_clock(start=dt.datetime(2031, 3, 4, 8, 59, tzinfo=dt.timezone.utc))
async def test_cron_and_interval_tasks_due_at_the_same_instant_claim_together(
    fake_clock: FakeClock, tmp_path: Path
) -> None:
    store = Counting(tmp_path / "claims.db")

    @repeat_at(cron="0 9 * * *", store=store, name="daily")
    async def daily() -> None:
        pass

    @repeat_every(seconds=3600, store=store, name="hourly")
    async def hourly() -> None:
        pass

    handles = [daily(), hourly()]
    await fake_clock.advance(120)
    nine = int(dt.datetime(2031, 3, 4, 9, 0, tzinfo=dt.timezone.utc).timestamp())
    assert [sorted(call) for call in store.many] == [[("daily", nine), ("hourly", nine // 3600)]]
    for handle in handles:
        await handle.aclose()
    await store.aclose()


async def test_stopping_and_rescheduling_leave_nothing_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "repeat_every")
    store = Counting(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = _jobs(store, 3, ran, clock)
        await clock.advance(5)
        assert len(_due(store)) == 1
        handles[0].reschedule(seconds=20)
        handles[1].pause()
        await clock.advance(10)
        handles[2].stop()
        await handles[2].wait()
        await handles[0].aclose()
        await handles[1].aclose()
        assert _due(store) == {}
    assert caplog.records == []
    await store.aclose()


async def test_sqlite_claim_many_answers_as_claims_one_by_one_would(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    store = SQLiteClaimStore(tmp_path / "claims.db")
    assert await store.claim("live", 1, 60.0, deadline=now)
    assert await store.claim("expired", 1, 0.02)  # lives 20 ms from now
    await asyncio.sleep(0.05)
    assert await store.claim_many([]) == []
    won = await store.claim_many(
        [
            ("new", 1, 60.0, now),
            ("live", 1, 60.0, now),  # claimed already, alive
            ("expired", 1, 60.0, now),  # the old claim expired: taken over
            ("late", 1, 1.0, now - 5),  # past deadline + ttl: loses without a claim
            ("new", 1, 60.0, now),  # twice in one call: the second loses
            ("new", 2, 60.0, now),
        ]
    )
    assert won == [True, False, True, False, False, True]
    # The won claims are noted as each task's last claim (written with the next writes;
    # status() writes what is queued first).
    statuses = {s.task: s for s in await store.statuses()}
    assert statuses["new"].last_claim is not None
    assert statuses["new"].last_claim.tick == 2
    assert statuses["expired"].last_claim is not None
    assert "late" not in statuses
    with pytest.raises(ValueError, match="ttl"):
        await store.claim_many([("ok", 1, 60.0, now), ("bad", 1, -1.0, now)])
    assert (await store.status("ok")).last_claim is None  # nothing reached the file
    await store.aclose()


class DictStore:
    """A store of one's own, as docs/many-workers.md describes it: claim with a deadline, and
    claim_many."""

    def __init__(self) -> None:
        self.claimed: set[tuple[str, int]] = set()
        self.calls: list[int] = []

    async def claim(self, task: str, tick: int, ttl: float, *, deadline: float) -> bool:
        return self._one(task, tick)

    async def claim_many(self, claims: Sequence[tuple[str, int, float, float]]) -> list[bool]:
        self.calls.append(len(claims))
        return [self._one(task, tick) for task, tick, _, _ in claims]

    def _one(self, task: str, tick: int) -> bool:
        if (task, tick) in self.claimed:
            return False
        self.claimed.add((task, tick))
        return True


async def test_a_store_of_ones_own_with_claim_many_is_called_with_every_due_tick() -> None:
    store = DictStore()
    ran: list[tuple[str, float]] = []
    with FakeClock(start=START) as clock:
        handles = _jobs(store, 7, ran, clock)
        await clock.advance(20)
        for handle in handles:
            await handle.aclose()
    assert store.calls == [7, 7]
    assert len(ran) == 7 * 3
