"""The options of a periodic task: declared once, checked once, shared by both decorators.

``repeat_every`` and ``repeat_at`` differ only in how they build the `Schedule`; every
other argument is a field of `TaskOptions`, whose ``__post_init__`` refuses a wrong
value with a message that names the argument and the fix (APScheduler 4 declares its task
parameters the same way, each with its validator). Durations are converted once, here, into
integer nanoseconds (`._durations`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._claims import ClaimStore, StoreErrorPolicy
from ._durations import NS, Seconds, duration_ns
from ._policy import Retry
from ._schedule import Schedule
from ._timebase import Clock, ClockFunc, SleepFunc, SystemClock

Hook = Callable[..., Any]

MIN_CLAIM_TTL_NS = NS // 10
"""The shortest ``claim_ttl`` (0.1 s): a claim's window must outlive waking up and the store's
round trip (a few ms, tens under load), or every claim arrives after it and loses."""
if TYPE_CHECKING:  # LoggerAdapter is generic only from Python 3.11 on
    Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass(frozen=True)
class TaskOptions:
    """Everything a decorator was given beyond the schedule, checked, in the loop's units.

    Users may rely on the checks made here happening at decoration, never at start or in
    the loop; the fields hold the values as given, the ``*_ns`` fields their conversion.
    """

    schedule: Schedule
    logger: Logger | None = None
    raise_exceptions: bool = False
    max_repetitions: int | None = None
    on_complete: Hook | None = None
    on_exception: Hook | None = None
    clock: ClockFunc | None = None
    sleep: SleepFunc | None = None
    name: str | None = None
    timeout: Seconds | None = None
    retry: Retry | None = None
    jitter: Seconds = 0
    seed: int | None = None
    store: ClaimStore | None = None
    on_store_error: StoreErrorPolicy = "skip"
    claim_ttl: Seconds | None = None
    catch_up: bool = False
    misfire_grace: Seconds | None = None

    timeout_ns: int | None = field(init=False, repr=False)
    jitter_ns: int = field(init=False, repr=False)
    claim_ttl_ns: int | None = field(init=False, repr=False)
    misfire_grace_ns: int | None = field(init=False, repr=False)
    store_takes_deadline: bool = field(init=False, repr=False)
    """Whether the store's ``claim`` takes ``deadline=`` (decided once, by its signature)."""
    store_records_runs: bool = field(init=False, repr=False)
    """Whether the store has ``record_run`` (the stores of ``repeat_every.stores`` do)."""
    store_claims_many: bool = field(init=False, repr=False)
    """Whether the store has ``claim_many`` and its ``claim`` takes ``deadline=``: tasks due at
    the same instant then claim together (see ``_claim_group``)."""
    timebase: Clock | None = field(init=False, repr=False)
    """The task's own clock (``clock``/``sleep`` given), or ``None``: the default at start."""

    def __post_init__(self) -> None:
        logger = self.logger
        if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
            raise TypeError(
                f"logger must be a logging.Logger (e.g. logging.getLogger(__name__)) or None, "
                f"not {type(logger).__name__}"
            )
        check_bool(self.raise_exceptions, "raise_exceptions")
        reps = self.max_repetitions
        if reps is not None and (not isinstance(reps, int) or isinstance(reps, bool) or reps < 1):
            raise ValueError(
                f"max_repetitions must be an int ≥ 1, or None to repeat forever; got {reps!r}"
            )
        _check_hook(self.on_complete, "on_complete", 0)
        _check_hook(self.on_exception, "on_exception", 1)
        _check_time_function(self.clock, "clock", "time.monotonic", 0)
        _check_time_function(self.sleep, "sleep", "asyncio.sleep", 1)
        name = self.name
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        timeout = None if self.timeout is None else duration_ns(self.timeout, "timeout")
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise TypeError(
                "retry must be a repeat_every.Retry (e.g. Retry(attempts=3, backoff=1)), "
                f"not {self.retry!r}"
            )
        jitter = duration_ns(self.jitter, "jitter", allow_zero=True)
        if jitter:
            limit, what = self.schedule.jitter_limit()
            if jitter >= limit:
                raise ValueError(
                    f"jitter must be shorter than {what} ({limit / NS:g} s), got {jitter / NS:g} s"
                )
        seed = self.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        takes_deadline, records_runs, claims_many = self._check_store(jitter)
        ttl = None if self.claim_ttl is None else duration_ns(self.claim_ttl, "claim_ttl")
        if ttl is not None and ttl < MIN_CLAIM_TTL_NS:
            raise ValueError(
                f"claim_ttl must be at least {MIN_CLAIM_TTL_NS / NS:g} s, got {ttl / NS:g} s: a "
                "claim reaching the store later than its tick's deadline + claim_ttl loses, and "
                "a claim takes a few ms (waking up, the network); leave claim_ttl unset for the "
                "default (the longer of 60 s and two periods)"
            )
        if ttl is not None and ttl <= jitter:
            # Peers claim up to `jitter` apart: a claim must outlive that, or a late peer wins.
            raise ValueError(
                f"claim_ttl ({ttl / NS:g} s) must be longer than jitter ({jitter / NS:g} s): "
                "workers claim a tick up to `jitter` seconds apart, and a claim that expired in "
                "between would let a second worker run the same tick; raise claim_ttl or lower "
                "jitter"
            )
        own = None
        if self.clock is not None or self.sleep is not None:
            own = SystemClock(self.clock, self.sleep)
        for name_, value in (
            ("timeout_ns", timeout),
            ("jitter_ns", jitter),
            ("claim_ttl_ns", ttl),
            ("misfire_grace_ns", self._check_catch_up(takes_deadline)),
            ("store_takes_deadline", takes_deadline),
            ("store_records_runs", records_runs),
            ("store_claims_many", claims_many),
            ("timebase", own),
        ):
            object.__setattr__(self, name_, value)

    def _check_store(self, jitter: int) -> tuple[bool, bool, bool]:
        """Check ``store``; whether its ``claim`` takes ``deadline=``, whether it records runs,
        whether it claims many ticks at once."""
        store = self.store
        if isinstance(store, type):
            raise TypeError(
                f"store must be a claim store instance, not the class {store.__name__}: write "
                f"store={store.__name__}(...) (e.g. SQLiteClaimStore(path))"
            )
        if store is not None and not isinstance(store, ClaimStore):
            raise TypeError(
                f"store must be a claim store with an async claim(task, tick, ttl) method "
                f"(e.g. repeat_every.stores.SQLiteClaimStore(path)), not {store!r}"
            )
        if store is not None and not inspect.iscoroutinefunction(store.claim):
            raise TypeError(
                f"store.claim must be a coroutine function (async def claim(self, task, tick, "
                f"ttl) -> bool), got {store.claim!r}: the loop awaits it; make it async def"
            )
        if store is not None and not self.schedule.keyed:
            raise ValueError(
                "store needs ticks every process agrees on: use a wall-clock aligned schedule "
                "(align=True, the default with a store) or repeat_at(cron=...)"
            )
        if self.on_store_error not in ("skip", "run"):
            raise ValueError(f"on_store_error must be 'skip' or 'run', got {self.on_store_error!r}")
        if store is None:
            return False, False, False
        takes_deadline = _takes(store.claim, "deadline")
        return (
            takes_deadline,
            inspect.iscoroutinefunction(getattr(store, "record_run", None)),
            takes_deadline and inspect.iscoroutinefunction(getattr(store, "claim_many", None)),
        )

    def _check_catch_up(self, takes_deadline: bool) -> int | None:
        """Check ``catch_up`` and ``misfire_grace``; the grace in ns (``None``: no catch-up)."""
        check_bool(self.catch_up, "catch_up")
        if not self.catch_up:
            if self.misfire_grace is not None:
                raise ValueError(
                    "misfire_grace is the age up to which a missed tick is caught up at start: "
                    "give catch_up=True with it, or drop it"
                )
            return None
        store = self.store
        if store is None:
            raise ValueError(
                "catch_up=True needs a store: the store remembers which ticks a worker claimed, "
                "so that a missed tick runs once across the fleet (e.g. "
                "store=SQLiteClaimStore(path))"
            )
        if not (
            takes_deadline
            and _takes(store.claim, "if_newest")
            and inspect.iscoroutinefunction(getattr(store, "status", None))
        ):
            raise TypeError(
                f"catch_up=True needs a store whose claim takes deadline= and if_newest= and "
                f"that has an async status(task), as the stores of repeat_every.stores do; "
                f"{store!r} does not"
            )
        if self.misfire_grace is None:
            raise ValueError(
                "catch_up=True needs misfire_grace: how old a missed tick may be and still run "
                "at start (e.g. misfire_grace=3600 for an hour, or a timedelta)"
            )
        return duration_ns(self.misfire_grace, "misfire_grace")


