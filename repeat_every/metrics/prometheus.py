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
        self._tasks: dict[str, _TaskSeries] = {}  # each task's label children, made once
        self._handlers: dict[type, Callable[[Any], None]] = {
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

    def _series(self, task: str) -> _TaskSeries:
        series = self._tasks.get(task)
        if series is None:
            series = self._tasks[task] = _TaskSeries(self, task)
        return series

    def _attempt_started(self, event: AttemptStarted) -> None:
        series = self._series(event.task)
        series.running += 1
        series.in_progress.inc()
        if event.attempt == 1 and not event.manual:
            series.lateness.observe(max(event.started - event.scheduled, 0))

    def _attempt_ended(self, event: AttemptEnded) -> None:
        series = self._series(event.task)
        if series.running:  # not an attempt that started before the metrics were installed
            series.running -= 1
            series.in_progress.dec()
        if event.outcome == "cancelled":
            series.outcome("cancelled").inc()

    def _run_ended(self, event: RunEnded) -> None:
        series = self._series(event.task)
        series.outcome(event.outcome).inc()
        series.duration.observe(event.ended - event.started)
        if event.outcome == "ok":
            if series.last_success is None:  # made at the first success: absent before it
                series.last_success = self.last_success.labels(event.task)
            series.last_success.set(event.wall)

    def _ticks_skipped(self, event: TicksSkipped) -> None:
        self.skipped_ticks.labels(event.task, event.reason).inc(event.ticks)

    def _claimed_elsewhere(self, event: ClaimedElsewhere) -> None:
        self.claimed_elsewhere.labels(event.task).inc()


class _TaskSeries:
    """One task's label children of the per-run series (``.labels()`` takes a lock per call),
    and its attempts in progress as this instance saw them start."""

    __slots__ = (
        "_metrics",
        "_outcomes",
        "duration",
        "in_progress",
        "last_success",
        "lateness",
        "running",
        "task",
    )

    def __init__(self, metrics: PrometheusMetrics, task: str) -> None:
        self._metrics = metrics
        self.task = task
        self.duration = metrics.run_duration.labels(task)
        self.lateness = metrics.start_lateness.labels(task)
        self.in_progress = metrics.in_progress.labels(task)
        self.last_success: Any = None
        self._outcomes: dict[str, Any] = {}
        self.running = 0

    def outcome(self, outcome: str) -> Any:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self._metrics.runs.labels(self.task, outcome)
        return child
