"""Four real worker processes share a 0.2 s job through each claim store: once per tick.

Each worker (tests/workers/claim_worker.py) runs ``@repeat_every(seconds=0.2, store=...)``
and records every run with its pid and tick. For each store: for two seconds every tick runs
exactly once; then one worker is killed with SIGKILL, and the ticks after it still run exactly
once each, on the surviving workers. About five seconds of real time per store.

A sharper race too: four processes claim the same 200 ticks in lockstep (tick k at the same
wall-clock instant in every process); each tick has exactly one winner, with ordinary claims
and with catch-up claims (``if_newest``). And a frozen worker (SIGSTOP for longer than the
claim's lifetime) does not run again, when it thaws, the tick it was waiting for, which its
peer ran while its claim was still alive. And two workers with jitter, one of them stalled
before every tick, never run a tick twice (issue 14). And three workers with 20 tasks each,
whose tasks due at one instant claim together (``claim_many``), run each task once per tick.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import PostgresServer, RedisServer

WORKER = Path(__file__).parent / "workers" / "claim_worker.py"
RACER = Path(__file__).parent / "workers" / "claim_race.py"
PERIOD = 0.2
WORKERS = 4
TOGETHER = 2.0  # seconds of all four workers
AFTER_KILL = 1.2  # seconds of the three survivors

pytestmark = pytest.mark.slow


@dataclass
class Window:
    """Ticks ``first..last`` (inclusive) and what ran in them."""

    first: int
    last: int

    def ticks(self) -> range:
        return range(self.first, self.last + 1)


def _tick_now() -> float:
    return time.time() / PERIOD


def _read_runs(files: list[Path]) -> tuple[list[tuple[int, int]], set[int]]:
    runs: list[tuple[int, int]] = []
    ready: set[int] = set()
    for file in files:
        if not file.exists():
            continue
        for line in file.read_text().splitlines():
            kind, *fields = line.split()
            if kind == "ready":
                ready.add(int(fields[0]))
            elif kind == "run":
                runs.append((int(fields[0]), int(fields[1])))
    return runs, ready


def _deadlines(files: list[Path]) -> list[tuple[int, float]]:
    """The (tick, deadline passed to the store) of every run the workers wrote."""
    return [
        (int(fields[2]), float(fields[3]))
        for file in files
        for fields in (line.split() for line in file.read_text().splitlines())
        if fields[0] == "run" and fields[3] != "None"
    ]


def _start_workers(
    kind: str, target: str, task: str, files: list[Path], *extra: str
) -> list[subprocess.Popen[bytes]]:
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                kind,
                target,
                task,
                str(file),
                "--period",
                str(PERIOD),
                *extra,
            ],
            stdin=subprocess.DEVNULL,
        )
        for file in files
    ]
    deadline = time.monotonic() + 20
    while len(_read_runs(files)[1]) < len(files):
        assert all(w.poll() is None for w in workers), "a worker exited while starting"
        assert time.monotonic() < deadline, "the workers did not start within 20 s"
        time.sleep(0.05)
    return workers


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGCONT)  # harmless unless it was stopped
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _run_workers(kind: str, target: str, folder: Path) -> None:
    task = f"multiprocess-{kind}-{uuid.uuid4().hex[:8]}"
    files = [folder / f"worker-{i}.log" for i in range(WORKERS)]
    workers = _start_workers(kind, target, task, files)
    try:
        together = Window(math.ceil(_tick_now()) + 1, 0)
        time.sleep(TOGETHER)
        killed = workers[0]
        at_kill = _tick_now()
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        together.last = math.floor(at_kill) - 1
        # The tick in progress when the worker died may be lost with it (it may have won the
        # claim and not run yet): a miss the docs admit. The next ones must all run.
        after = Window(math.floor(at_kill) + 2, 0)
        time.sleep(AFTER_KILL)
        after.last = math.floor(_tick_now()) - 1
    finally:
        _stop_workers(workers)
    assert all(w.returncode == 0 for w in workers[1:]), [w.returncode for w in workers]

    runs, _ = _read_runs(files)
    per_tick = Counter(tick for _, tick in runs)
    duplicates = sum(count - 1 for count in per_tick.values() if count > 1)
    report = []
    for name, window in (("4 workers", together), ("after SIGKILL", after)):
        in_window = [per_tick[t] for t in window.ticks()]
        winners = Counter(pid for pid, tick in runs if tick in window.ticks())
        report.append(
            f"{kind} {name}: ticks={len(in_window)} runs={sum(in_window)} "
            f"duplicates={sum(c - 1 for c in in_window if c > 1)} "
            f"misses={in_window.count(0)} runs per worker={sorted(winners.values())}"
        )
    print("\n" + "\n".join(report) + f"\n{kind} whole run: duplicates={duplicates}")
    assert duplicates == 0, per_tick
    for window in (together, after):
        assert len(window.ticks()) >= 4
        missed = [t for t in window.ticks() if per_tick[t] == 0]
        assert missed == [], f"{kind}: ticks {missed} did not run; runs: {sorted(per_tick)}"
    survivors = {pid for pid, tick in runs if tick in after.ticks()}
    assert killed.pid not in survivors


def test_four_sqlite_workers_run_each_tick_once_even_after_one_is_killed(tmp_path: Path) -> None:
    _run_workers("sqlite", str(tmp_path / "claims.db"), tmp_path)


@pytest.mark.servers
def test_four_redis_workers_run_each_tick_once_even_after_one_is_killed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    _run_workers("redis", redis_server.url, tmp_path)


@pytest.mark.servers
def test_four_postgres_workers_run_each_tick_once_even_after_one_is_killed(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    _run_workers("postgres", postgres_server.dsn, tmp_path)


GROUP_WORKERS = 3
GROUP_TASKS = 20


def _run_grouped_workers(kind: str, target: str, folder: Path) -> None:
    """Three workers, each with the same 20 tasks due at the same instants: in each worker the
    first task to wake claims every task's tick in one claim_many call. Each (task, tick)
    runs exactly once across the workers."""
    task = f"grouped-{kind}-{uuid.uuid4().hex[:8]}"
    files = [folder / f"grouped-{i}.log" for i in range(GROUP_WORKERS)]
    workers = _start_workers(kind, target, task, files, "--tasks", str(GROUP_TASKS))
    try:
        window = Window(math.ceil(_tick_now()) + 1, 0)
        time.sleep(TOGETHER)
        window.last = math.floor(_tick_now()) - 1
    finally:
        _stop_workers(workers)
    assert [w.returncode for w in workers] == [0] * GROUP_WORKERS
    runs = [
        (fields[1], fields[2], int(fields[3]))
        for file in files
        for fields in (line.split() for line in file.read_text().splitlines())
        if fields[0] == "grun"
    ]
    per_run = Counter((name, tick) for _, name, tick in runs if tick in window.ticks())
    names = [f"{task}-{i}" for i in range(GROUP_TASKS)]
    expected = {(name, tick) for name in names for tick in window.ticks()}
    winners = Counter(pid for pid, _, tick in runs if tick in window.ticks())
    print(
        f"\n{kind} grouped: ticks={len(window.ticks())} tasks={GROUP_TASKS} "
        f"runs={sum(per_run.values())} runs per worker={sorted(winners.values())}"
    )
    assert len(window.ticks()) >= 5
    assert sorted(per_run) == sorted(expected), "a (task, tick) ran nowhere"
    assert [run for run, count in per_run.items() if count > 1] == []


def test_sqlite_workers_claiming_together_run_each_task_once_per_tick(tmp_path: Path) -> None:
    _run_grouped_workers("sqlite", str(tmp_path / "claims.db"), tmp_path)


@pytest.mark.servers
def test_redis_workers_claiming_together_run_each_task_once_per_tick(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    _run_grouped_workers("redis", redis_server.url, tmp_path)


@pytest.mark.servers
def test_postgres_workers_claiming_together_run_each_task_once_per_tick(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    _run_grouped_workers("postgres", postgres_server.dsn, tmp_path)


def _race(kind: str, target: str, *extra: str) -> None:
    task = f"race-{kind}-{uuid.uuid4().hex[:8]}"
    ticks = 200
    start_at = time.time() + 1.5  # after every racer has started and connected
    racers = [
        subprocess.Popen(
            [sys.executable, str(RACER), kind, target, task, str(ticks), str(start_at), *extra],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(WORKERS)
    ]
    outputs = [racer.communicate(timeout=60)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * WORKERS
    wins = [int(line) for output in outputs for line in output.split()]
    per_racer = sorted(len(output.split()) for output in outputs)
    name = " ".join((kind, "race", *extra))
    print(f"\n{name}: ticks={ticks} wins={len(wins)} per racer={per_racer}")
    assert sorted(wins) == list(range(ticks))  # every tick won, and won once


def test_racing_sqlite_processes_win_each_tick_exactly_once(tmp_path: Path) -> None:
    _race("sqlite", str(tmp_path / "claims.db"))


@pytest.mark.servers
def test_racing_redis_processes_win_each_tick_exactly_once(redis_server: RedisServer) -> None:
    _race("redis", redis_server.url)


@pytest.mark.servers
def test_racing_postgres_processes_win_each_tick_exactly_once(
    postgres_server: PostgresServer,
) -> None:
    _race("postgres", postgres_server.dsn)


def test_racing_catch_up_claims_on_sqlite_win_each_tick_exactly_once(tmp_path: Path) -> None:
    # if_newest adds a read of the task's last claimed tick to the claim: still one winner.
    _race("sqlite", str(tmp_path / "claims.db"), "if-newest")


@pytest.mark.servers
def test_racing_catch_up_claims_on_redis_win_each_tick_exactly_once(
    redis_server: RedisServer,
) -> None:
    _race("redis", redis_server.url, "if-newest")


@pytest.mark.servers
def test_racing_catch_up_claims_on_postgres_win_each_tick_exactly_once(
    postgres_server: PostgresServer,
) -> None:
    _race("postgres", postgres_server.dsn, "if-newest")


def test_a_worker_frozen_longer_than_the_claim_ttl_does_not_rerun_the_tick_it_waited_for(
    tmp_path: Path,
) -> None:
    # Two SQLite workers, claims living 0.6 s. Worker 0 is frozen (SIGSTOP) for 1.2 s, as a
    # stopped container or a suspended VM would be; its peer runs every tick meanwhile. When
    # it thaws, the tick it was sleeping towards is 1 s old and its claim has expired: it
    # must skip it, not win it again. (The rule is the loop's, the same for every store.)
    task = f"frozen-{uuid.uuid4().hex[:8]}"
    files = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = _start_workers(
        "sqlite", str(tmp_path / "claims.db"), task, files, "--claim-ttl", "0.6"
    )
    try:
        time.sleep(0.5)
        frozen = workers[0]
        frozen.send_signal(signal.SIGSTOP)
        time.sleep(1.2)
        frozen.send_signal(signal.SIGCONT)
        time.sleep(1.0)
    finally:
        _stop_workers(workers)
    assert [w.returncode for w in workers] == [0, 0]
    runs, _ = _read_runs(files)
    per_tick = Counter(tick for _, tick in runs)
    duplicates = {tick: n for tick, n in per_tick.items() if n > 1}
    print(f"\nsqlite frozen worker: ticks={len(per_tick)} runs={len(runs)} duplicates={duplicates}")
    assert duplicates == {}
    first, last = min(per_tick), max(per_tick)
    assert last - first + 1 >= 12  # the peer ran on through the freeze


JITTER_PERIOD = 0.6
JITTER_TICKS = 6
# How the claims reach the store: with the deadline the loop computed. ("--no-deadline",)
# drops it in the worker's store wrapper: then this test fails (B runs ticks A ran).
DEADLINE = ("--deadline",)


def _jitter_and_stall(kind: str, target: str, folder: Path) -> None:
    # The case of issue 14, sharpened: claims living 0.36 s; worker A claims each tick on
    # time, worker B's event loop is blocked 0.17 s just before every tick (less than half the
    # ttl, so B's task does not think itself late) and then B waits a jitter of up to 0.35 s:
    # B's claims reach the store up to 0.52 s after the tick, after A's claim made at the tick
    # would have expired. The loop passes each claim its tick's deadline, computed from the
    # tick's key, and the store refuses a claim arriving after deadline + ttl and keeps the
    # first one until then. Without the deadline B ran about 4 ticks in 10 a second time; with
    # both workers jittered, as in the issue, about 1 in 9 (bench/duplicates.py runs that case
    # for 200 ticks).
    task = f"jitter-{kind}-{uuid.uuid4().hex[:8]}"
    files = [folder / f"worker-{name}.log" for name in "ab"]
    common = ["--period", str(JITTER_PERIOD), "--claim-ttl", "0.36", *DEADLINE]
    late = ["--jitter", "0.35", "--stall", "0.17"]
    workers = [
        *_start_workers(kind, target, task, files[:1], *common),
        *_start_workers(kind, target, task, files[1:], *common, *late),
    ]
    try:
        first = math.ceil(time.time() / JITTER_PERIOD) + 1
        time.sleep((JITTER_TICKS + 1.5) * JITTER_PERIOD)
    finally:
        _stop_workers(workers)
    assert [w.returncode for w in workers] == [0, 0]
    runs, _ = _read_runs(files)
    per_tick = Counter(tick for _, tick in runs)
    window = range(first, first + JITTER_TICKS)
    # The deadline the loop passed is the tick's due instant, from its key: key × period.
    passed = _deadlines(files)
    assert passed
    assert all(d == pytest.approx(tick * JITTER_PERIOD, abs=1e-6) for tick, d in passed), passed
    duplicates = {t: per_tick[t] for t in window if per_tick[t] > 1}
    misses = [t for t in window if per_tick[t] == 0]
    print(f"\n{kind} jitter and stall: ticks={len(window)} duplicates={duplicates} misses={misses}")
    assert duplicates == {}
    assert misses == []  # A claims every tick in time


def test_a_stalled_jittered_sqlite_worker_never_runs_a_tick_twice(tmp_path: Path) -> None:
    _jitter_and_stall("sqlite", str(tmp_path / "claims.db"), tmp_path)


@pytest.mark.servers
def test_a_stalled_jittered_redis_worker_never_runs_a_tick_twice(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    _jitter_and_stall("redis", redis_server.url, tmp_path)


@pytest.mark.servers
def test_a_stalled_jittered_postgres_worker_never_runs_a_tick_twice(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    _jitter_and_stall("postgres", postgres_server.dsn, tmp_path)


# -- catch-up after a restart (issue 14) ---------------------------------------------------------

CATCH_UP_PERIOD = 5.0  # long enough for three workers to start between two ticks


def _after_next_boundary(period: float, margin: float = 0.05) -> int:
    """Sleep until ``margin`` after the next tick of a ``period`` grid; that tick's key."""
    tick = math.floor(time.time() / period) + 1
    time.sleep(max(0.0, tick * period + margin - time.time()))
    return tick


