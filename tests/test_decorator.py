"""``@repeat_every``: every wrong argument is refused at decoration, naming itself and the fix."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import gc
import logging
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from repeat_every import PeriodicTask, Retry, repeat_every
from repeat_every.testing import FakeClock


async def _noop() -> None:
    pass


class _Store:
    """The smallest valid claim store: every claim is won."""

    async def claim(self, task: str, tick: int, ttl: float) -> bool:
        return True


def _decorate(**kwargs: Any) -> PeriodicTask[Any]:
    kwargs.setdefault("seconds", 1)
    return repeat_every(**kwargs)(_noop)


# -- seconds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds", [0, -1, -0.5, float("inf"), float("-inf"), float("nan"), dt.timedelta(0)]
)
def test_seconds_not_finite_and_positive_is_a_value_error(seconds: object) -> None:
    with pytest.raises(ValueError, match=r"seconds must be finite and > 0"):
        _decorate(seconds=seconds)


@pytest.mark.parametrize("seconds", ["60", True, False, [1]])
def test_seconds_not_a_number_is_a_type_error(seconds: object) -> None:
    with pytest.raises(TypeError, match=r"seconds.*(number of seconds|timedelta)"):
        _decorate(seconds=seconds)


def test_missing_seconds_says_to_pass_it() -> None:
    with pytest.raises(TypeError, match=r"seconds"):
        repeat_every()(_noop)  # type: ignore[call-arg]


async def test_seconds_accepts_a_timedelta(fake_clock: FakeClock) -> None:
    task = repeat_every(seconds=dt.timedelta(minutes=5))(_noop)
    handle = task()
    await fake_clock.advance(15 * 60)
    assert fake_clock.history.started(task) == [0.0, 300.0, 600.0, 900.0]
    handle.cancel()


# -- wait_first, logger, raise_exceptions, max_repetitions --------------------------------------


@pytest.mark.parametrize("wait_first", [-1, float("nan"), float("inf")])
def test_wait_first_negative_or_not_finite_is_a_value_error(wait_first: object) -> None:
    with pytest.raises(ValueError, match=r"wait_first must be finite and ≥ 0"):
        _decorate(wait_first=wait_first)


@pytest.mark.parametrize("wait_first", ["yes", [1]])
def test_wait_first_of_the_wrong_type_is_a_type_error(wait_first: object) -> None:
    with pytest.raises(TypeError, match=r"wait_first must be a number of seconds"):
        _decorate(wait_first=wait_first)


@pytest.mark.parametrize("logger", ["my.logger", print, logging])
def test_logger_that_is_not_a_logger_says_use_getlogger(logger: object) -> None:
    with pytest.raises(TypeError, match=r"logger must be a logging\.Logger.*getLogger"):
        _decorate(logger=logger)


async def test_logger_adapter_is_accepted_and_receives_the_failures(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = logging.LoggerAdapter(logging.getLogger("tests.adapter"), {"job": "tokens"})

    @repeat_every(seconds=1, logger=adapter, max_repetitions=1)
    async def job() -> None:
        raise OSError("down")

    handle = job()
    await fake_clock.advance(0)
    await handle.wait()
    assert [(r.name, r.levelname) for r in caplog.records if "run 0 failed" in r.message] == [
        ("tests.adapter", "ERROR")
    ]


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_raise_exceptions_must_be_a_bool(value: object) -> None:
    with pytest.raises(TypeError, match=r"raise_exceptions must be True or False"):
        _decorate(raise_exceptions=value)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, False, "3"])
def test_max_repetitions_must_be_an_int_of_at_least_one(value: object) -> None:
    with pytest.raises(ValueError, match=r"max_repetitions must be an int ≥ 1.*None"):
        _decorate(max_repetitions=value)


# -- hooks, clock, sleep ------------------------------------------------------------------------


def _one_arg(exc: BaseException) -> None:
    pass


def _two_args(a: object, b: object) -> None:
    pass


def _no_arg() -> None:
    pass


@pytest.mark.parametrize("hook", [_one_arg, _two_args, lambda *, key: None])
def test_on_complete_that_needs_arguments_is_refused(hook: Callable[..., Any]) -> None:
    with pytest.raises(TypeError, match=r"on_complete must accept no arguments"):
        _decorate(on_complete=hook)


@pytest.mark.parametrize("hook", [_no_arg, _two_args])
def test_on_exception_that_does_not_take_one_argument_is_refused(
    hook: Callable[..., Any],
) -> None:
    with pytest.raises(TypeError, match=r"on_exception must accept one argument"):
        _decorate(on_exception=hook)


@pytest.mark.parametrize("argument", ["on_complete", "on_exception"])
def test_hook_that_is_not_callable_is_refused(argument: str) -> None:
    with pytest.raises(TypeError, match=rf"{argument} must be a function"):
        _decorate(**{argument: "log it"})


async def test_hooks_with_flexible_signatures_and_builtins_are_accepted_and_called(
    fake_clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[object, ...]] = []

    async def on_exception(*args: object) -> None:
        calls.append(("on_exception", *args))

    error = OSError("down")

    async def failing() -> None:
        raise error

    flexible = repeat_every(
        seconds=1,
        max_repetitions=1,
        on_complete=lambda *args: calls.append(("on_complete", *args)),
        on_exception=on_exception,
        name="flexible",
    )(failing)
    builtins = repeat_every(
        seconds=1, max_repetitions=1, on_exception=print, on_complete=dict, name="builtins"
    )(failing)
    handles = [flexible(), builtins()]
    await fake_clock.advance(0)
    for handle in handles:
        await handle.wait()  # a hook that raised would end the loop with its exception here
    assert calls == [("on_exception", error), ("on_complete",)]
    assert [h.failures for h in handles] == [1, 1]
    assert capsys.readouterr().out == "down\n"


@pytest.mark.parametrize(
    ("argument", "like"), [("clock", "time.monotonic"), ("sleep", "asyncio.sleep")]
)
def test_clock_and_sleep_must_be_callable(argument: str, like: str) -> None:
    with pytest.raises(TypeError, match=rf"{argument} must be a callable like {like}"):
        _decorate(**{argument: 5.0})


# -- jitter, timeout, retry, seed, name ---------------------------------------------------------


@pytest.mark.parametrize("jitter", [1, 2, dt.timedelta(seconds=1)])
def test_jitter_as_long_as_the_period_is_refused(jitter: object) -> None:
    with pytest.raises(ValueError, match=r"jitter must be shorter than the period"):
        _decorate(jitter=jitter)


def test_negative_jitter_is_refused() -> None:
    with pytest.raises(ValueError, match=r"jitter must be finite and ≥ 0"):
        _decorate(jitter=-0.1)


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
def test_timeout_must_be_positive(timeout: object) -> None:
    with pytest.raises(ValueError, match=r"timeout must be finite and > 0"):
        _decorate(timeout=timeout)


def test_timeout_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"timeout must be a number of seconds"):
        _decorate(timeout="5s")


@pytest.mark.parametrize("retry", [3, True, {"attempts": 3}])
def test_retry_that_is_not_a_retry_policy_shows_how_to_build_one(retry: object) -> None:
    with pytest.raises(TypeError, match=r"retry must be a repeat_every\.Retry \(e\.g\. Retry\("):
        _decorate(retry=retry)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, r"attempts=.*int ≥ 1"),
        ({"attempts": 2.5}, r"attempts=.*int ≥ 1"),
        ({"backoff": -1}, r"backoff=.*≥ 0"),
        ({"multiplier": 0.5}, r"multiplier=.*≥ 1"),
        ({"max_backoff": float("inf")}, r"max_backoff=.*finite"),
    ],
)
def test_bad_retry_policy_is_refused_when_built(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Retry(**kwargs)


def test_retry_on_must_be_exception_classes() -> None:
    with pytest.raises(TypeError, match=r"Retry\(on=\.\.\.\) must be an exception class"):
        Retry(on=("ValueError",))  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", ["42", 1.5, True])
def test_seed_must_be_an_int(seed: object) -> None:
    with pytest.raises(TypeError, match=r"seed must be an int or None"):
        _decorate(seed=seed)


@pytest.mark.parametrize("name", ["", "   ", 42])
def test_name_must_be_a_non_empty_string(name: object) -> None:
    with pytest.raises(ValueError, match=r"name must be a non-empty string"):
        _decorate(name=name)


# -- store, align, fixed_delay, wait_first conflicts -------------------------------------------


def test_store_without_a_claim_method_is_refused() -> None:
    with pytest.raises(TypeError, match=r"store must be a claim store with an async claim"):
        _decorate(store=object())


def test_store_with_align_false_says_to_remove_it() -> None:
    with pytest.raises(ValueError, match=r"align=False cannot be used with a store.*remove"):
        _decorate(store=_Store(), align=False)


def test_store_with_fixed_delay_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fixed_delay=True cannot be aligned"):
        _decorate(store=_Store(), fixed_delay=True)


def test_store_with_wait_first_is_refused() -> None:
    with pytest.raises(ValueError, match=r"wait_first has no meaning on an aligned schedule"):
        _decorate(store=_Store(), wait_first=True)


def test_on_store_error_must_be_skip_or_run() -> None:
    with pytest.raises(ValueError, match=r"on_store_error must be 'skip' or 'run'"):
        _decorate(store=_Store(), on_store_error="retry")


def test_claim_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"claim_ttl must be finite and > 0"):
        _decorate(store=_Store(), claim_ttl=0)


def test_claim_ttl_no_longer_than_the_jitter_is_refused() -> None:
    with pytest.raises(ValueError, match=r"claim_ttl \(5 s\) must be longer than jitter \(5 s\)"):
        _decorate(seconds=60, store=_Store(), jitter=5, claim_ttl=5)
    assert _decorate(seconds=60, store=_Store(), jitter=5, claim_ttl=5.5).schedule.keyed


def test_valid_store_is_accepted_and_aligns_the_schedule() -> None:
    task = _decorate(seconds=60, store=_Store())
    assert task.schedule.keyed


def test_align_with_fixed_delay_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fixed_delay=True cannot be aligned"):
        _decorate(align=True, fixed_delay=True)


@pytest.mark.parametrize("wait_first", [True, 5])
def test_align_with_wait_first_is_refused(wait_first: object) -> None:
    with pytest.raises(ValueError, match=r"wait_first has no meaning.*remove wait_first"):
        _decorate(align=True, wait_first=wait_first)


@pytest.mark.parametrize("argument", ["align", "fixed_delay"])
def test_align_and_fixed_delay_must_be_bools(argument: str) -> None:
    with pytest.raises(TypeError, match=rf"{argument} must be True or False"):
        _decorate(**{argument: "yes"})


# -- what is decorated -------------------------------------------------------------------------


def test_bare_decorator_says_to_call_it_with_seconds() -> None:
    with pytest.raises(TypeError, match=r"@repeat_every\(seconds=60\)"):

        @repeat_every  # type: ignore[arg-type]
        def job() -> None:
            pass


def test_bare_decorator_on_async_def_says_to_call_it_with_seconds() -> None:
    with pytest.raises(TypeError, match=r"@repeat_every\(seconds=60\)"):

        @repeat_every  # type: ignore[arg-type]
        async def job() -> None:
            pass


def test_period_passed_positionally_says_to_name_it() -> None:
    with pytest.raises(TypeError, match=r"repeat_every\(seconds=60\)"):
        repeat_every(60)


def test_function_with_required_parameters_says_to_bind_them() -> None:
    def remove_expired_tokens(db: object, *, limit: int) -> None:
        pass

    with pytest.raises(TypeError, match=r"requires db, limit.*functools\.partial"):
        repeat_every(seconds=1)(remove_expired_tokens)


def test_unbound_method_is_refused_naming_self() -> None:
    class Cache:
        def refresh(self) -> None:
            pass

    with pytest.raises(TypeError, match=r"requires self"):
        repeat_every(seconds=1)(Cache.refresh)


def test_async_generator_function_is_refused() -> None:
    async def ticks() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match=r"generator function.*plain def or async def"):
        repeat_every(seconds=1)(ticks)


def test_generator_function_is_refused() -> None:
    def ticks() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match=r"generator function.*plain def or async def"):
        repeat_every(seconds=1)(ticks)


def test_partial_of_a_generator_function_is_refused() -> None:
    def ticks(n: int) -> Iterator[int]:
        yield n

    with pytest.raises(TypeError, match=r"generator function"):
        repeat_every(seconds=1)(functools.partial(ticks, 1))


def test_coroutine_object_is_refused_without_a_never_awaited_warning() -> None:
    coroutine = _noop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match=r"not a coroutine object.*\(job, not job\(\)\)"):
            repeat_every(seconds=1)(coroutine)  # type: ignore[arg-type]
        del coroutine
        gc.collect()
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("thing", [42, "job", None, [_noop]])
def test_non_callable_is_refused(thing: object) -> None:
    with pytest.raises(TypeError, match=r"repeat_every decorates a function"):
        repeat_every(seconds=1)(thing)  # type: ignore[arg-type]


# -- what is accepted ----------------------------------------------------------------------------


class _Recorder:
    """Remembers, for each call, whether it ran in the event loop's thread."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def note(self) -> None:
        self.threads.append(threading.get_ident())


