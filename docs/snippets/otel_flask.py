"""OpenTelemetry metrics from a Flask app.

Run it: `python otel_flask.py` (it serves two requests through Flask's
test client and reads the metrics from OpenTelemetry's in-memory reader).
"""

import perrequest.otel
from flask import Flask
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from perrequest import request_memo
from perrequest.flask import PerRequest

# Your reader and exporter as usual; this one keeps the metrics in memory
# for the asserts below.
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

app = Flask(__name__)
PerRequest(app)
perrequest.otel.instrument()


@request_memo
def load_user(user_id: int) -> str:
    return f"user {user_id}"  # a stub database query


@app.get("/users/<int:user_id>")
def show_user(user_id: int) -> dict[str, str]:
    load_user(user_id)
    return {"name": load_user(user_id)}  # a memo hit


if __name__ == "__main__":
    client = app.test_client()
    for user_id in (7, 8):
        # Close the response, as a server does: the request's scope closes.
        with client.get(f"/users/{user_id}") as response:
            assert response.json == {"name": f"user {user_id}"}
    data = reader.get_metrics_data()
    assert data is not None
    [hits] = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "perrequest.memo.hits"
        for point in metric.data.data_points
    ]
    assert hits.attributes == {"perrequest.function": "__main__.load_user"}
    assert hits.value == 2  # one hit per request
