"""Prometheus metrics of every job, served at /metrics (docs/operating.md, "Metrics")."""

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import make_asgi_app

from repeat_every import lifespan, repeat_every
from repeat_every.metrics.prometheus import PrometheusMetrics

exported: list[int] = []


@repeat_every(seconds=3600, name="export-orders")
async def export_orders() -> None:
    exported.append(len(exported))  # stands for: write the last hour's orders to the warehouse


@contextlib.asynccontextmanager
async def metrics(app: FastAPI) -> AsyncIterator[None]:
    with PrometheusMetrics():  # prometheus_client's default registry, until shutdown
        yield


app = FastAPI(lifespan=lifespan(export_orders, app_lifespan=metrics))
app.mount("/metrics", make_asgi_app())
