"""Prometheus metrics of every periodic task (``pip install 'repeat-every[prometheus]'``).

```python
from repeat_every.metrics.prometheus import PrometheusMetrics

PrometheusMetrics()  # into prometheus_client's default registry, until uninstall()
```

The series (``task`` is the task's name):

| name | type | labels |
|---|---|---|
| ``repeat_every_runs_total`` | counter | ``task``, ``outcome`` |
| ``repeat_every_run_duration_seconds`` | histogram | ``task`` |
| ``repeat_every_start_lateness_seconds`` | histogram | ``task`` |
| ``repeat_every_skipped_ticks_total`` | counter | ``task``, ``reason`` |
| ``repeat_every_ticks_claimed_elsewhere_total`` | counter | ``task`` |
| ``repeat_every_last_success_timestamp_seconds`` | gauge | ``task`` |
| ``repeat_every_runs_in_progress`` | gauge | ``task`` |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from .._events import (
    AttemptEnded,
    AttemptStarted,
    ClaimedElsewhere,
    RunEnded,
    Subscription,
    TaskEvent,
    TicksSkipped,
    add_listener,
)
from . import DURATION_BUCKETS, LATENESS_BUCKETS


class PrometheusMetrics:
    """Records the metrics of every task of the process into a Prometheus registry.

    Creating it registers the series in ``registry`` (prometheus_client's default registry
    unless given) and adds a listener (`add_listener`) that updates them; `uninstall` (or
    leaving its ``with`` block) removes the listener and unregisters the series. Serve them as
    usual, e.g. ``app.mount("/metrics", prometheus_client.make_asgi_app())``.

    What is counted: ``repeat_every_runs_total`` counts runs (a run with retries counts once,
    with its last attempt's outcome: ``ok``, ``failed``, ``timeout``) and runs cancelled
    mid-attempt (``cancelled``: at shutdown, or by ``cancel()``); the duration histogram
    observes each run from its first attempt's start to its end; the lateness histogram, the
    first attempt of each scheduled run (not `run_now()` runs, not retries); the in-progress
    gauge counts attempts running now (a run waiting for its retry's backoff is not in
    progress). ``run_now()`` runs count like the others. Series of a task appear with its first
    event (the last-success gauge with its first success).

    Under ``prometheus_client``'s multiprocess mode (several worker processes, one
    ``PROMETHEUS_MULTIPROC_DIR``), the last-success gauge reports the latest of the processes
    (``max``) and the in-progress gauge the sum over the live ones (``livesum``).
    """

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        *,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
        lateness_buckets: Sequence[float] = LATENESS_BUCKETS,
    ) -> None:
        self.registry = registry
        self.runs = Counter(
            "repeat_every_runs",
            "Runs of periodic tasks, by outcome of their last attempt",
            ("task", "outcome"),
            registry=None,  # registered below, all or none
        )
        self.run_duration = Histogram(
            "repeat_every_run_duration_seconds",
            "Seconds from a run's first attempt's start to its last attempt's end",
            ("task",),
            buckets=tuple(duration_buckets),
            registry=None,  # registered below, all or none
        )
        self.start_lateness = Histogram(
            "repeat_every_start_lateness_seconds",
            "Seconds from a tick's due instant to the start of its run",
            ("task",),
            buckets=tuple(lateness_buckets),
            registry=None,  # registered below, all or none
        )
        self.skipped_ticks = Counter(
            "repeat_every_skipped_ticks",
            "Ticks not run, by reason (overrun, stale, paused, run_now, store_error)",
            ("task", "reason"),
            registry=None,  # registered below, all or none
        )
        self.claimed_elsewhere = Counter(
            "repeat_every_ticks_claimed_elsewhere",
            "Ticks another worker claimed (with a claim store)",
            ("task",),
            registry=None,  # registered below, all or none
        )
        self.last_success = Gauge(
            "repeat_every_last_success_timestamp_seconds",
            "Unix time the last successful run of the task ended",
            ("task",),
            multiprocess_mode="max",
            registry=None,  # registered below, all or none
        )
        self.in_progress = Gauge(
            "repeat_every_runs_in_progress",
            "Attempts of the task running now",
            ("task",),
            multiprocess_mode="livesum",
            registry=None,  # registered below, all or none
        )
        self._collectors = (
            self.runs,
            self.run_duration,
            self.start_lateness,
            self.skipped_ticks,
            self.claimed_elsewhere,
            self.last_success,
            self.in_progress,
        )
        registered: list[Any] = []
        try:
            for collector in self._collectors:
                registry.register(collector)
                registered.append(collector)
        except ValueError as error:  # "Duplicated timeseries in CollectorRegistry"
            for collector in registered:
                registry.unregister(collector)
            raise ValueError(
                "repeat-every's metrics are already registered in this registry (another "
                "PrometheusMetrics installed there, or a metric of the same name): uninstall() "
                f"it first, or pass another registry= ({error})"
            ) from error
        # Label children, by task (and outcome or reason): .labels() takes a lock each call.
        self._children: dict[tuple[Any, str, str], Any] = {}
        self._running: dict[str, int] = {}  # attempts seen starting and not yet ending
        self._handlers: dict[type[TaskEvent], Callable[[Any], None]] = {
            AttemptStarted: self._attempt_started,
            AttemptEnded: self._attempt_ended,
            RunEnded: self._run_ended,
            TicksSkipped: self._ticks_skipped,
            ClaimedElsewhere: self._claimed_elsewhere,
        }
        self._subscription: Subscription | None = add_listener(self._on_event)

    def uninstall(self) -> None:
        """Stop recording, and unregister the series from the registry (harmless twice)."""
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        subscription()
        for collector in self._collectors:
            self.registry.unregister(collector)

    def __enter__(self) -> PrometheusMetrics:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    # -- the listener --------------------------------------------------------------------------

    def _on_event(self, event: TaskEvent) -> None:
        self._handlers[type(event)](event)

    def _child(self, metric: Any, task: str, label: str = "") -> Any:
        key = (metric, task, label)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(task, label) if label else metric.labels(task)
            self._children[key] = child
        return child

    def _attempt_started(self, event: AttemptStarted) -> None:
        task = event.task
        self._running[task] = self._running.get(task, 0) + 1
        self._child(self.in_progress, task).inc()
        if event.attempt == 1 and not event.manual:
            self._child(self.start_lateness, task).observe(max(event.started - event.scheduled, 0))

    def _attempt_ended(self, event: AttemptEnded) -> None:
        task = event.task
        running = self._running.get(task, 0)
        if running:  # not an attempt that started before the metrics were installed
            self._running[task] = running - 1
            self._child(self.in_progress, task).dec()
        if event.outcome == "cancelled":
            self._child(self.runs, task, "cancelled").inc()

    def _run_ended(self, event: RunEnded) -> None:
        task = event.task
        self._child(self.runs, task, event.outcome).inc()
        self._child(self.run_duration, task).observe(event.ended - event.started)
        if event.outcome == "ok":
            self._child(self.last_success, task).set(event.wall)

    def _ticks_skipped(self, event: TicksSkipped) -> None:
        self._child(self.skipped_ticks, event.task, event.reason).inc(event.count)

    def _claimed_elsewhere(self, event: ClaimedElsewhere) -> None:
        self._child(self.claimed_elsewhere, event.task).inc()
