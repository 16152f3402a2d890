"""``@repeat_every`` and ``@repeat_at``: a schedule, the shared options, then a PeriodicTask.

The two decorators differ only in the schedule they build; everything else is a
`TaskOptions`, which checks itself. The job is checked by
`JobDecorator` when it is applied.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from ._claims import ClaimStore, StoreErrorPolicy
from ._cron import Cron, zone_of
from ._durations import Seconds, duration_ns
from ._options import TaskOptions, call_target, check_bool, is_generator
from ._policy import Retry
from ._schedule import AlignedRate, FixedDelay, FixedRate, Schedule
from ._task import PeriodicTask
from ._timebase import ClockFunc, SleepFunc

R = TypeVar("R")

MIN_PERIOD_NS = 1_000_000
"""The shortest period, 1 ms. A shorter one would leave the loop no time to sleep between two
runs: a job always due never yields, and the event loop serves nothing else."""


class JobDecorator:
    """What ``repeat_every(...)`` and ``repeat_at(...)`` return: apply it to the job.

    Typed so that the task keeps the job's return type: an ``async def job() -> int`` becomes
    a ``PeriodicTask[int]``, as does a ``def job() -> int``.
    """

    __slots__ = ("_options",)

    def __init__(self, options: TaskOptions) -> None:
        self._options = options

    @overload
    def __call__(self, func: Callable[[], Awaitable[R]], /) -> PeriodicTask[R]: ...

    @overload
    def __call__(self, func: Callable[[], R], /) -> PeriodicTask[R]: ...

    def __call__(self, func: Callable[[], Any], /) -> PeriodicTask[Any]:
        is_async = _check_job(func)
        name = self._options.name or _default_name(func)
        if self._options.store is not None:  # the store's key: every store must accept it
            from .stores import check_task_name

            check_task_name(name, "name")
        return PeriodicTask(func, self._options, name=name, is_async=is_async)

    def __repr__(self) -> str:
        return f"<repeat_every decorator {self._options.schedule.describe()}>"


def repeat_every(
    _func: None = None,
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
    catch_up: bool = False,
    misfire_grace: Seconds | None = None,
) -> JobDecorator:
    """Turn a no-argument ``def`` or ``async def`` into a periodic job.

    The arguments of fastapi-utils 0.8 keep their documented meaning:

    - ``seconds``: the period (a number or a ``timedelta``), finite, at least 1 ms (0.001)
      and at most about 100 years.
    - ``wait_first``: ``False`` (or ``None``) runs at once; ``True`` waits one period; a number
      (or ``timedelta``) waits that long.
    - ``logger``: where failures are logged with their traceback. Without one they go to the
      ``"repeat_every"`` logger: a failure is never silent.
    - ``raise_exceptions``: the first failure ends the loop; ``await handle.wait()`` raises it,
      or, if nobody awaits, the event loop's exception handler receives it.
    - ``max_repetitions``: stop after this many runs (failed runs count), then call
      ``on_complete``.
    - ``on_complete()``: sync or async, called once right after the last run (also after a
      graceful `TaskHandle.stop`).
    - ``on_exception(exc)``: sync or async, called for each failed run (after its retries);
      if it raises, the loop ends with that exception.

    And beyond them:

    - ``fixed_delay``: wait a full period after each run *ends* (the fastapi-utils timing)
      instead of the default fixed rate (run k starts at ``start + k × period``).
    - ``align``: put the ticks on wall-clock multiples of the period (``seconds=60`` runs on
      the minute). Implied by ``store``.
    - ``clock``/``sleep``: this task's time source (monotonic seconds, called with no
      argument) and sleep (called with the seconds). Without them the task uses the
      process-wide default, read when the task starts, which
      ``repeat_every.testing.FakeClock`` replaces. Give one and the other is the system's.
    - ``name``: the task's name in logs, records and claim stores (default: the function's
      module and qualified name).
    - ``timeout``: seconds a run may take; see `RunTimeoutError`.
    - ``retry``: a `Retry` policy for failed runs.
    - ``jitter`` and ``seed``: each run starts a random ``[0, jitter)`` seconds after its tick,
      drawn from ``random.Random(seed)``.
    - ``store``, ``on_store_error``, ``claim_ttl``: run each tick once across processes; see
      the claim-store docs.
    - ``catch_up``, ``misfire_grace``: with a store, a tick missed while every worker was down
      runs once at start if it is at most ``misfire_grace`` old; see the claim-store docs.

    Every wrong argument raises ``TypeError``/``ValueError`` here, naming it and the fix.
    """
    if _func is not None:
        raise TypeError(
            "repeat_every must be called with its arguments: write @repeat_every(seconds=60), "
            "not @repeat_every"
        )
    if seconds is None:
        raise TypeError("repeat_every needs the period: write @repeat_every(seconds=60)")
    period = duration_ns(seconds, "seconds", at_least_ns=MIN_PERIOD_NS)
    aligned = _check_align(align, store, fixed_delay, wait_first)
    schedule: Schedule
    if aligned:
        schedule = AlignedRate(period)
    elif fixed_delay:
        schedule = FixedDelay(period, _first_delay(wait_first, period))
    else:
        schedule = FixedRate(period, _first_delay(wait_first, period))
    return JobDecorator(
        TaskOptions(
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
            jitter=jitter,
            seed=seed,
            store=store,
            on_store_error=on_store_error,
            claim_ttl=claim_ttl,
            catch_up=catch_up,
            misfire_grace=misfire_grace,
        )
    )


def repeat_at(
    _func: None = None,
    /,
    *,
    cron: str | None = None,
    tz: str | dt.tzinfo = "UTC",
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    raise_exceptions: bool = False,
    max_repetitions: int | None = None,
    on_complete: Callable[[], Any] | None = None,
    on_exception: Callable[[BaseException], Any] | None = None,
    clock: ClockFunc | None = None,
    sleep: SleepFunc | None = None,
    name: str | None = None,
    timeout: Seconds | None = None,
    retry: Retry | None = None,
    jitter: Seconds = 0,
    seed: int | None = None,
    store: ClaimStore | None = None,
    on_store_error: StoreErrorPolicy = "skip",
    claim_ttl: Seconds | None = None,
    catch_up: bool = False,
    misfire_grace: Seconds | None = None,
) -> JobDecorator:
    """Turn a no-argument ``def`` or ``async def`` into a job that runs at cron times.

    ``@repeat_at(cron="0 9 * * MON-FRI", tz="Europe/Paris")`` runs at 09:00 Paris time on
    weekdays, summer and winter. Calling the result starts its loop and returns a
    `TaskHandle`, exactly as with `repeat_every`.

    - ``cron``: five fields, ``minute hour day-of-month month day-of-week``, or a macro such
      as ``"@daily"``; see `Cron` for the syntax and what happens at DST changes.
    - ``tz``: the zone the fields are read in: an IANA name (``"Europe/Paris"``) or a
      ``datetime.tzinfo`` (``zoneinfo.ZoneInfo``, ``datetime.timezone.utc``; a pytz zone is
      replaced by the ``ZoneInfo`` of the same name). The default is ``"UTC"``: the same on
      every machine and container, whatever their local zone, and free of DST.
    - ``jitter``: each run starts a random ``[0, jitter)`` seconds after its fire time; it
      must be shorter than the shortest gap between two fire times.
    - ``logger``, ``raise_exceptions``, ``max_repetitions``, ``on_complete``,
      ``on_exception``, ``clock``, ``sleep``, ``name``, ``timeout``, ``retry``, ``seed``,
      ``store``, ``on_store_error``, ``claim_ttl``: as for `repeat_every`. A retry never
      runs past the next fire time.

    There is no ``seconds``, ``wait_first``, ``fixed_delay`` or ``align``: the expression
    says when to run. A wrong argument raises ``TypeError``/``ValueError`` here, naming it.
    """
    if _func is not None:
        raise TypeError(
            "repeat_at must be called with its arguments: write "
            '@repeat_at(cron="0 9 * * *"), not @repeat_at'
        )
    if cron is None:
        raise TypeError(
            'repeat_at needs a cron expression: write @repeat_at(cron="0 9 * * MON-FRI", '
            'tz="Europe/Paris")'
        )
    return JobDecorator(
        TaskOptions(
            Cron(cron, zone_of(tz)),
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
            jitter=jitter,
            seed=seed,
            store=store,
            on_store_error=on_store_error,
            claim_ttl=claim_ttl,
            catch_up=catch_up,
            misfire_grace=misfire_grace,
        )
    )


def _first_delay(wait_first: object, period: int) -> int:
    if wait_first is None or wait_first is False:
        return 0
    if wait_first is True:
        return period
    return duration_ns(wait_first, "wait_first", allow_zero=True, at_least_ns=0)


def _check_align(align: object, store: object, fixed_delay: object, wait_first: object) -> bool:
    check_bool(fixed_delay, "fixed_delay")
    if align is not None:
        check_bool(align, "align")
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
    if is_generator(func):
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
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call_target(func))


def _default_name(func: object) -> str:
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"
