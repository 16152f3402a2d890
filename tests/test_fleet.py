"""The loop and its claim store (issue 14): the deadline it passes, the runs it records, the
missed tick it catches up, and what decoration refuses. Under a FakeClock, on a real SQLite file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from repeat_every import repeat_at, repeat_every
from repeat_every.stores import SQLiteClaimStore
from repeat_every.testing import FakeClock

START = dt.datetime(2031, 3, 4, 5, 6, 0, tzinfo=dt.timezone.utc)
START_KEY = int(START.timestamp())  # the key of the 1-second tick at START
DAY_START = dt.datetime(2031, 3, 4, 9, 2, tzinfo=dt.timezone.utc)  # two minutes after 09:00
NINE = int(dt.datetime(2031, 3, 4, 9, 0, tzinfo=dt.timezone.utc).timestamp())


async def _noop() -> None:
    pass


class Recording:
    """A store of repeat_every.stores, seen through: every claim's arguments are kept."""

    def __init__(self, store: SQLiteClaimStore) -> None:
        self.store = store
        self.claims: list[tuple[int, float, float | None]] = []

    async def claim(
        self, task: str, tick: int, ttl: float, *, deadline: float | None = None
    ) -> bool:
        self.claims.append((tick, ttl, deadline))
        return await self.store.claim(task, tick, ttl, deadline=deadline)


class OldStyle:
    """A store written for the 3-argument protocol: it never gets a deadline."""

    def __init__(self, store: SQLiteClaimStore) -> None:
        self.store = store
        self.claims: list[int] = []

    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        self.claims.append(tick)
        return await self.store.claim(task, tick, ttl)


async def _first_sleep(clock: FakeClock) -> None:
    """Wait (real time) until a task with its own sleep has made itself known to the clock."""
    limit = time.monotonic() + 5
    while not clock.deadlines:
        assert time.monotonic() < limit
        await asyncio.sleep(0.005)


# -- the deadline ----------------------------------------------------------------------------


async def test_every_claim_carries_the_ticks_deadline_computed_from_its_key(
    tmp_path: Path,
) -> None:
    # The worker's loop is late for every tick (its sleeps last 0.3 s longer than asked): the
    # deadline it passes is still the tick's due instant, key × period, not when it woke up.
    store = SQLiteClaimStore(tmp_path / "claims.db")
    seen = Recording(store)
    with FakeClock(start=START) as clock:

        def late_sleep(seconds: float) -> Any:
            return clock.sleep(seconds + 0.3)

        @repeat_every(
            seconds=2, store=seen, claim_ttl=5, name="late", clock=clock.monotonic, sleep=late_sleep
        )
        async def job() -> None:
            pass

        handle = job()
        await _first_sleep(clock)
        await clock.advance(9)
        await handle.aclose()
    await store.aclose()
    assert len(seen.claims) >= 4
    for tick, ttl, deadline in seen.claims:
        assert deadline == tick * 2.0
        assert ttl == 5.0
    assert seen.claims[0][0] == START_KEY // 2


async def test_a_cron_claim_carries_the_fire_time_as_its_deadline(tmp_path: Path) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")
    seen = Recording(store)
    with FakeClock(start=DAY_START) as clock:

        @repeat_at(cron="*/5 * * * *", store=seen, name="five")
        async def job() -> None:
            pass

        handle = job()
        await clock.advance(11 * 60)
        await handle.aclose()
    await store.aclose()
    assert [(tick - NINE, deadline) for tick, _, deadline in seen.claims] == [
        (300, float(NINE + 300)),
        (600, float(NINE + 600)),
    ]


async def test_a_three_argument_store_still_works_and_gets_no_deadline(tmp_path: Path) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")
    old = OldStyle(store)
    ran: list[float] = []
    with FakeClock(start=START) as clock:

        @repeat_every(seconds=1, store=old, name="old")
        async def job() -> None:
            ran.append(clock.now)

        handle = job()
        await clock.advance(3)
        await handle.aclose()
    await store.aclose()
    assert ran == [0.0, 1.0, 2.0, 3.0]
    assert old.claims == [START_KEY + i for i in range(4)]


