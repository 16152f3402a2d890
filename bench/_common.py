"""What every scenario shares: the contenders' names, the bare-loop floor, statistics.

The *bare loop* is the floor every scenario compares against: the fixed-rate loop a careful
developer would write by hand with nothing but asyncio (no handle, no logging, no hooks, no
error handling). It keeps the same promise as repeat-every's default schedule: run k starts
at ``start + k × period``, and a run that overruns skips the ticks it covered instead of
bursting to catch up.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import statistics
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

OURS = "repeat-every"
BARE = "bare asyncio loop"
FASTAPI_UTILS = "fastapi-utils 0.8"
LOOPTIME = "looptime"
LOOPTIME_FAST = "looptime noop_cycles=1"
FLOOR = "bare future wake-up"
TRIO = "trio MockClock (anyio)"

Params = dict[str, Any]
Result = dict[str, Any]


async def bare_fixed_rate(
    job: Callable[[], Awaitable[Any]],
    period: float,
    *,
    runs: int | None = None,
    first_delay: float = 0.0,
) -> int:
    """The hand-written floor: a fixed-rate loop on the event loop's clock, skipping overruns.

    Returns how many ticks were skipped (when ``runs`` ends the loop).
    """
    loop = asyncio.get_running_loop()
    origin = loop.time() + first_delay
    k = 0
    done = 0
    while runs is None or done < runs:
        delay = origin + k * period - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await job()
        done += 1
        k = max(k + 1, math.ceil((loop.time() - origin) / period))
    return k - done


async def _wake_by_call_soon(n: int) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(n):
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        await future


async def _wake_by_call_later(n: int) -> None:
    loop = asyncio.get_running_loop()
    for _ in range(n):
        future = loop.create_future()
        loop.call_later(0, future.set_result, None)
        await future


async def _wake_by_other_task(n: int) -> None:
    loop = asyncio.get_running_loop()
    slot: list[asyncio.Future[None]] = []

    async def sleeper() -> None:
        for _ in range(n):
            future = loop.create_future()
            slot.append(future)
            await future

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    while slot:
        slot.pop().set_result(None)
        await asyncio.sleep(0)  # the sleeper runs, parks on its next future
    await task


WAKEUPS: dict[str, Callable[[int], Coroutine[Any, Any, None]]] = {
    "loop.call_soon(future.set_result)": _wake_by_call_soon,
    "loop.call_later(0, future.set_result)": _wake_by_call_later,
    "future.set_result() from another task": _wake_by_other_task,
}


def wakeup_floor(n: int, rounds: int = 3) -> dict[str, float]:
    """µs per bare future wake-up, each way in :data:`WAKEUPS` (best of ``rounds``).

    One wake-up: a task parks on a new future and resumes when something resolves it. That is
    the least any virtual clock does per run of a job that awaits nothing but its next tick.
    Each way runs ``n`` wake-ups in a fresh ``asyncio.run``.
    """
    import time

    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, way in WAKEUPS.items():
            t0 = time.perf_counter()
            asyncio.run(way(n))
            us = (time.perf_counter() - t0) / n * 1e6
            best[name] = min(us, best.get(name, math.inf))
    return best


# The import each optional contender needs; a contender whose package is missing is skipped
# (looptime, for one, needs Python ≥ 3.11).
NEEDS = {
    FASTAPI_UTILS: "fastapi_utils",
    LOOPTIME: "looptime",
    LOOPTIME_FAST: "looptime",
    TRIO: "trio",
}


def available(contender: str) -> bool:
    """Whether the packages ``contender`` needs are installed (ours and the bare loop: always)."""
    module = NEEDS.get(contender)
    return module is None or importlib.util.find_spec(module) is not None


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` if not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Readable when the PNG is shown at half size in a README: nothing below 10 pt.
    plt.rcParams.update(
        {
            "font.size": 11,
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
            "legend.fontsize": 10,
            "figure.titlesize": 14,
            "figure.titleweight": "bold",
        }
    )

    return plt


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else math.nan


def ratio(value: float, reference: float) -> float:
    """``value / reference``, NaN when the reference is zero or missing."""
    if not reference or math.isnan(reference) or math.isnan(value):
        return math.nan
    return value / reference


def fmt(value: float, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no scientific notation below 10⁶)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def fmt_ratio(value: float) -> str:
    """A ratio as ``1.23×``."""
    return "—" if math.isnan(value) else f"{value:.2f}×"


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux ``/proc``), or ``None`` elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return resident_pages * resource.getpagesize()


@dataclass
class Headline:
    """One line of the headline table: a measure, each contender's value, the verdict."""

    scenario: str
    measure: str
    values: dict[str, str]
    ratio: str
    target: str
    met: bool | None  # None: informational, no target
    flag: str | None = None  # shown instead of the verdict (say, the measurement is invalid)


@dataclass
class Section:
    """What a scenario contributes to RESULTS.md: its text (plots linked) and headline lines."""

    title: str
    body: str
    headline: list[Headline] = field(default_factory=list)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (numbers right-aligned: every column but the first)."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool | None) -> str:
    """✅ / ❌ / — for a target."""
    return "—" if met is None else ("✅ met" if met else "❌ missed")
