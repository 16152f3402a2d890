"""OpenTelemetry metrics of every periodic task (``pip install 'repeat-every[opentelemetry]'``).

```python
from repeat_every.metrics.opentelemetry import OpenTelemetryMetrics

OpenTelemetryMetrics()  # through the global MeterProvider, until uninstall()
```

The instruments, on the meter ``"repeat_every"`` (attributes: ``task``, and ``outcome`` or
``reason``), are those of ``repeat_every.metrics.prometheus``:

| name | kind | unit | attributes |
|---|---|---|---|
| ``repeat_every.runs`` | counter | ``{run}`` | ``task``, ``outcome`` |
| ``repeat_every.run.duration`` | histogram | ``s`` | ``task`` |
| ``repeat_every.start.lateness`` | histogram | ``s`` | ``task`` |
| ``repeat_every.skipped_ticks`` | counter | ``{tick}`` | ``task``, ``reason`` |
| ``repeat_every.ticks_claimed_elsewhere`` | counter | ``{tick}`` | ``task`` |
| ``repeat_every.last_success.timestamp`` | gauge | ``s`` | ``task`` |
| ``repeat_every.runs.in_progress`` | up-down counter | ``{run}`` | ``task`` |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import metrics

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

# The installed instance of each meter provider, by id() (the instance holds the provider).
# The observable instruments' callbacks read through it: a meter hands back the instrument it
# made first (with its callbacks) when an instance is installed again on the same provider.
_ACTIVE: dict[int, OpenTelemetryMetrics] = {}


def _observer(
    provider: int, read: Callable[[OpenTelemetryMetrics], dict[str, Any]]
) -> Callable[[metrics.CallbackOptions], list[metrics.Observation]]:
    """The callback of an observable instrument: the values ``read`` finds in the instance
    installed on ``provider`` now, by task."""

    def observe(options: metrics.CallbackOptions) -> list[metrics.Observation]:
        installed = _ACTIVE.get(provider)
        if installed is None:
            return []
        return [
            metrics.Observation(value, installed._attrs(task))
            for task, value in list(read(installed).items())
        ]

    return observe


class OpenTelemetryMetrics:
    """Records the metrics of every task of the process through OpenTelemetry.

    Creating it makes the instruments on the meter ``"repeat_every"`` of ``meter_provider``
    (the global one, ``opentelemetry.metrics.get_meter_provider()``, unless given) and adds a
    listener (`add_listener`) that records into them; `uninstall` (or leaving its ``with``
    block) removes the listener. OpenTelemetry cannot remove instruments from a meter: after
    `uninstall` they stop changing, and the last-success gauge stops reporting.

    What is recorded is what `PrometheusMetrics` records (see there): runs by the outcome of
    their last attempt (and ``cancelled`` attempts), each run's duration, the lateness of each
    scheduled run's first attempt, skipped ticks by reason, ticks claimed elsewhere, the
    wall-clock time of the last success (an observable gauge, read at each collection), and
    the attempts in progress.

    One instance per meter provider at a time: a second one would count every event twice,
    and is refused until the first is uninstalled.
    """

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
        lateness_buckets: Sequence[float] = LATENESS_BUCKETS,
    ) -> None:
        from .. import __version__

        provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
        if id(provider) in _ACTIVE:
            raise RuntimeError(
                "repeat-every's OpenTelemetry metrics are already installed on this meter "
                "provider (every event would be counted twice): uninstall() the first one, or "
                "pass another meter_provider="
            )
        self._provider = provider
        meter = provider.get_meter("repeat_every", __version__)
        self.runs = meter.create_counter(
            "repeat_every.runs", "{run}", "Runs of periodic tasks, by outcome of their last attempt"
        )
        self.run_duration = meter.create_histogram(
            "repeat_every.run.duration",
            "s",
            "Seconds from a run's first attempt's start to its last attempt's end",
            explicit_bucket_boundaries_advisory=list(duration_buckets),
        )
        self.start_lateness = meter.create_histogram(
            "repeat_every.start.lateness",
            "s",
            "Seconds from a tick's due instant to the start of its run",
            explicit_bucket_boundaries_advisory=list(lateness_buckets),
        )
        self.skipped_ticks = meter.create_counter(
            "repeat_every.skipped_ticks",
            "{tick}",
            "Ticks not run, by reason (overrun, stale, paused, run_now, store_error)",
        )
        self.claimed_elsewhere = meter.create_counter(
            "repeat_every.ticks_claimed_elsewhere",
            "{tick}",
            "Ticks another worker claimed (with a claim store)",
        )
        # Attempts running now, by task, as this instance saw them start; read at collection
        # (an observable instrument: no measurement per attempt, which costs microseconds).
        self._running: dict[str, int] = {}
        self.in_progress = meter.create_observable_up_down_counter(
            "repeat_every.runs.in_progress",
            [_observer(id(provider), lambda installed: installed._running)],
            "{run}",
            "Attempts of the task running now",
        )
        # Wall-clock seconds of the last success, by task; read by the observable gauge.
        self._last_success: dict[str, float] = {}
        self.last_success = meter.create_observable_gauge(
            "repeat_every.last_success.timestamp",
            [_observer(id(provider), lambda installed: installed._last_success)],
            "s",
            "Unix time the last successful run of the task ended",
        )
        # Attribute mappings by task (and outcome or reason), made once each.
        self._attributes: dict[tuple[str, str, str], dict[str, str]] = {}
        self._handlers: dict[type, Callable[[Any], None]] = {
            AttemptStarted: self._attempt_started,
            AttemptEnded: self._attempt_ended,
            RunEnded: self._run_ended,
            TicksSkipped: self._ticks_skipped,
            ClaimedElsewhere: self._claimed_elsewhere,
        }
        _ACTIVE[id(provider)] = self
        self._subscription: Subscription | None = add_listener(self._on_event)

    def uninstall(self) -> None:
        """Stop recording (harmless twice)."""
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        subscription()
        del _ACTIVE[id(self._provider)]

    def __enter__(self) -> OpenTelemetryMetrics:
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

    def _attrs(self, task: str, name: str = "", value: str = "") -> dict[str, str]:
        key = (task, name, value)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {"task": task, name: value} if name else {"task": task}
            self._attributes[key] = attributes
        return attributes

    def _attempt_started(self, event: AttemptStarted) -> None:
        task = event.task
        self._running[task] = self._running.get(task, 0) + 1
        if event.attempt == 1 and not event.manual:
            self.start_lateness.record(max(event.started - event.scheduled, 0), self._attrs(task))

    def _attempt_ended(self, event: AttemptEnded) -> None:
        task = event.task
        running = self._running.get(task, 0)
        if running:  # not an attempt that started before the metrics were installed
            self._running[task] = running - 1
        if event.outcome == "cancelled":
            self.runs.add(1, self._attrs(task, "outcome", "cancelled"))

    def _run_ended(self, event: RunEnded) -> None:
        task = event.task
        self.runs.add(1, self._attrs(task, "outcome", event.outcome))
        self.run_duration.record(event.ended - event.started, self._attrs(task))
        if event.outcome == "ok":
            self._last_success[task] = event.wall

    def _ticks_skipped(self, event: TicksSkipped) -> None:
        self.skipped_ticks.add(event.ticks, self._attrs(event.task, "reason", event.reason))

    def _claimed_elsewhere(self, event: ClaimedElsewhere) -> None:
        self.claimed_elsewhere.add(1, self._attrs(event.task))
