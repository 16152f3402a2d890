"""A racing process of tests/test_multiprocess.py: claim the same ticks as the others.

    python claim_race.py STORE TARGET TASK TICKS START_AT [if-newest]

Claims tick k of TASK when the wall clock reaches START_AT + k × 5 ms, so that every racer
claims the same tick at the same moment, and prints the ticks it won, one per line. With
``if-newest``, each claim is a catch-up claim (``if_newest=True``).
"""

from __future__ import annotations

import asyncio
import sys
import time

from claim_worker import make_store

STEP = 0.005


async def main(
    kind: str, target: str, task: str, ticks: int, start_at: float, if_newest: bool
) -> list[int]:
    won = []
    async with make_store(kind, target) as store:
        await store.claim(f"{task}-warm-up", 0, 60)  # connect before the start line
        for tick in range(ticks):
            await asyncio.sleep(max(0.0, start_at + tick * STEP - time.time()))
            if await store.claim(task, tick, 60, if_newest=if_newest):
                won.append(tick)
    return won


if __name__ == "__main__":
    kind, target, task = sys.argv[1], sys.argv[2], sys.argv[3]
    ticks, start_at, if_newest = int(sys.argv[4]), float(sys.argv[5]), "if-newest" in sys.argv
    for tick in asyncio.run(main(kind, target, task, ticks, start_at, if_newest)):
        print(tick)
