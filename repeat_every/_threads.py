"""The worker threads of ``def`` jobs and sync hooks: daemon threads, so a stuck job never
keeps the process alive.

asyncio's default executor is a ``ThreadPoolExecutor``, whose threads are joined when the
event loop shuts down (``asyncio.run`` waits up to 300 s for them on Python ≥ 3.12, for ever
before) and again when the interpreter exits. A ``def`` job stuck in ``time.sleep(1000)``
would then hold a server that was told to stop, long after its shutdown timeout abandoned the
run, until Kubernetes kills it. Daemon threads are not joined: once the loop is over, the
process exits and the stuck call dies with it.

The pool reuses idle threads and grows to ``min(32, cpu + 4)`` threads, as the default
executor does; work beyond that waits in a queue.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable
from typing import Any


class DaemonExecutor(concurrent.futures.Executor):
    """An executor of daemon threads (see the module docstring); what `loop.run_in_executor`
    is given for ``def`` runs, so that the FakeClock still sees them as worker threads.

    Invariant: ``_idle`` counts threads that have finished a work item and wait for the next;
    a submit takes one before it would start a new thread.
    """

    def __init__(self, max_workers: int | None = None) -> None:
        self._max = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if self._threads < self._max:
                    self._threads += 1
                    name = f"repeat_every-worker-{self._threads}"
                    threading.Thread(target=self._work, name=name, daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            future, fn, args, kwargs = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                del future, fn, args, kwargs  # hold nothing of a finished job while idle
            self._idle.release()


_Work = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]

_executor: DaemonExecutor | None = None


def executor() -> DaemonExecutor:
    """The process's pool, made on first use (a new one in a forked child)."""
    global _executor
    if _executor is None:
        _executor = DaemonExecutor()
    return _executor


def _forget_after_fork() -> None:
    global _executor
    _executor = None  # the parent's threads do not exist in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