def _takes(method: Callable[..., Any], keyword: str) -> bool:
    """Whether ``method`` accepts the keyword argument ``keyword`` (a 3-argument claim does not)."""
    parameters = inspect.signature(method).parameters.values()  # async def: always has one
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == keyword and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in parameters
    )


def check_bool(value: object, argument: str) -> None:
    """A ``TypeError`` naming ``argument`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be True or False, got {value!r}")


def call_target(func: object) -> Any:
    """What runs when ``func`` is called: through partials, to a callable object's __call__."""
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.isroutine(target) or inspect.isclass(target):
        return target
    return type(target).__call__


def is_generator(func: object) -> bool:
    """Whether calling ``func`` makes a generator or an async generator (its body never runs)."""
    target = call_target(func)
    return inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target)


def _check_hook(hook: object, argument: str, arity: int) -> None:
    if hook is None:
        return
    if not callable(hook):
        raise TypeError(f"{argument} must be a function (sync or async) or None, not {hook!r}")
    if is_generator(hook):
        raise TypeError(
            f"{argument} must return, not yield: {hook!r} is a generator function, and calling "
            "it would never run its body; make it a plain def or async def"
        )
    _check_arity(hook, argument, arity)


def _check_time_function(func: object, argument: str, like: str, arity: int) -> None:
    if func is None:
        return
    if not callable(func):
        raise TypeError(f"{argument} must be a callable like {like}, not {func!r}")
    _check_arity(func, argument, arity, like)


def _check_arity(func: Callable[..., Any], argument: str, arity: int, like: str = "") -> None:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        signature.bind(*([None] * arity))
    except TypeError:
        what = ("no arguments", "one argument")[arity]
        if like:
            fix = f"must be a callable like {like}, taking {what}"
        elif arity:
            fix = "must accept one argument (the exception)"
        else:
            fix = "must accept no arguments"
        raise TypeError(f"{argument} {fix}; {func!r} has signature {signature}") from None
