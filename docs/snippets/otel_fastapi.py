"""OpenTelemetry metrics from a FastAPI app.

Run it: `python otel_fastapi.py` (it serves two requests through
FastAPI's test client and reads the metrics from OpenTelemetry's
in-memory reader).
"""

from typing import Any

import perrequest.otel
from fastapi import FastAPI
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware

# Your reader and exporter as usual, for instance
# PeriodicExportingMetricReader(ConsoleMetricExporter()). This one keeps
# the metrics in memory for the asserts below.
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
perrequest.otel.instrument()

app = FastAPI()
app.add_middleware(RequestScopeMiddleware)


@request_memo
def load_user(user_id: int) -> str:
    return f"user {user_id}"  # a stub database query


@app.get("/users/{user_id}")
def show_user(user_id: int) -> dict[str, str]:
    load_user(user_id)
    return {"name": load_user(user_id)}  # a memo hit


def exported() -> dict[str, Any]:
    """Each metric's data points, as the exporter would send them."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric.data.data_points
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


if __name__ == "__main__":
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        client.get("/users/7")
        client.get("/users/8")
    points = exported()
    [hits] = points["perrequest.memo.hits"]
    assert hits.attributes == {"perrequest.function": "__main__.load_user"}
    assert hits.value == 2  # one hit per request
    [entries] = points["perrequest.scope.entries"]
    assert entries.count == 2  # one per request
