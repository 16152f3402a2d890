"""Mistakes a type checker must catch: every line marked expect-error is an error for
mypy --strict and for pyright, and no other line is (checked by tests/test_types.py)."""

from __future__ import annotations

from repeat_every import PeriodicTask, repeat_at, repeat_every


@repeat_every  # expect-error: the bare decorator (write @repeat_every(seconds=60))
async def bare() -> None:
    pass


@repeat_at  # expect-error: the bare decorator (write @repeat_at(cron=...))
def bare_cron() -> None:
    pass


@repeat_every(seconds=60)
async def returns_nothing() -> None:
    pass


@repeat_every(seconds=60)
def returns_a_count() -> int:
    return 1


wrong_result: PeriodicTask[int] = returns_nothing  # expect-error: it returns None
wrong_sync_result: PeriodicTask[str] = returns_a_count  # expect-error: it returns int


async def misuse() -> None:
    count: str = await returns_a_count.call()  # expect-error: call() gives an int
    print(count)
