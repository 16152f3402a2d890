"""Metrics of every periodic task of the process, built on the events (`add_listener`).

Two optional modules, each importing its client library only when you import it (this
package itself imports nothing):

- ``repeat_every.metrics.prometheus``: `PrometheusMetrics`, with ``prometheus_client``
  (``pip install 'repeat-every[prometheus]'``);
- ``repeat_every.metrics.opentelemetry``: `OpenTelemetryMetrics`, with ``opentelemetry-api``
  (``pip install 'repeat-every[opentelemetry]'``).

Both record the same series: runs by task and outcome, run duration, start lateness, skipped
ticks by reason, ticks claimed by another worker, the last success's timestamp, and the runs
in progress. docs/operating.md lists them with a query for each.
"""

DURATION_BUCKETS: tuple[float, ...] = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)
"""Default bucket bounds of the run duration histogram (seconds): 5 ms to an hour."""

LATENESS_BUCKETS: tuple[float, ...] = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
"""Default bucket bounds of the start lateness histogram (seconds): 0.5 ms to a minute."""
