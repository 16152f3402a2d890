"""repeat_at: cron expressions in a time zone, across DST changes, under the fake clock.

The DST dates are real: in 2026 Europe/Paris springs forward on Sunday 29 March (02:00 CET
becomes 03:00 CEST) and falls back on Sunday 25 October (03:00 CEST becomes 02:00 CET).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast
from zoneinfo import ZoneInfo

import pytest

from repeat_every import Retry, RunRecord, repeat_at
from repeat_every._cron import Cron
from repeat_every._schedule import NS
from repeat_every.testing import FakeClock

if TYPE_CHECKING:
    from repeat_every._timebase import Timebase

UTC = dt.timezone.utc
PARIS = ZoneInfo("Europe/Paris")
HOUR = 3600.0


class Boom(Exception):
    """The failure jobs raise in these tests."""


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=UTC)


def local(record: RunRecord, zone: dt.tzinfo = PARIS) -> dt.datetime:
    """The wall-clock instant an attempt started, in ``zone``."""
    return dt.datetime.fromtimestamp(record.wall, zone)


def noop() -> None:
    pass


# -- the decorator: arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("61 * * * *", r"cron '61 \* \* \* \*' is not a valid cron expression \(Bad minute\)"),
        ("0 25 * * *", r"\(Bad hour\)"),
        ("0 9 * * FOO", r"\(Bad day-of-week\)"),
        ("0 9 30 2 *", r"\(Bad day-of-month\)"),
        ("5-1 * * * *", r"\(Bad minute\)"),
        ("0 9 * *", r"has 4 field\(s\); write five: minute hour day-of-month month day-of-week"),
        ("", r"has 0 field\(s\); write five"),
        ("0 0 9 * * MON-FRI", r"has 6 field\(s\).*seconds are not supported.*align=True"),
        ("@reboot", r"cron '@reboot' is not a macro repeat_at knows; use one of @yearly"),
    ],
)
def test_invalid_cron_is_a_value_error_naming_cron_and_the_fix(cron: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        repeat_at(cron=cron)


def test_cron_that_is_not_a_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"cron must be a string such as '0 9 \* \* MON-FRI'"):
        repeat_at(cron=0)  # type: ignore[arg-type]


def test_missing_cron_says_how_to_write_it() -> None:
    with pytest.raises(TypeError, match=r"repeat_at needs a cron expression: write @repeat_at"):
        repeat_at()


def test_bare_decorator_says_to_call_it_with_arguments() -> None:
    with pytest.raises(TypeError, match=r"repeat_at must be called with its arguments"):
        repeat_at(noop)


@pytest.mark.parametrize("tz", ["Europe/Pariss", "Mars/Olympus_Mons", "", "../etc/passwd"])
def test_unknown_time_zone_is_a_value_error_naming_tz(tz: str) -> None:
    with pytest.raises(ValueError, match=r"^tz .* is not a known IANA time zone; write a name"):
        repeat_at(cron="0 9 * * *", tz=tz)


def test_time_zone_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"tz must be a time-zone name such as 'Europe/Paris'"):
        repeat_at(cron="0 9 * * *", tz=1)  # type: ignore[arg-type]


def test_default_time_zone_is_utc() -> None:
    task = repeat_at(cron="0 9 * * *")(noop)
    schedule = cast(Cron, task.schedule)
    assert schedule.tz == ZoneInfo("UTC")
    assert schedule.next_after(utc(2026, 7, 1, 12)) == utc(2026, 7, 2, 9)


@pytest.mark.parametrize("tz", [PARIS, dt.timezone(dt.timedelta(hours=-5)), UTC])
def test_tzinfo_objects_are_accepted_as_tz(tz: dt.tzinfo) -> None:
    schedule = cast(Cron, repeat_at(cron="0 9 * * *", tz=tz)(noop).schedule)
    assert schedule.tz is tz
    assert schedule.next_after(utc(2026, 1, 1)) == dt.datetime(2026, 1, 1, 9, tzinfo=tz)


def test_a_pytz_zone_is_read_as_the_zoneinfo_zone_of_the_same_name() -> None:
    pytz = pytest.importorskip("pytz")
    schedule = cast(
        Cron, repeat_at(cron="0 9 * * *", tz=pytz.timezone("Europe/Paris"))(noop).schedule
    )
    assert schedule.tz == PARIS
    # pytz's zone used directly would read 09:00 in local mean time (UTC+00:09).
    assert schedule.next_after(utc(2026, 1, 1)) == utc(2026, 1, 1, 8)


def test_a_naive_datetime_given_to_next_after_is_read_as_utc() -> None:
    schedule = Cron("0 9 * * *", PARIS)
    assert schedule.next_after(dt.datetime(2026, 1, 1, 8, 30)) == utc(2026, 1, 2, 8)


def test_cron_schedule_needs_a_tzinfo_not_a_name() -> None:
    with pytest.raises(TypeError, match=r"Cron\(tz=\.\.\.\) must be a datetime\.tzinfo"):
        Cron("0 9 * * *", "Europe/Paris")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("macro", "fields"),
    [("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@WEEKLY", "0 0 * * 0")],
)
def test_macros_are_their_five_field_expansions(macro: str, fields: str) -> None:
    schedule = cast(Cron, repeat_at(cron=macro)(noop).schedule)
    assert schedule.fields == fields
    assert schedule.describe() == f"cron {macro!r} in UTC"


def test_names_are_read_in_any_case_and_extra_spaces_are_ignored() -> None:
    schedule = cast(Cron, repeat_at(cron="  0  9 * *   mon-fri ", tz="Europe/Paris")(noop).schedule)
    assert schedule.fields == "0 9 * * mon-fri"
    assert schedule.next_after(utc(2026, 3, 27, 12)) == dt.datetime(2026, 3, 30, 9, tzinfo=PARIS)


def test_jitter_as_long_as_the_shortest_gap_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"jitter must be shorter than the shortest gap between two fire times of "
        r"cron '0,1 9 \* \* \*' in UTC \(60 s\), got 60 s",
    ):
        repeat_at(cron="0,1 9 * * *", jitter=60)
    repeat_at(cron="0,1 9 * * *", jitter=59.9)


def test_the_shared_arguments_are_checked_as_for_repeat_every() -> None:
    with pytest.raises(ValueError, match=r"timeout must be finite and > 0"):
        repeat_at(cron="@daily", timeout=0)
    with pytest.raises(TypeError, match=r"retry must be a repeat_every\.Retry"):
        repeat_at(cron="@daily", retry=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_repetitions must be an int ≥ 1"):
        repeat_at(cron="@daily", max_repetitions=0)


def test_import_repeat_every_does_not_import_the_cron_library() -> None:
    code = "import sys, repeat_every; print('cronsim' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


# -- running across DST changes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "dates", "weekend_hours"),
    [
        # Wed 25 March → Wed 1 April 2026: Friday's 09:00 is CET (08:00Z), Monday's CEST (07:00Z).
        (utc(2026, 3, 25), ["03-25", "03-26", "03-27", "03-30", "03-31", "04-01"], 71),
        # Wed 21 October → Wed 28 October 2026: Friday's 09:00 is CEST, Monday's CET.
        (utc(2026, 10, 21), ["10-21", "10-22", "10-23", "10-26", "10-27", "10-28"], 73),
    ],
)
async def test_weekday_nine_oclock_paris_runs_at_nine_local_every_weekday_across_dst(
    start: dt.datetime, dates: list[str], weekend_hours: int
) -> None:
    seen_now: list[dt.datetime] = []

    @repeat_at(cron="0 9 * * MON-FRI", tz="Europe/Paris", name="digest")
    def digest() -> None:
        seen_now.append(dt.datetime.now(PARIS))

    with FakeClock(start=start) as clock:
        handle = digest()
        await clock.advance(8 * 24 * HOUR)
        handle.cancel()
    records = clock.history.of("digest")
    assert [f"{local(r):%m-%d %H:%M:%S}" for r in records] == [f"{d} 09:00:00" for d in dates]
    assert all(local(r).weekday() < 5 for r in records)
    assert [f"{t:%m-%d %H:%M:%S}" for t in seen_now] == [f"{d} 09:00:00" for d in dates]
    gaps = [b.started - a.started for a, b in itertools.pairwise(records)]
    assert gaps == [24 * HOUR, 24 * HOUR, weekend_hours * HOUR, 24 * HOUR, 24 * HOUR]
    assert handle.runs == 6
    assert handle.skipped == 0


async def test_a_time_that_does_not_exist_runs_once_right_after_the_spring_forward_gap() -> None:
    @repeat_at(cron="30 2 * * *", tz="Europe/Paris", name="nightly")
    def nightly() -> None:
        pass

    with FakeClock(start=utc(2026, 3, 28, 12)) as clock:
        handle = nightly()
        await clock.advance(2 * 24 * HOUR)
        handle.cancel()
    records = clock.history.of("nightly")
    # 29 March has no 02:30 in Paris: the run is at 03:00 CEST, the first instant after it.
    assert [local(r).isoformat() for r in records] == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
    ]
    assert [r.started for r in records] == [13 * HOUR, 36.5 * HOUR]


async def test_a_time_that_happens_twice_runs_once_at_its_first_occurrence() -> None:
    @repeat_at(cron="30 2 * * *", tz="Europe/Paris", name="nightly")
    def nightly() -> None:
        pass

    with FakeClock(start=utc(2026, 10, 24, 12)) as clock:
        handle = nightly()
        await clock.advance(2 * 24 * HOUR)
        handle.cancel()
    records = clock.history.of("nightly")
    # 25 October has 02:30 CEST (00:30Z) and, an hour later, 02:30 CET (01:30Z): one run.
    assert [local(r).isoformat() for r in records] == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
    ]
    assert [r.started for r in records] == [12.5 * HOUR, 37.5 * HOUR]


async def test_starting_inside_the_repeated_hour_after_its_first_pass_waits_for_the_next_day() -> (
    None
):
    @repeat_at(cron="30 2 * * *", tz="Europe/Paris", name="nightly")
    def nightly() -> None:
        pass

    # 01:10Z on 25 October is 02:10 CET, the second 02:10 of the night: 02:30 already ran once.
    with FakeClock(start=utc(2026, 10, 25, 1, 10)) as clock:
        handle = nightly()
        await clock.advance(0)
        assert handle.state.next_run_at == utc(2026, 10, 26, 1, 30)
        await clock.advance(25 * HOUR)
        handle.cancel()
    assert [local(r).isoformat() for r in clock.history.of("nightly")] == [
        "2026-10-26T02:30:00+01:00"
    ]


async def test_an_hourly_job_follows_elapsed_time_across_both_dst_changes() -> None:
    hourly = repeat_at(cron="0 * * * *", tz="Europe/Paris", name="hourly")(noop)
    local_hours: list[str] = []
    for start in (utc(2026, 3, 28, 23, 30), utc(2026, 10, 24, 22, 30)):
        with FakeClock(start=start) as clock:
            handle = hourly()
            await clock.advance(4 * HOUR)
            await handle.aclose()
        records = clock.history.of("hourly")
        # One run every real hour, whatever the local clock says.
        assert [b.started - a.started for a, b in itertools.pairwise(records)] == [HOUR] * 3
        local_hours.append(" ".join(f"{local(r):%H:%M%z}" for r in records))
    assert local_hours == [
        "01:00+0100 03:00+0200 04:00+0200 05:00+0200",  # no 02:00 on 29 March
        "01:00+0200 02:00+0200 02:00+0100 03:00+0100",  # 02:00 twice on 25 October
    ]


@pytest.fixture
def machine_in_new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone is New York for the test."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("machine_in_new_york")
async def test_cron_runs_in_the_zone_given_not_the_machines() -> None:

    @repeat_at(cron="0 9 * * *", tz="Asia/Tokyo", name="tokyo")
    def tokyo() -> None:
        pass

    with FakeClock(start=utc(2026, 1, 1, 1)) as clock:
        handle = tokyo()
        await clock.advance(24 * HOUR)
        handle.cancel()
    assert [local(r, UTC).isoformat() for r in clock.history.of("tokyo")] == [
        "2026-01-02T00:00:00+00:00"  # 09:00 in Tokyo (UTC+9)
    ]


# -- failures, retries, skipped fire times ---------------------------------------------------


async def test_a_retry_never_runs_past_the_next_fire_time(caplog: pytest.LogCaptureFixture) -> None:
    @repeat_at(cron="* * * * *", retry=Retry(attempts=5, backoff=20, multiplier=2), name="m")
    async def job() -> None:
        raise Boom

    with FakeClock(start=utc(2026, 1, 1)) as clock:
        handle = job()
        await clock.advance(90)
        handle.cancel()
    # Minute 0: attempts at 0 and 20; the next wait (40 s) would end at 60, the next fire time.
    records = clock.history.of("m")
    assert [(r.index, r.attempt, r.started) for r in records] == [
        (0, 1, 0.0),
        (0, 2, 20.0),
        (1, 1, 60.0),
        (1, 2, 80.0),
    ]
    # Minute 1 likewise: by 90 s its second attempt has failed, and no third one will come.
    assert (handle.runs, handle.failures, handle.retries) == (2, 2, 2)
    assert "m: no retry of attempt 2: the next tick comes first" in caplog.messages


async def test_a_run_longer_than_the_gap_skips_fire_times_and_counts_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    slow = True

    @repeat_at(cron="*/10 * * * *", name="report")
    async def report() -> None:
        nonlocal slow
        if slow:
            slow = False
            await clock.sleep(25 * 60)  # 00:00 → 00:25: the 00:10 and 00:20 runs are skipped

    with FakeClock(start=utc(2026, 1, 1)) as clock:
        handle = report()
        await clock.advance(40 * 60)
        handle.cancel()
    assert [f"{local(r, UTC):%H:%M}" for r in clock.history.of("report")] == [
        "00:00",
        "00:30",
        "00:40",
    ]
    assert [r.index for r in clock.history.of("report")] == [0, 1, 2]  # runs, not ticks
    assert handle.skipped == 2
    assert "report: the run took longer than its period; skipped 2 tick(s)" in caplog.messages
    assert any(r.levelno == logging.WARNING for r in caplog.records)


class _MemoryStore:
    """A claim store in a dict: the first claim of (task, tick) wins."""

    def __init__(self) -> None:
        self.claims: dict[tuple[str, int], int] = {}

    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        self.claims.setdefault((task, tick), 0)
        self.claims[(task, tick)] += 1
        return self.claims[(task, tick)] == 1


async def test_ticks_are_keyed_by_their_fire_time_so_a_shared_store_runs_each_once() -> None:
    store = _MemoryStore()
    runs: list[str] = []

    def make(worker: str) -> None:
        runs.append(worker)

    tasks = [
        repeat_at(cron="0 9 * * *", tz="Europe/Paris", store=store, name="digest")(
            lambda w=w: make(w)  # type: ignore[misc]
        )
        for w in ("a", "b")
    ]
    with FakeClock(start=utc(2026, 3, 28)) as clock:
        handles = [task() for task in tasks]
        await clock.advance(3 * 24 * HOUR)
        for handle in handles:
            handle.cancel()
    assert len(runs) == 3
    assert sorted(store.claims) == [
        ("digest", int(utc(2026, 3, 28, 8).timestamp())),  # 09:00 CET
        ("digest", int(utc(2026, 3, 29, 7).timestamp())),  # 09:00 CEST
        ("digest", int(utc(2026, 3, 30, 7).timestamp())),
    ]
    assert set(store.claims.values()) == {2}  # both workers asked; one ran each
    assert sum(h.elsewhere for h in handles) == 3


# -- the plan: wall-clock steps ----------------------------------------------------------------


class _Wall:
    """A wall clock a test sets by hand (the only part of a timebase a cron plan reads)."""

    def __init__(self, when: dt.datetime) -> None:
        self.seconds = when.timestamp()

    def wall(self) -> float:
        return self.seconds


def test_wall_clock_steps_back_delay_the_run_and_steps_forward_skip_fire_times() -> None:
    wall = _Wall(utc(2026, 1, 1, 8))  # 09:00 in Paris is 08:00Z: due now
    plan = Cron("0 9 * * *", PARIS).plan(cast("Timebase", wall))
    wall.seconds -= HOUR  # 07:00Z at monotonic instant 0
    tick = plan.first(0)
    assert (tick.deadline, tick.key) == (HOUR * NS, int(utc(2026, 1, 1, 8).timestamp()))
    wall.seconds -= 1800  # the wall clock steps back half an hour while the task sleeps
    assert plan.remaining(tick, 0) == 1.5 * HOUR * NS
    wall.seconds += 3 * 24 * HOUR  # then leaps three days ahead
    assert plan.remaining(tick, 0) == 0
    nxt, skipped = plan.after(tick, 0)
    assert skipped == 2  # 2 and 3 January at 09:00 went by during the leap
    assert nxt.index == 3
    assert nxt.key == int(utc(2026, 1, 4, 8).timestamp())
    assert plan.following(nxt) == nxt.deadline + 24 * HOUR * NS


def test_counting_skipped_fire_times_stops_at_ten_thousand() -> None:
    wall = _Wall(utc(2026, 1, 1))
    plan = Cron("* * * * *", UTC).plan(cast("Timebase", wall))
    tick = plan.first(0)
    wall.seconds += 365 * 24 * HOUR  # a year of minutes
    _, skipped = plan.after(tick, 0)
    assert skipped == 10_000
