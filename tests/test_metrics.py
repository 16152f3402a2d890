"""Prometheus and OpenTelemetry metrics, read from a real registry and a real in-memory reader
while jobs run under a ``FakeClock``."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

import repeat_every._events as events_module
from repeat_every import Retry, repeat_every, run_tasks
from repeat_every.metrics.opentelemetry import OpenTelemetryMetrics
from repeat_every.metrics.prometheus import PrometheusMetrics
from repeat_every.stores import SQLiteClaimStore
from repeat_every.testing import FakeClock

START = dt.datetime(2031, 3, 4, 5, 6, 0, tzinfo=dt.timezone.utc)
T0 = START.timestamp()


class Boom(Exception):
    """The failure jobs raise in these tests."""


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    with PrometheusMetrics(registry=registry):
        yield registry
    assert events_module.listeners == []


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def flaky_job(clock: FakeClock) -> Any:
    """A job whose runs go: fail then retried ok (run 0), ok (1), timeout (2), ok (3)..."""

    @repeat_every(seconds=60, retry=Retry(attempts=2, backoff=5), timeout=30, name="sync")
    async def sync() -> None:
        now = clock.now
        await asyncio.sleep(2)
        if now == 0:
            raise Boom("partner down")
        if now == 120:
            await asyncio.sleep(60)  # times out after 30 s; its retry at 155 s succeeds

    return sync


# -- Prometheus ----------------------------------------------------------------------------------


async def test_prometheus_counts_runs_by_outcome_and_observes_their_duration(
    registry: CollectorRegistry,
) -> None:
    with FakeClock(start=START) as clock:
        async with run_tasks(flaky_job(clock)):
            await clock.advance(150)  # runs at 0 (retried at 7), 60, 120 (timed out at 150)
            assert sample(registry, "repeat_every_runs_total", task="sync", outcome="ok") == 2
            assert (
                sample(registry, "repeat_every_runs_total", task="sync", outcome="failed") is None
            )
            # The run at 120 is waiting for its retry: not ended, not in progress.
            assert sample(registry, "repeat_every_runs_in_progress", task="sync") == 0
            await clock.advance(10)  # its retry at 155 s succeeds at 157
    assert sample(registry, "repeat_every_runs_total", task="sync", outcome="ok") == 3
    count = sample(registry, "repeat_every_run_duration_seconds_count", task="sync")
    total = sample(registry, "repeat_every_run_duration_seconds_sum", task="sync")
    assert (count, total) == (3, 9 + 2 + 37)  # 0→9 s, 60→62 s, 120→157 s
    assert sample(registry, "repeat_every_run_duration_seconds_bucket", task="sync", le="5.0") == 1
    assert sample(registry, "repeat_every_run_duration_seconds_bucket", task="sync", le="10.0") == 2
    assert sample(registry, "repeat_every_last_success_timestamp_seconds", task="sync") == T0 + 157


async def test_prometheus_counts_failed_timed_out_and_cancelled_runs(
    registry: CollectorRegistry, fake_clock: FakeClock
) -> None:
    @repeat_every(seconds=60, timeout=10, name="bad")
    async def bad() -> None:
        if fake_clock.now == 0:
            raise Boom("no")
        await asyncio.sleep(100 if fake_clock.now == 60 else 1000)

    handle = bad()
    await fake_clock.advance(125)  # failed at 0, timed out at 70, the run at 120 sleeps
    closing = asyncio.create_task(handle.aclose(timeout=1))
    await fake_clock.advance(1)
    await closing
    for outcome, runs in (("failed", 1), ("timeout", 1), ("cancelled", 1), ("ok", None)):
        assert sample(registry, "repeat_every_runs_total", task="bad", outcome=outcome) == runs
    assert sample(registry, "repeat_every_runs_in_progress", task="bad") == 0
    assert sample(registry, "repeat_every_last_success_timestamp_seconds", task="bad") is None


async def test_prometheus_shows_the_runs_in_progress(
    registry: CollectorRegistry, fake_clock: FakeClock
) -> None:
    @repeat_every(seconds=60, name="long")
    async def long() -> None:
        await asyncio.sleep(30)

    async with run_tasks(long):
        await fake_clock.advance(10)
        assert sample(registry, "repeat_every_runs_in_progress", task="long") == 1
        await fake_clock.advance(30)
        assert sample(registry, "repeat_every_runs_in_progress", task="long") == 0


async def test_prometheus_observes_the_lateness_of_scheduled_first_attempts_only(
    registry: CollectorRegistry,
) -> None:
    with FakeClock(start=START) as clock:
        calls: list[float] = []

        @repeat_every(seconds=10, jitter=3, seed=7, retry=Retry(attempts=2, backoff=1))
        async def job() -> None:
            calls.append(clock.now)
            if len(calls) == 1:
                raise Boom("first run's first attempt")

        async with run_tasks(job) as (handle,):
            await clock.advance(25)  # three scheduled runs, one retry
            await handle.run_now()  # not on the schedule: not observed
    name = job.name
    assert sample(registry, "repeat_every_start_lateness_seconds_count", task=name) == 3
    late = sample(registry, "repeat_every_start_lateness_seconds_sum", task=name)
    assert late is not None
    assert 0 < late < 9  # each start is delayed by its jitter, below 3 s
    assert sample(registry, "repeat_every_runs_total", task=name, outcome="ok") == 4


async def test_prometheus_counts_skipped_ticks_by_reason(
    registry: CollectorRegistry, fake_clock: FakeClock
) -> None:
    @repeat_every(seconds=10, name="skippy")
    async def skippy() -> None:
        if fake_clock.now == 0:
            await asyncio.sleep(25)  # covers the ticks at 10 and 20

    async with run_tasks(skippy) as (handle,):
        await fake_clock.advance(35)  # runs at 0 and 30
        handle.pause()
        await fake_clock.advance(20)  # ticks at 40 and 50
    overrun = sample(registry, "repeat_every_skipped_ticks_total", task="skippy", reason="overrun")
    paused = sample(registry, "repeat_every_skipped_ticks_total", task="skippy", reason="paused")
    assert (overrun, paused) == (2, 2)


async def test_prometheus_counts_ticks_claimed_by_another_worker(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")

    def worker() -> Any:
        @repeat_every(seconds=1, store=store, name="shared")
        async def job() -> None:
            pass

        return job

    with FakeClock(start=START) as clock:
        handles = [worker()(), worker()()]
        await clock.advance(4)
        for handle in handles:
            await handle.aclose()
        await store.aclose()
    assert sample(registry, "repeat_every_ticks_claimed_elsewhere_total", task="shared") == 5
    assert sample(registry, "repeat_every_runs_total", task="shared", outcome="ok") == 5


async def test_prometheus_installed_during_a_run_never_shows_a_negative_count_in_progress(
    fake_clock: FakeClock,
) -> None:
    @repeat_every(seconds=60, name="midway")
    async def midway() -> None:
        await asyncio.sleep(10)

    registry = CollectorRegistry()
    async with run_tasks(midway):
        await fake_clock.advance(5)  # the first run is in progress
        with PrometheusMetrics(registry=registry):
            await fake_clock.advance(10)  # it ends at 10, unseen by the metrics when it started
            # Not -1: the end of an attempt whose start it did not see is not subtracted.
            assert sample(registry, "repeat_every_runs_in_progress", task="midway") == 0
            assert sample(registry, "repeat_every_runs_total", task="midway", outcome="ok") == 1
            await fake_clock.advance(50)  # the next run: 60 → 70
            assert sample(registry, "repeat_every_runs_in_progress", task="midway") == 1
            await fake_clock.advance(10)  # it ends, so that leaving run_tasks waits for nothing
            assert sample(registry, "repeat_every_runs_in_progress", task="midway") == 0


def test_prometheus_uninstall_unregisters_the_series_and_a_second_install_is_refused() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry=registry)
    with pytest.raises(ValueError, match=r"already registered in this registry.*uninstall\(\)"):
        PrometheusMetrics(registry=registry)
    assert len(events_module.listeners) == 1  # the refused one added no listener
    text = prometheus_client.generate_latest(registry).decode()
    for name in (
        "repeat_every_runs_total",
        "repeat_every_run_duration_seconds",
        "repeat_every_start_lateness_seconds",
        "repeat_every_skipped_ticks_total",
        "repeat_every_ticks_claimed_elsewhere_total",
        "repeat_every_last_success_timestamp_seconds",
        "repeat_every_runs_in_progress",
    ):
        assert f"# TYPE {name} " in text
    metrics.uninstall()
    metrics.uninstall()
    assert prometheus_client.generate_latest(registry) == b""
    assert events_module.listeners == []
    PrometheusMetrics(registry=registry).uninstall()  # the registry is free again


def test_prometheus_registers_all_its_series_or_none() -> None:
    registry = CollectorRegistry()
    mine = prometheus_client.Gauge(
        "repeat_every_runs_in_progress", "the app's own", registry=registry
    )
    with pytest.raises(ValueError, match="or a metric of the same name"):
        PrometheusMetrics(registry=registry)
    assert list(registry._collector_to_names) == [mine]  # type: ignore[attr-defined]
    assert events_module.listeners == []


def test_prometheus_uses_the_default_registry_unless_told() -> None:
    with PrometheusMetrics() as metrics:
        assert metrics.registry is prometheus_client.REGISTRY
        names = prometheus_client.REGISTRY._collector_to_names  # type: ignore[attr-defined]
        assert metrics.runs in names
    assert metrics.runs not in names


# -- OpenTelemetry -------------------------------------------------------------------------------


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with OpenTelemetryMetrics(meter_provider=provider):
        yield reader
    provider.shutdown()
    assert events_module.listeners == []


def points(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset[Any]], Any]:
    """Every data point the reader collects, by instrument name and attributes."""
    found: dict[tuple[str, frozenset[Any]], Any] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "repeat_every"
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    found[metric.name, frozenset(point.attributes.items())] = point
    return found


def key(name: str, **attributes: str) -> tuple[str, frozenset[Any]]:
    return name, frozenset(attributes.items())


async def test_opentelemetry_records_the_same_series(reader: InMemoryMetricReader) -> None:
    with FakeClock(start=START) as clock:
        async with run_tasks(flaky_job(clock)) as (handle,):
            await clock.advance(130)  # runs at 0 (retried at 7), 60; the run at 120 in progress
            found = points(reader)
            assert found[key("repeat_every.runs.in_progress", task="sync")].value == 1
            await clock.advance(30)  # the run at 120 timed out at 150, its retry ok at 157
            handle.pause()
            await clock.advance(60)  # the tick at 180 comes while paused
    found = points(reader)
    assert found[key("repeat_every.runs", task="sync", outcome="ok")].value == 3
    assert found[key("repeat_every.runs.in_progress", task="sync")].value == 0
    duration = found[key("repeat_every.run.duration", task="sync")]
    assert (duration.count, duration.sum) == (3, 9 + 2 + 37)
    assert list(duration.explicit_bounds[:3]) == [0.005, 0.01, 0.025]
    lateness = found[key("repeat_every.start.lateness", task="sync")]
    assert (lateness.count, lateness.sum) == (3, 0)
    assert found[key("repeat_every.skipped_ticks", task="sync", reason="paused")].value == 1
    assert found[key("repeat_every.last_success.timestamp", task="sync")].value == T0 + 157


async def test_opentelemetry_counts_failed_and_cancelled_runs_and_ticks_claimed_elsewhere(
    tmp_path: Path,
) -> None:
    store = SQLiteClaimStore(tmp_path / "claims.db")

    def worker() -> Any:
        @repeat_every(seconds=1, store=store, name="shared")
        async def job() -> None:
            pass

        return job

    @repeat_every(seconds=10, name="failing")
    async def failing() -> None:
        raise Boom("no")

    @repeat_every(seconds=10, name="stuck")
    async def stuck() -> None:
        await asyncio.sleep(1000)

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with FakeClock(start=START) as clock:
        handles = [stuck()]
        await clock.advance(1)  # its run started at 0, before the metrics were installed
        with OpenTelemetryMetrics(meter_provider=provider):
            handles += [worker()(), worker()(), failing()]
            await clock.advance(1)  # "shared": ticks at 1 and 2 s; "failing": a run at 1 s
            closing = [asyncio.create_task(handle.aclose(timeout=1)) for handle in handles]
            await clock.advance(1)
            await asyncio.gather(*closing)
            found = points(reader)
        await store.aclose()
    provider.shutdown()
    assert found[key("repeat_every.runs", task="stuck", outcome="cancelled")].value == 1
    assert found[key("repeat_every.ticks_claimed_elsewhere", task="shared")].value == 2
    assert found[key("repeat_every.runs", task="shared", outcome="ok")].value == 2
    assert found[key("repeat_every.runs", task="failing", outcome="failed")].value == 1
    # The end of an attempt whose start the metrics did not see is not subtracted.
    assert key("repeat_every.runs.in_progress", task="stuck") not in found
    assert key("repeat_every.last_success.timestamp", task="failing") not in found


async def test_opentelemetry_refuses_a_second_install_on_a_provider_until_uninstalled(
    fake_clock: FakeClock,
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first = OpenTelemetryMetrics(meter_provider=provider)
    with pytest.raises(RuntimeError, match="already installed on this meter provider"):
        OpenTelemetryMetrics(meter_provider=provider)

    @repeat_every(seconds=10, name="job")
    async def job() -> None:
        await asyncio.sleep(5)

    async with run_tasks(job):
        await fake_clock.advance(1)
        assert points(reader)[key("repeat_every.runs.in_progress", task="job")].value == 1
        first.uninstall()
        first.uninstall()
        assert events_module.listeners == []
        assert key("repeat_every.runs.in_progress", task="job") not in points(reader)
        # Installed again on the same provider: the meter hands back the instruments it made
        # first, and their observations come from the new instance.
        with OpenTelemetryMetrics(meter_provider=provider):
            await fake_clock.advance(10)  # the run ends at 5 (unseen); the next runs 10 → 15
            found = points(reader)
            assert found[key("repeat_every.runs.in_progress", task="job")].value == 1
            await fake_clock.advance(5)
            found = points(reader)
    assert found[key("repeat_every.last_success.timestamp", task="job")].value > 0
    assert found[key("repeat_every.runs.in_progress", task="job")].value == 0
    provider.shutdown()


def test_opentelemetry_uses_the_global_meter_provider_unless_told() -> None:
    # Without an SDK configured, the global provider records nothing: installing still works.
    with OpenTelemetryMetrics() as metrics:
        assert len(events_module.listeners) == 1
        metrics._on_event(events_module.TicksSkipped("job", T0, reason="paused", ticks=1))
    assert events_module.listeners == []