def _jobs(recorder: _Recorder) -> dict[str, tuple[Callable[[], Any], bool]]:
    """Each accepted kind of job, and whether it must run on the event loop (async)."""

    def plain() -> None:
        recorder.note()

    async def coroutine_function() -> None:
        recorder.note()

    def with_default(times: int = 1) -> None:
        recorder.note()

    async def takes_arg(n: int) -> None:
        recorder.note()

    def sync_takes_arg(n: int) -> None:
        recorder.note()

    class AsyncCallable:
        _handle = "the job's own attribute"  # must not shadow the task's

        async def __call__(self) -> None:
            recorder.note()

    class SyncCallable:
        def __call__(self) -> None:
            recorder.note()

    class Service:
        def refresh(self) -> None:
            recorder.note()

        async def arefresh(self) -> None:
            recorder.note()

    return {
        "def": (plain, False),
        "async def": (coroutine_function, True),
        "def with defaults": (with_default, False),
        "partial of async def": (functools.partial(takes_arg, 1), True),
        "partial of def": (functools.partial(sync_takes_arg, 1), False),
        "object with async __call__": (AsyncCallable(), True),
        "object with sync __call__": (SyncCallable(), False),
        "bound method": (Service().refresh, False),
        "bound async method": (Service().arefresh, True),
    }