def _fleet(
    target: str, task: str, folder: Path, tag: str, *extra: str
) -> tuple[list[Path], list[subprocess.Popen[bytes]]]:
    files = [folder / f"{tag}-{i}.log" for i in range(3)]
    workers = _start_workers(
        "sqlite", target, task, files, "--period", str(CATCH_UP_PERIOD), *extra
    )
    return files, workers


def _ticks_run(files: list[Path]) -> list[int]:
    return sorted(tick for _, tick in _read_runs(files)[0])


def test_a_tick_missed_while_the_fleet_was_down_runs_once_after_restart_with_catch_up(
    tmp_path: Path,
) -> None:
    target = str(tmp_path / "claims.db")
    task = f"catch-up-{uuid.uuid4().hex[:8]}"
    grace = str(CATCH_UP_PERIOD - 1)

    # 1. Three workers start just after tick A, which nobody ran: one of them catches it up.
    tick_a = _after_next_boundary(CATCH_UP_PERIOD)
    files_1, workers = _fleet(target, task, tmp_path, "first", "--catch-up", grace)
    try:
        give_up = time.monotonic() + 10
        while not _ticks_run(files_1) and time.monotonic() < give_up:
            time.sleep(0.05)
        time.sleep(0.5)  # room for a second (wrong) catch-up run
    finally:
        _stop_workers(workers)
    runs = _ticks_run(files_1)
    assert runs.count(tick_a) == 1, runs  # caught up once, by one of the three
    assert len(runs) == len(set(runs)), runs  # (a later tick, if the start was slow: once)

    # 2. The fleet is down at tick B; restarted after it, it runs B once and not A again.
    tick_b = _after_next_boundary(CATCH_UP_PERIOD)
    files_2, workers = _fleet(target, task, tmp_path, "second", "--catch-up", grace)
    try:
        give_up = time.monotonic() + 10
        while not _ticks_run(files_2) and time.monotonic() < give_up:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        _stop_workers(workers)
    runs = _ticks_run(files_2)
    assert runs.count(tick_b) == 1, runs
    assert tick_a not in runs, runs
    assert len(runs) == len(set(runs)), runs

    # 3. Without catch-up, the tick missed during the downtime is not run.
    tick_c = _after_next_boundary(CATCH_UP_PERIOD)
    files_3, workers = _fleet(target, task, tmp_path, "third")
    try:
        time.sleep(1.0)
    finally:
        _stop_workers(workers)
    assert tick_c not in _ticks_run(files_3)
