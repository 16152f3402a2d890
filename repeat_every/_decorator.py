"""``@repeat_every``: argument checking at decoration, then a [`PeriodicTask`][]."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ._claims import ClaimStore, StoreErrorPolicy
from ._policy import Retry, seconds_of
from ._schedule import AlignedRate, FixedDelay, FixedRate, Schedule, to_ns
from ._task import PeriodicTask, TaskOptions, system_timebase
from ._timebase import ClockFunc, SleepFunc

R = TypeVar("R")

Seconds = float | dt.timedelta


def repeat_every(
    _func: object = None,
    /,
    *,
    seconds: Seconds | None = None,
    wait_first: bool | Seconds | None = False,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    raise_exceptions: bool = False,
    max_repetitions: int | None = None,
    on_complete: Callable[[], Any] | None = None,
    on_exception: Callable[[BaseException], Any] | None = None,
    clock: ClockFunc | None = None,
    sleep: SleepFunc | None = None,
    fixed_delay: bool = False,
    align: bool | None = None,
    name: str | None = None,
    timeout: Seconds | None = None,
    retry: Retry | None = None,
    jitter: Seconds = 0,
    seed: int | None = None,
    store: ClaimStore | None = None,
    on_store_error: StoreErrorPolicy = "skip",
    claim_ttl: Seconds | None = None,
) -> Callable[[Callable[[], R]], PeriodicTask[R]]:
    """Turn a no-argument ``def`` or ``async def`` into a periodic job.

    The arguments of fastapi-utils 0.8 keep their documented meaning:

    - ``seconds``: the period (a number or a ``timedelta``), finite and > 0.
    - ``wait_first``: ``False`` (or ``None``) runs at once; ``True`` waits one period; a number
      (or ``timedelta``) waits that long.
    - ``logger``: where failures are logged with their traceback. Without one they go to the
      ``"repeat_every"`` logger: a failure is never silent.
    - ``raise_exceptions``: the first failure ends the loop; ``await handle.wait()`` raises it,
      or, if nobody awaits, the event loop's exception handler receives it.
    - ``max_repetitions``: stop after this many runs (failed runs count), then call
      ``on_complete``.
    - ``on_complete()``: sync or async, called once right after the last run (also after a
      graceful [`TaskHandle.stop`][]).
    - ``on_exception(exc)``: sync or async, called for each failed run (after its retries);
      if it raises, the loop ends with that exception.

    And beyond them:

    - ``fixed_delay``: wait a full period after each run *ends* (the fastapi-utils timing)
      instead of the default fixed rate (run k starts at ``start + k × period``).
    - ``align``: put the ticks on wall-clock multiples of the period (``seconds=60`` runs on
      the minute). Implied by ``store``.
    - ``clock``/``sleep``: this task's time source (monotonic seconds) and sleep. Without
      them the task uses the process-wide default, read when the task starts, which
      ``repeat_every.testing.FakeClock`` replaces. Give one and the other is the system's.
    - ``name``: the task's name in logs, records and claim stores (default: the function's
      module and qualified name).
    - ``timeout``: seconds a run may take; see [`RunTimeoutError`][].
    - ``retry``: a [`Retry`][] policy for failed runs.
    - ``jitter`` and ``seed``: each run starts a random ``[0, jitter)`` seconds after its tick,
      drawn from ``random.Random(seed)``.
    - ``store``, ``on_store_error``, ``claim_ttl``: run each tick once across processes; see
      the claim-store docs.

    Every wrong argument raises ``TypeError``/``ValueError`` here, naming it and the fix.
    """
    if _func is not None:
        raise TypeError(
            "repeat_every must be called with its arguments: write @repeat_every(seconds=60), "
            "not @repeat_every"
        )
    if seconds is None:
        raise TypeError("repeat_every needs the period: write @repeat_every(seconds=60)")
    period = seconds_of(seconds, "seconds")
    if to_ns(period) == 0:  # the loop counts in integer nanoseconds
        raise ValueError(f"seconds must be at least one nanosecond (1e-9), got {seconds!r}")
    first_delay = _first_delay(wait_first, period)
    aligned = _check_align(align, store, fixed_delay, wait_first)
    schedule: Schedule
    if aligned:
        schedule = AlignedRate(to_ns(period))
    elif fixed_delay:
        schedule = FixedDelay(to_ns(period), to_ns(first_delay))
    else:
        schedule = FixedRate(to_ns(period), to_ns(first_delay))
    jitter_seconds = seconds_of(jitter, "jitter", allow_zero=True)
    if jitter_seconds >= period:
        raise ValueError(
            f"jitter must be shorter than the period ({period:g} s), got {jitter_seconds:g} s"
        )
    return decorator_for(
        schedule,
        logger=logger,
        raise_exceptions=raise_exceptions,
        max_repetitions=max_repetitions,
        on_complete=on_complete,
        on_exception=on_exception,
        clock=clock,
        sleep=sleep,
        name=name,
        timeout=timeout,
        retry=retry,
        jitter=jitter_seconds,
        seed=seed,
        store=store,
        on_store_error=on_store_error,
        claim_ttl=claim_ttl,
    )


def decorator_for(
    schedule: Schedule,
    *,
    logger: object,
    raise_exceptions: object,
    max_repetitions: object,
    on_complete: object,
    on_exception: object,
    clock: object,
    sleep: object,
    name: object,
    timeout: object,
    retry: object,
    jitter: float,
    seed: object,
    store: object,
    on_store_error: object,
    claim_ttl: object,
) -> Callable[[Callable[[], R]], PeriodicTask[R]]:
    """Check the arguments every schedule shares and return the decorator (used by repeat_at)."""
    if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
        raise TypeError(
            f"logger must be a logging.Logger (e.g. logging.getLogger(__name__)) or None, "
            f"not {type(logger).__name__}"
        )
    _check_bool(raise_exceptions, "raise_exceptions")
    if max_repetitions is not None and (
        not isinstance(max_repetitions, int)
        or isinstance(max_repetitions, bool)
        or max_repetitions < 1
    ):
        raise ValueError(
            "max_repetitions must be an int ≥ 1, or None to repeat forever; "
            f"got {max_repetitions!r}"
        )
    _check_hook(on_complete, "on_complete", 0)
    _check_hook(on_exception, "on_exception", 1)
    for value, argument, like in (
        (clock, "clock", "time.monotonic"),
        (sleep, "sleep", "asyncio.sleep"),
    ):
        if value is not None and not callable(value):
            raise TypeError(f"{argument} must be a callable like {like}, not {value!r}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    timeout_seconds = None if timeout is None else seconds_of(timeout, "timeout")
    if retry is not None and not isinstance(retry, Retry):
        raise TypeError(
            f"retry must be a repeat_every.Retry (e.g. Retry(attempts=3, backoff=1)), not {retry!r}"
        )
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if store is not None and not isinstance(store, ClaimStore):
        raise TypeError(
            f"store must be a claim store with an async claim(task, tick, ttl) method "
            f"(e.g. repeat_every.stores.SQLiteClaimStore(path)), not {store!r}"
        )
    if store is not None and not schedule.keyed:
        raise ValueError(
            "store needs ticks every process agrees on: use a wall-clock aligned schedule "
            "(align=True, the default with a store) or repeat_at(cron=...)"
        )
    if on_store_error not in ("skip", "run"):
        raise ValueError(f"on_store_error must be 'skip' or 'run', got {on_store_error!r}")
    ttl = None if claim_ttl is None else seconds_of(claim_ttl, "claim_ttl")
    if ttl is not None and ttl <= jitter:
        # Peers claim up to `jitter` apart: a claim must outlive that, or a late peer wins.
        raise ValueError(
            f"claim_ttl ({ttl:g} s) must be longer than jitter ({jitter:g} s): workers claim "
            "a tick up to `jitter` seconds apart, and a claim that expired in between would "
            "let a second worker run the same tick; raise claim_ttl or lower jitter"
        )
    timebase = system_timebase(clock, sleep)  # type: ignore[arg-type]

    def decorate(func: Callable[[], R]) -> PeriodicTask[R]:
        is_async = _check_job(func)
        options = TaskOptions(
            name=name if isinstance(name, str) else _default_name(func),
            schedule=schedule,
            is_async=is_async,
            logger=logger,
            raise_exceptions=bool(raise_exceptions),
            max_repetitions=max_repetitions,
            on_complete=on_complete,  # type: ignore[arg-type]
            on_exception=on_exception,  # type: ignore[arg-type]
            timebase=timebase,
            timeout=timeout_seconds,
            retry=retry,
            jitter=jitter,
            seed=seed,
            store=store,
            on_store_error=on_store_error,
            claim_ttl=ttl,
        )
        return PeriodicTask(func, options)

    return decorate


def _first_delay(wait_first: object, period: float) -> float:
    if wait_first is None or wait_first is False:
        return 0.0
    if wait_first is True:
        return period
    return seconds_of(wait_first, "wait_first", allow_zero=True)


def _check_align(align: object, store: object, fixed_delay: object, wait_first: object) -> bool:
    _check_bool(fixed_delay, "fixed_delay")
    if align is not None:
        _check_bool(align, "align")
    if align is False and store is not None:
        raise ValueError(
            "align=False cannot be used with a store: processes agree on ticks only when they "
            "are aligned to the wall clock; remove align=False"
        )
    aligned = bool(align) or (align is None and store is not None)
    if aligned and fixed_delay:
        raise ValueError(
            "fixed_delay=True cannot be aligned to the wall clock (align=True or a store): "
            "a fixed delay starts from the end of the previous run"
        )
    if aligned and wait_first not in (False, None):
        raise ValueError(
            "wait_first has no meaning on an aligned schedule (align=True or a store): the "
            "first run is at the next aligned instant; remove wait_first"
        )
    return aligned


def _check_bool(value: object, argument: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be True or False, got {value!r}")


def _check_hook(hook: object, argument: str, arity: int) -> None:
    if hook is None:
        return
    if not callable(hook):
        raise TypeError(f"{argument} must be a function (sync or async) or None, not {hook!r}")
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        signature.bind(*([None] * arity))
    except TypeError:
        what = "no arguments" if arity == 0 else "one argument (the exception)"
        raise TypeError(
            f"{argument} must accept {what}; {hook!r} has signature {signature}"
        ) from None


def _check_job(func: object) -> bool:
    """Refuse what cannot be a periodic job; tell whether it is async."""
    if inspect.iscoroutine(func):
        func.close()  # it will never run: close it so Python does not warn "never awaited"
        raise TypeError(
            "repeat_every decorates a function, not a coroutine object: pass the function "
            "itself (job, not job())"
        )
    if not callable(func):
        raise TypeError(f"repeat_every decorates a function, not {type(func).__name__} ({func!r})")
    if isinstance(func, PeriodicTask):
        raise TypeError(
            f"{func!r} is already a periodic task: decorate the function with one "
            "@repeat_every/@repeat_at only"
        )
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    call = target if inspect.isroutine(target) or inspect.isclass(target) else type(target).__call__
    if inspect.isasyncgenfunction(call) or inspect.isgeneratorfunction(call):
        raise TypeError(
            f"{func!r} is a generator function; a periodic job must return (not yield): "
            "make it a plain def or async def"
        )
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        required = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if required:
            raise TypeError(
                f"a periodic job is called with no arguments, but {func!r} requires "
                f"{', '.join(required)}: give them defaults, or bind them with "
                "functools.partial(job, ...)"
            )
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)


def _default_name(func: object) -> str:
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"
