"""Faults a new user met (issue 12), each reproduced here: a clear error at decoration, or the
behaviour the docs promise."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from repeat_every import Retry, repeat_at, repeat_every, running_handles
from repeat_every.testing import FakeClock


async def _noop() -> None:
    pass


class _Store:
    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        return True


# -- 1. a def job must not overlap the run its cancelled loop left in a thread ----------------


async def test_def_job_restarted_after_cancel_waits_for_the_run_still_in_its_thread() -> None:
    inside = 0
    most_inside = 0
    lock = threading.Lock()
    entered = threading.Semaphore(0)
    release = threading.Event()

    def job() -> None:
        nonlocal inside, most_inside
        with lock:
            inside += 1
            most_inside = max(most_inside, inside)
        entered.release()
        release.wait(5)  # the first run blocks, like time.sleep(1) in the issue
        with lock:
            inside -= 1

    task = repeat_every(seconds=60)(job)
    first = task()
    assert await asyncio.to_thread(entered.acquire, True, 5)
    first.cancel()
    await first.wait()  # returns at once: a thread cannot be interrupted
    second = task()
    # The second loop's first run is due now; it must wait for the first run's thread.
    await asyncio.sleep(0.05)
    assert not entered.acquire(blocking=False), "two runs of the same job at once"
    release.set()
    assert await asyncio.to_thread(entered.acquire, True, 5)
    second.cancel()
    await second.wait()
    assert most_inside == 1


# -- 2. no period can starve the event loop ---------------------------------------------------


@pytest.mark.parametrize("seconds", [1e-9, 1e-6, 0.0009, dt.timedelta(microseconds=999)])
def test_period_below_one_millisecond_is_refused_naming_the_floor(seconds: object) -> None:
    with pytest.raises(ValueError, match=r"seconds must be at least 0\.001 s"):
        repeat_every(seconds=seconds)(_noop)  # type: ignore[arg-type]


async def test_shortest_period_job_that_never_awaits_leaves_the_loop_to_others() -> None:
    runs = 0

    @repeat_every(seconds=0.001)
    async def busy() -> None:  # never awaits: only the loop's own sleep yields
        nonlocal runs
        runs += 1

    others = 0

    async def other() -> None:
        nonlocal others
        while True:
            others += 1
            await asyncio.sleep(0)

    handle = busy()
    neighbour = asyncio.create_task(other())
    await asyncio.sleep(0.03)  # returns: the loop was not starved
    handle.cancel()
    neighbour.cancel()
    await handle.wait()
    await asyncio.wait((neighbour,))
    assert runs >= 1
    assert others > runs


# -- 3. valid retry settings must not crash the loop ------------------------------------------


def test_backoff_that_overflows_is_capped_by_max_backoff() -> None:
    assert Retry(attempts=4, backoff=0.01, multiplier=1e200, max_backoff=1).delays() == [
        0.01,
        1.0,
        1.0,
    ]
    zero = Retry(attempts=2000, backoff=0, multiplier=2)
    assert zero.delay(1025) == 0.0
    assert set(zero.delays()) == {0.0}
    assert Retry(attempts=3, multiplier=10**400, max_backoff=7).delays() == [1.0, 7.0]


async def test_overflowing_backoff_retries_then_reports_the_failure(fake_clock: FakeClock) -> None:
    seen: list[BaseException] = []

    @repeat_every(
        seconds=60,
        retry=Retry(attempts=4, backoff=0.01, multiplier=1e200, max_backoff=1),
        on_exception=seen.append,
        max_repetitions=1,
    )
    async def job() -> None:
        raise OSError("down")

    handle = job()
    await fake_clock.advance(10)
    await handle.wait()
    assert fake_clock.history.started(job) == [0.0, 0.01, 1.01, 2.01]
    assert (handle.failures, handle.retries, len(seen)) == (1, 3, 1)


async def test_two_thousand_attempts_without_backoff_all_run(fake_clock: FakeClock) -> None:
    @repeat_every(seconds=60, retry=Retry(attempts=2000, backoff=0, multiplier=2))
    async def job() -> None:
        raise OSError("down")

    handle = job()
    await fake_clock.advance(0)
    handle.cancel()
    await handle.wait()
    assert len(fake_clock.history.of(job)) == 2000
    assert (handle.failures, handle.retries) == (1, 1999)


# -- 4. arguments that passed decoration but failed later ----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clock": lambda seconds: 0.0}, r"clock must be a callable like time\.monotonic"),
        ({"sleep": lambda: None}, r"sleep must be a callable like asyncio\.sleep, taking one"),
        ({"seconds": 1e300}, r"seconds must be at most 3,153,600,000 s"),
        ({"seconds": 10**400}, r"seconds must be at most"),
        ({"wait_first": 10**400}, r"wait_first must be at most"),
        ({"timeout": 10**400}, r"timeout must be at most"),
        ({"timeout": dt.timedelta(days=999_999_999)}, r"timeout must be at most"),
        ({"jitter": 10**400}, r"jitter must be at most"),
        ({"claim_ttl": 10**400, "store": _Store()}, r"claim_ttl must be at most"),
    ],
)
def test_argument_that_would_fail_later_is_refused_at_decoration(
    kwargs: dict[str, Any], message: str
) -> None:
    kwargs.setdefault("seconds", 60)
    with pytest.raises(ValueError if "must be at most" in message else TypeError, match=message):
        repeat_every(**kwargs)(_noop)


@pytest.mark.parametrize("field", ["backoff", "max_backoff", "jitter"])
def test_retry_duration_too_long_to_be_a_float_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=rf"Retry\({field}=\.\.\.\) must be at most"):
        Retry(**{field: 10**400})


def _generator() -> Iterator[None]:
    yield


async def _async_generator(exc: BaseException) -> AsyncIterator[None]:
    yield


@pytest.mark.parametrize(
    ("argument", "hook"), [("on_complete", _generator), ("on_exception", _async_generator)]
)
def test_generator_function_as_a_hook_is_refused(argument: str, hook: object) -> None:
    with pytest.raises(TypeError, match=rf"{argument} must return, not yield"):
        repeat_every(seconds=1, **{argument: hook})(_noop)  # type: ignore[arg-type]


def test_repeat_at_checks_the_same_arguments() -> None:
    with pytest.raises(ValueError, match=r"timeout must be at most"):
        repeat_at(cron="@daily", timeout=10**400)(_noop)
    with pytest.raises(TypeError, match=r"on_complete must return, not yield"):
        repeat_at(cron="@daily", on_complete=_generator)(_noop)  # type: ignore[arg-type]


# -- 6. a handle whose event loop was closed under it -------------------------------------------


def test_handle_of_a_closed_event_loop_has_ended_and_stop_does_nothing() -> None:
    task = repeat_every(seconds=60, name="closed-loop-job")(_noop)

    async def start() -> Any:
        handle = task()
        await asyncio.sleep(0)
        return handle

    loop = asyncio.new_event_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda loop, context: reported.append(context["message"]))
    handle = loop.run_until_complete(start())
    assert handle in running_handles()
    loop.close()  # as a test runner or a crashed program does, with the loop still running
    assert handle not in running_handles()
    assert handle.done
    assert not handle.running
    handle.stop()
    handle.cancel()

    async def start_again() -> None:
        again = task()  # the job can run again on a new event loop
        await again.aclose()

    asyncio.run(start_again())
    # asyncio itself reports the task the program left pending when it closed the loop.
    del handle
    gc.collect()
    assert reported == ["Task was destroyed but it is pending!"]


def test_stop_from_a_thread_while_the_event_loop_closes_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = repeat_every(seconds=60, name="closing-loop-job")(_noop)
    loop = asyncio.new_event_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda loop, context: reported.append(context["message"]))

    async def start() -> Any:
        handle = task()
        await asyncio.sleep(0)
        return handle

    handle = loop.run_until_complete(start())
    assert repr(handle) == "<TaskHandle closing-loop-job running runs=1 failures=0>"
    closing = loop.call_soon_threadsafe

    def close_first(*args: Any) -> Any:  # the fault: the loop closes between check and call
        loop.close()
        return closing(*args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", close_first)
    handle.stop()  # from outside the loop (no loop runs here): hands over, finds it closed
    assert handle.done
    assert handle not in running_handles()
    assert repr(handle) == "<TaskHandle closing-loop-job ended runs=1 failures=0>"
    monkeypatch.undo()

    async def start_again() -> None:
        await task().aclose()  # replaces the task's last handle, so the old one can go

    asyncio.run(start_again())
    del handle
    gc.collect()
    assert reported == ["Task was destroyed but it is pending!"]


# -- trio ---------------------------------------------------------------------------------------


def test_start_under_trio_names_trio_and_the_supported_loops() -> None:
    pytest.importorskip("trio")
    anyio = pytest.importorskip("anyio")
    task = repeat_every(seconds=60)(_noop)

    async def main() -> None:
        task()

    with pytest.raises(RuntimeError, match=r"runs on asyncio \(and uvloop\), not on trio"):
        anyio.run(main, backend="trio")


@pytest.mark.parametrize("trio_imported", [True, False])
def test_start_outside_any_event_loop_says_to_call_it_from_async_code(
    trio_imported: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if trio_imported:
        pytest.importorskip("trio")  # imported, but not running: not a trio problem
    else:
        monkeypatch.delitem(sys.modules, "trio", raising=False)
    task = repeat_every(seconds=60)(_noop)
    with pytest.raises(RuntimeError, match=r"starts on a running event loop"):
        task()
