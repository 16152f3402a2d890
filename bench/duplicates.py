"""Two real workers, jitter, and one whose event loop stalls before each tick: duplicates?

Usage (from the repository root)::

    python bench/duplicates.py                      # 200 ticks per store, deadline passed
    python bench/duplicates.py --ticks 20 --stores sqlite --no-deadline

The case of issue 14: two worker processes (tests/workers/claim_worker.py) share a claim
store, with ``jitter=0.35`` and ``claim_ttl=0.36``; worker B's event loop is blocked for
0.17 s starting 10 ms before every tick (less than half the ttl, so B's task does not consider
itself late). Both run ``@repeat_every(seconds=PERIOD, store=...)`` and log every run with its
tick. It prints, per store, the ticks observed, the duplicates (a tick run by both) and the
misses (a tick run by nobody).

``--deadline`` (the default) lets the loop's deadline reach ``claim(..., deadline=)``;
``--no-deadline`` drops it in the worker's store wrapper, so the store decides as it did
before issue 14. Without ``--redis-url``/``--postgres-dsn``
it starts throwaway servers from the test extra's wheels (tests/servers.py).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import PostgresServer, RedisServer

WORKER = Path(__file__).resolve().parent.parent / "tests" / "workers" / "claim_worker.py"


def run_pair(
    kind: str,
    target: str,
    folder: Path,
    *,
    ticks: int,
    period: float,
    jitter: float = 0.35,
    claim_ttl: float = 0.36,
    stall: float = 0.17,
    deadline: bool = True,
) -> tuple[int, int, int]:
    """Run the two workers for ``ticks`` ticks: (ticks observed, duplicates, misses)."""
    task = f"jitter-{kind}-{uuid.uuid4().hex[:8]}"
    files = [folder / f"{task}-{name}.log" for name in "ab"]
    common = ["--period", str(period), "--jitter", str(jitter), "--claim-ttl", str(claim_ttl)]
    if not deadline:
        common.append("--no-deadline")  # the worker drops the deadline the loop passes
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), kind, target, task, str(file), *common, *extra],
            stdin=subprocess.DEVNULL,
        )
        for file, extra in zip(files, ([], ["--stall", str(stall)]), strict=True)
    ]
    try:
        limit = time.monotonic() + 30
        while not all(f.exists() and "ready" in f.read_text() for f in files):
            if any(w.poll() is not None for w in workers) or time.monotonic() > limit:
                raise RuntimeError("a worker did not start")
            time.sleep(0.05)
        first = math.ceil(time.time() / period) + 1
        time.sleep(ticks * period + 1.5)
        last = first + ticks - 1
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(10)
    per_tick: Counter[int] = Counter()
    for file in files:
        for line in file.read_text().splitlines():
            kind_, *fields = line.split()
            if kind_ == "run":
                per_tick[int(fields[1])] += 1
    window = range(first, last + 1)
    duplicates = sum(per_tick[t] - 1 for t in window if per_tick[t] > 1)
    misses = sum(1 for t in window if per_tick[t] == 0)
    return len(window), duplicates, misses


@contextlib.contextmanager
def _server(server: RedisServer | PostgresServer) -> Iterator[RedisServer | PostgresServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--period", type=float, default=0.6)
    parser.add_argument("--stores", default="sqlite,redis,postgres")
    parser.add_argument("--deadline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--redis-url")
    parser.add_argument("--postgres-dsn")
    args = parser.parse_args()
    print(
        f"two workers, jitter=0.35 claim_ttl=0.36, B stalled 0.17 s before each tick, "
        f"period {args.period:g} s, deadline passed: {args.deadline}"
    )
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        for kind in args.stores.split(","):
            if kind == "sqlite":
                target = str(folder / "claims.db")
            elif kind == "redis":
                target = args.redis_url or stack.enter_context(_server(RedisServer())).url
            else:
                target = args.postgres_dsn or stack.enter_context(_server(PostgresServer())).dsn
            ticks, duplicates, misses = run_pair(
                kind, target, folder, ticks=args.ticks, period=args.period, deadline=args.deadline
            )
            print(f"{kind:>8}: ticks={ticks} duplicates={duplicates} misses={misses}", flush=True)


if __name__ == "__main__":
    main()