@pytest.mark.parametrize("kind", list(_jobs(_Recorder())))
async def test_accepted_job_runs_async_on_the_loop_and_sync_in_a_thread(
    kind: str, fake_clock: FakeClock
) -> None:
    recorder = _Recorder()
    func, is_async = _jobs(recorder)[kind]
    task = repeat_every(seconds=10)(func)
    handle = task()
    await fake_clock.advance(20)
    handle.cancel()
    await handle.wait()
    assert len(recorder.threads) == 3
    loop_thread = threading.get_ident()
    on_loop = [ident == loop_thread for ident in recorder.threads]
    assert on_loop == [is_async] * 3


def test_decorated_function_keeps_its_name_and_doc() -> None:
    def remove_expired_tokens() -> None:
        """Delete expired tokens."""

    task = repeat_every(seconds=1)(remove_expired_tokens)
    assert task.__name__ == "remove_expired_tokens"
    assert task.__doc__ == "Delete expired tokens."
    assert task.name.endswith(
        "test_decorated_function_keeps_its_name_and_doc.<locals>.remove_expired_tokens"
    )
    assert repeat_every(seconds=1, name="tokens")(remove_expired_tokens).name == "tokens"


async def test_call_runs_the_body_once_and_returns_what_it_returned(
    fake_clock: FakeClock,
) -> None:
    threads: list[str] = []

    @repeat_every(seconds=60)
    async def count_async() -> int:
        threads.append(threading.current_thread().name)
        return 3

    @repeat_every(seconds=60)
    def count_sync() -> str:
        threads.append(threading.current_thread().name)
        return "three"

    assert await count_async.call() == 3
    assert await count_sync.call() == "three"
    here = threading.current_thread().name
    assert threads[0] == here  # an async def on the loop…
    assert threads[1] != here  # …a def in a worker thread, as the loop calls them
    assert count_async.handle is None  # nothing was started
    assert len(fake_clock.history) == 0  # and nothing was recorded