async def test_without_a_deadline_a_jitter_that_makes_the_claim_late_skips_the_tick(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A 3-argument store cannot refuse a late claim itself, so the loop checks lateness after
    # the jitter, right before claiming: a jitter wait stretched to half the ttl or more (a
    # stalled loop) skips the tick instead of claiming it after the others' claims may have
    # expired. The loop wakes on time for every tick; only its jitter waits are stretched.
    store = SQLiteClaimStore(tmp_path / "claims.db")
    old = OldStyle(store)
    ran: list[float] = []
    with FakeClock(start=START) as clock:

        def stalled_sleep(seconds: float) -> Any:
            return clock.sleep(seconds + 2.0 if seconds < 2 else seconds)  # jitter < 2 s

        @repeat_every(
            seconds=10,
            store=old,
            name="jittered",
            jitter=2,
            claim_ttl=4,
            clock=clock.monotonic,
            sleep=stalled_sleep,
        )
        async def job() -> None:
            ran.append(clock.now)

        handle = job()
        await _first_sleep(clock)
        await clock.advance(25)
        await handle.aclose()
    await store.aclose()
    assert old.claims == []
    assert ran == []
    assert handle.skipped == 3
    warnings = [r for r in caplog.records if "after tick" in r.getMessage()]
    assert len(warnings) == 3


# -- run records -----------------------------------------------------------------------------


async def test_each_run_is_recorded_in_the_store_success_and_failure(tmp_path: Path) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")
    calls = [0]
    with FakeClock(start=START) as clock:

        @repeat_every(seconds=10, store=store, name="recorded")
        async def job() -> None:
            calls[0] += 1
            await asyncio.sleep(1.5)
            if calls[0] == 2:
                raise RuntimeError("disk full")

        handle = job()
        await clock.advance(25)
        await handle.aclose()
    status = await store.status("recorded")
    await store.aclose()
    first = START_KEY // 10
    assert status.last_claim is not None
    assert status.last_claim.tick == first + 2
    assert status.last_success is not None
    assert status.last_failure is not None
    assert status.last_success.tick == first + 2
    assert status.last_success.started_at == START + dt.timedelta(seconds=20)
    assert status.last_success.duration == pytest.approx(1.5)
    assert status.last_success.error is None
    assert status.last_failure.tick == first + 1
    assert status.last_failure.started_at == START + dt.timedelta(seconds=10)
    assert status.last_failure.error == "RuntimeError: disk full"
    assert handle.runs == 3
    assert handle.failures == 1


async def test_a_store_that_fails_to_record_a_run_is_logged_and_the_loop_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Forgetful(Recording):
        async def record_run(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("store went away")

    store = SQLiteClaimStore(tmp_path / "claims.db")
    ran: list[float] = []
    with FakeClock(start=START) as clock:

        @repeat_every(seconds=1, store=Forgetful(store), name="forgetful")
        async def job() -> None:
            ran.append(clock.now)

        handle = job()
        await clock.advance(2)
        await handle.aclose()
    await store.aclose()
    assert ran == [0.0, 1.0, 2.0]
    assert handle.failures == 0
    warnings = [r for r in caplog.records if "could not write the run record" in r.getMessage()]
    assert len(warnings) == 3
    assert warnings[0].levelno == logging.WARNING


# -- catch-up --------------------------------------------------------------------------------


def _daily(store: SQLiteClaimStore, ran: list[tuple[str, float]], who: str, **kw: Any) -> Any:
    @repeat_at(cron="0 9 * * *", store=store, name="daily-report", **kw)
    async def report() -> None:
        ran.append((who, asyncio.get_running_loop().time()))

    return report


async def test_a_daily_job_missed_while_down_runs_once_after_restart_with_catch_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Up at 09:02: the 09:00 run was missed (nobody claimed it); within the 10-minute grace.
    store = SQLiteClaimStore(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=DAY_START) as clock:
        handle = _daily(store, ran, "w", catch_up=True, misfire_grace=600)()
        await clock.advance(60)
        assert len(ran) == 1  # at start, not at 09:00 tomorrow
        await clock.advance(dt.timedelta(days=1))  # and the next day at 09:00, as usual
        await handle.aclose()
    status = await store.status("daily-report")
    await store.aclose()
    assert len(ran) == 2
    assert status.last_claim is not None
    assert status.last_claim.tick == NINE + 86_400
    assert status.last_success is not None
    [warning] = [r for r in caplog.records if "was missed" in r.getMessage()]
    assert f"tick {NINE} was missed (no worker claimed it) 120 s ago" in warning.getMessage()


async def test_without_catch_up_the_missed_daily_job_does_not_run(tmp_path: Path) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    with FakeClock(start=DAY_START) as clock:
        handle = _daily(store, ran, "w")()
        await clock.advance(dt.timedelta(hours=23))
        await handle.aclose()
    await store.aclose()
    assert ran == []


async def test_three_workers_started_together_catch_the_missed_tick_up_once(
    tmp_path: Path,
) -> None:
    # Three "processes": three store instances on one file, started in the same instant.
    stores = [SQLiteClaimStore(tmp_path / "claims.db") for _ in range(3)]
    ran: list[tuple[str, float]] = []
    with FakeClock(start=DAY_START) as clock:
        tasks = [
            _daily(s, ran, f"w{i}", catch_up=True, misfire_grace=600) for i, s in enumerate(stores)
        ]
        handles = [task() for task in tasks]
        await clock.advance(dt.timedelta(hours=1))
        for handle in handles:
            await handle.aclose()
    for store in stores:
        await store.aclose()
    assert len(ran) == 1
    assert sum(h.runs for h in handles) == 1
    assert sum(h.elsewhere for h in handles) == 0  # catch-up is not a regular tick


async def test_a_tick_run_before_the_restart_or_older_than_the_grace_is_not_caught_up(
    tmp_path: Path,
) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")
    ran: list[tuple[str, float]] = []
    # The service ran 09:00 and was restarted at 09:02: nothing to catch up.
    with FakeClock(start=DAY_START - dt.timedelta(minutes=3)) as clock:
        handle = _daily(store, ran, "before")()
        await clock.advance(90)
        await handle.aclose()
    assert [who for who, _ in ran] == ["before"]
    with FakeClock(start=DAY_START) as clock:
        handle = _daily(store, ran, "after", catch_up=True, misfire_grace=600)()
        await clock.advance(60)
        await handle.aclose()
    assert [who for who, _ in ran] == ["before"]
    # Down at 09:00, up at 09:02, but a grace of one minute: too old to run.
    other = SQLiteClaimStore(tmp_path / "other.db")
    with FakeClock(start=DAY_START) as clock:
        handle = _daily(other, ran, "late", catch_up=True, misfire_grace=60)()
        await clock.advance(60)
        await handle.aclose()
    await store.aclose()
    await other.aclose()
    assert [who for who, _ in ran] == ["before"]


async def test_an_interval_task_catches_up_the_tick_it_missed(tmp_path: Path) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")
    ran: list[float] = []
    with FakeClock(start=START + dt.timedelta(seconds=20)) as clock:  # minute tick at START

        @repeat_every(seconds=60, store=store, name="minutely", catch_up=True, misfire_grace=30)
        async def job() -> None:
            ran.append(clock.now)

        handle = job()
        await clock.advance(45)
        await handle.aclose()
    status = await store.status("minutely")
    await store.aclose()
    assert ran == [0.0, 40.0]  # the missed tick at once, then the next minute
    assert status.last_success is not None
    assert status.last_success.tick == START_KEY // 60 + 1


# -- decoration ------------------------------------------------------------------------------


class _Store:
    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        return True


@pytest.mark.parametrize("name", ["two\nlines", "nul\x00", "x" * 1001])
def test_a_task_name_no_store_can_keep_is_refused_naming_name(name: str) -> None:
    with pytest.raises(ValueError, match=r"^name must"):
        repeat_every(seconds=1, store=_Store(), name=name)(_noop)
    repeat_every(seconds=1, name=name)(_noop)  # without a store the name is only a label


def test_the_store_class_instead_of_an_instance_is_refused() -> None:
    with pytest.raises(TypeError, match=r"store must be a claim store instance, not the class"):
        repeat_every(seconds=1, store=SQLiteClaimStore)  # type: ignore[arg-type]


def test_a_store_whose_claim_is_not_async_is_refused() -> None:
    class Sync:
        def claim(self, task: str, tick: int, ttl: float) -> bool:
            return True

    with pytest.raises(TypeError, match=r"store.claim must be a coroutine function.*async def"):
        repeat_every(seconds=1, store=Sync())  # type: ignore[arg-type]


def test_a_claim_ttl_below_a_tenth_of_a_second_is_refused() -> None:
    with pytest.raises(ValueError, match=r"claim_ttl must be at least 0.1 s, got 1e-09 s"):
        repeat_every(seconds=1, store=_Store(), claim_ttl=1e-9)
    repeat_every(seconds=1, store=_Store(), claim_ttl=0.1)


def test_catch_up_needs_a_store_that_remembers_and_a_grace() -> None:
    with pytest.raises(ValueError, match=r"catch_up=True needs a store"):
        repeat_every(seconds=1, catch_up=True, misfire_grace=1)
    with pytest.raises(TypeError, match=r"catch_up=True needs a store whose claim takes"):
        repeat_every(seconds=1, store=_Store(), catch_up=True, misfire_grace=1)
    store = SQLiteClaimStore("unused.db")
    with pytest.raises(ValueError, match=r"catch_up=True needs misfire_grace"):
        repeat_every(seconds=1, store=store, catch_up=True)
    with pytest.raises(ValueError, match=r"misfire_grace .* give catch_up=True"):
        repeat_every(seconds=1, store=store, misfire_grace=5)
    with pytest.raises(TypeError, match=r"catch_up must be True or False"):
        repeat_every(seconds=1, store=store, catch_up=1, misfire_grace=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"misfire_grace must"):
        repeat_every(seconds=1, store=store, catch_up=True, misfire_grace=-1)


async def test_the_catch_up_example_of_the_docs_runs_the_missed_tick_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (Path(__file__).parent.parent / "docs" / "many-workers.md").read_text()
    block = text.split("<!-- catch-up-example -->\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # the example's store is "claims.db"
    namespace: dict[str, Any] = {}
    exec(compile(block, "many-workers.md", "exec"), namespace)
    with FakeClock(start=DAY_START) as clock:
        handle = namespace["send_daily_report"]()
        await clock.advance(60)
        await handle.aclose()
    claims = namespace["claims"]
    status = await claims.status(handle.name)
    await claims.aclose()
    assert handle.runs == 1
    assert status.last_success is not None
    assert status.last_success.tick == NINE


async def test_a_weekly_job_down_for_two_days_is_caught_up_within_a_three_day_grace(
    tmp_path: Path,
) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")
    monday = dt.datetime(2031, 3, 3, 8, 0, tzinfo=dt.timezone.utc)  # a Monday
    with FakeClock(start=monday + dt.timedelta(days=2)) as clock:

        @repeat_at(
            cron="0 8 * * MON", store=store, name="weekly", catch_up=True, misfire_grace=3 * 86_400
        )
        async def weekly() -> None:
            pass

        handle = weekly()
        await clock.advance(60)
        await handle.aclose()
    status = await store.status("weekly")
    await store.aclose()
    assert handle.runs == 1
    assert status.last_success is not None
    assert status.last_success.tick == int(monday.timestamp())


async def test_a_store_failing_during_catch_up_is_logged_and_the_regular_ticks_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Amnesic(SQLiteClaimStore):
        async def status(self, task: str) -> Any:
            raise ConnectionError("store went away")

    store = Amnesic(tmp_path / "claims.db")
    with FakeClock(start=START + dt.timedelta(seconds=20)) as clock:

        @repeat_every(seconds=60, store=store, name="amnesic", catch_up=True, misfire_grace=30)
        async def job() -> None:
            pass

        handle = job()
        await clock.advance(45)
        await handle.aclose()
    await store.aclose()
    assert handle.runs == 1  # the regular tick at START + 60 s only
    [error] = [r for r in caplog.records if "is not caught up" in r.getMessage()]
    assert error.levelno == logging.ERROR