async def test_def_job_that_returns_an_awaitable_has_it_awaited(fake_clock: FakeClock) -> None:
    done: list[str] = []

    async def finish() -> None:
        done.append(threading.current_thread().name)

    @repeat_every(seconds=60, max_repetitions=1)
    def job() -> Any:
        return finish()  # made in the worker thread, awaited on the loop

    handle = job()
    await fake_clock.advance(0)
    await handle.wait()
    assert done == [threading.current_thread().name]
    assert handle.failures == 0


def test_reprs_say_the_schedule() -> None:
    assert repr(repeat_every(seconds=10)) == "<repeat_every decorator every 10 s (fixed rate)>"
    delayed = repeat_every(seconds=10, fixed_delay=True)(_noop)
    assert repr(delayed).endswith("every 10 s after the previous run ended (fixed delay)>")
    aligned = repeat_every(seconds=60, align=True)(_noop)
    assert repr(aligned).endswith("every 60 s, aligned to the wall clock>")
    assert [delayed.schedule.keyed, aligned.schedule.keyed] == [False, True]
    assert repeat_every(seconds=10)(_noop).schedule.keyed is False


def test_fixed_delay_jitter_must_be_shorter_than_the_period() -> None:
    with pytest.raises(ValueError, match=r"jitter must be shorter than the period \(10 s\)"):
        _decorate(seconds=10, fixed_delay=True, jitter=10)


def test_builtin_without_a_signature_is_accepted_as_a_job() -> None:
    task = repeat_every(seconds=1)(dict)
    assert task.name == "builtins.dict"


def test_options_refuse_a_store_on_a_process_local_grid() -> None:
    # repeat_every aligns the grid whenever there is a store; the options hold the rule too.
    from repeat_every._options import TaskOptions
    from repeat_every._schedule import FixedRate

    with pytest.raises(ValueError, match=r"store needs ticks every process agrees on"):
        TaskOptions(FixedRate(10**9), store=_Store())


async def test_decoration_does_not_start_anything() -> None:
    calls: list[int] = []

    @repeat_every(seconds=1)
    async def job() -> None:
        calls.append(1)

    await asyncio.sleep(0)
    assert calls == []
    assert job.handle is None


def test_period_below_one_nanosecond_is_refused() -> None:
    with pytest.raises(ValueError, match=r"seconds must be at least 0\.001 s"):
        _decorate(seconds=1e-10)


def test_decorating_a_periodic_task_again_is_refused() -> None:
    task = repeat_every(seconds=1)(_noop)
    with pytest.raises(TypeError, match=r"already a periodic task.*one @repeat_every"):
        repeat_every(seconds=2)(task)
