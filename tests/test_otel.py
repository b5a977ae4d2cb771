"""perrequest.otel with the OpenTelemetry SDK's in-memory metric reader and span exporter."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from servers import run_python, serve_uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import perrequest
from perrequest import otel, request_memo, request_scope
from perrequest.asgi import RequestScopeMiddleware

NAME = f"{__name__}.lookup"


@request_memo
def lookup(x: int) -> int:
    time.sleep(0.001)
    return x


@request_memo(max_entries=1)
def one_at_a_time(x: int) -> int:
    return x


@pytest.fixture
def spans() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer(__name__), exporter
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Metric name -> its data points."""
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def by_function(points: list[Any]) -> dict[str, int]:
    return {p.attributes["perrequest.function"]: p.value for p in points}


def test_counters_per_function_and_histograms_per_scope(reader: InMemoryMetricReader) -> None:
    for _ in range(2):
        with request_scope():
            for x in (1, 1, 1, 2):
                lookup(x)
            for x in (1, 2, 3):
                one_at_a_time(x)
            perrequest.get_or_set("k", lambda: 1)
    found = points(reader)
    bounded = f"{__name__}.one_at_a_time"
    helpers = "perrequest.helpers"
    # Each function's three series start together, at zero.
    assert by_function(found["perrequest.memo.hits"]) == {NAME: 4, bounded: 0, helpers: 0}
    assert by_function(found["perrequest.memo.misses"]) == {NAME: 4, bounded: 6, helpers: 2}
    assert by_function(found["perrequest.memo.evictions"]) == {NAME: 0, bounded: 4, helpers: 0}
    [entries] = found["perrequest.scope.entries"]
    assert (entries.count, entries.sum, entries.max) == (2, 2 * 4, 4)  # peak: 2 + 1 + 1 each
    [saved] = found["perrequest.scope.saved"]
    # Each scope: 2 hits x the mean of two ~1 ms misses.
    assert saved.count == 2 and 2 * 2 * 0.001 <= saved.sum < 2 * 2 * 0.05
    assert saved.explicit_bounds[:3] == (0, 0.0001, 0.00025)


def test_totals_are_set_on_the_span_active_as_the_scope_closes(
    reader: InMemoryMetricReader, spans: tuple[trace.Tracer, InMemorySpanExporter]
) -> None:
    tracer, exporter = spans
    with tracer.start_as_current_span("GET /"), request_scope():
        lookup(1)
        lookup(1)
    with request_scope():  # no span: nothing to set, nothing fails
        lookup(1)
    [span] = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["perrequest.scope.hits"] == 1
    assert attributes["perrequest.scope.misses"] == 1
    assert attributes["perrequest.scope.entries"] == 1
    assert attributes["perrequest.scope.peak_entries"] == 1
    assert attributes["perrequest.scope.evictions"] == 0
    assert attributes["perrequest.scope.saved"] > 0


class SpanAroundTheApp:
    """A server span around the whole app call, which the scope closes inside: what
    Django's instrumentation does (below), and what an ASGI app gets by wrapping
    perrequest's middleware in a span of its own (docs/observability.md)."""

    def __init__(self, app: Any, tracer: trace.Tracer) -> None:
        self.app, self.tracer = app, tracer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span(f"{scope['method']} {scope['path']}"):
            await self.app(scope, receive, send)


async def _index(request: Any) -> PlainTextResponse:
    return PlainTextResponse(str(sum(lookup(x) for x in (1, 2, 1, 2, 1))))


def _served_spans(app: Any, exporter: InMemorySpanExporter, count: int) -> list[Any]:
    """``count`` requests to ``app`` under uvicorn; the server spans they made."""
    with serve_uvicorn(app) as url:
        for _ in range(count):
            assert httpx.get(url + "/").text == "7"
        deadline = time.monotonic() + 5
        while len(_server(exporter)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
    return _server(exporter)


def _server(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.SERVER]


def _totals(span: Any) -> dict[str, Any]:
    return {k: v for k, v in (span.attributes or {}).items() if k.startswith("perrequest.")}


def test_under_uvicorn_a_span_around_the_app_gets_the_totals(
    reader: InMemoryMetricReader, spans: tuple[trace.Tracer, InMemorySpanExporter]
) -> None:
    tracer, exporter = spans
    app = Starlette(routes=[Route("/", _index)])
    app.add_middleware(RequestScopeMiddleware)
    with serve_uvicorn(SpanAroundTheApp(app, tracer)) as url:
        for _ in range(3):
            assert httpx.get(url + "/").text == "7"
        deadline = time.monotonic() + 5
        while len(exporter.get_finished_spans()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finished = exporter.get_finished_spans()
    assert [s.attributes["perrequest.scope.hits"] for s in finished] == [3, 3, 3]  # type: ignore[index]
    assert by_function(points(reader)["perrequest.memo.hits"]) == {NAME: 9}


def test_opentelemetrys_asgi_server_span_ends_before_the_scope_closes(
    reader: InMemoryMetricReader,
) -> None:
    """opentelemetry-instrumentation-asgi (FastAPI's and Starlette's instrumentors too) ends
    its server span as the response's last body message is sent, before the app returns
    and the scope closes: the span gets no totals; the metrics count the requests."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Starlette(routes=[Route("/", _index)])
    app.add_middleware(RequestScopeMiddleware)
    server_spans = _served_spans(
        OpenTelemetryMiddleware(app, tracer_provider=provider), exporter, 3
    )
    provider.shutdown()
    assert len(server_spans) == 3 and [_totals(s) for s in server_spans] == [{}, {}, {}]
    assert by_function(points(reader)["perrequest.memo.hits"]) == {NAME: 9}


def test_opentelemetrys_wsgi_server_span_ends_before_the_body_is_closed(
    reader: InMemoryMetricReader,
) -> None:
    """opentelemetry-instrumentation-wsgi (Flask's instrumentor too) ends its server span
    before the server closes the body, where the scope closes: no totals on it."""
    from flask import Flask
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware as OtelWSGI

    from perrequest.flask import PerRequest

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Flask(__name__)
    PerRequest(app)
    app.get("/")(lambda: str(sum(lookup(x) for x in (1, 2, 1, 2, 1))))
    app.wsgi_app = OtelWSGI(app.wsgi_app, tracer_provider=provider)  # type: ignore[method-assign]
    client = app.test_client()
    for _ in range(3):
        with client.get("/") as response:
            assert response.get_data(as_text=True) == "7"
    server_spans = _server(exporter)
    provider.shutdown()
    assert len(server_spans) == 3 and [_totals(s) for s in server_spans] == [{}, {}, {}]
    assert by_function(points(reader)["perrequest.memo.hits"]) == {NAME: 9}


_DJANGO_INSTRUMENTED = """
import json
import django
from django.conf import settings

settings.configure(
    SECRET_KEY="otel", ALLOWED_HOSTS=["*"], ROOT_URLCONF="__main__",
    MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],
)
from opentelemetry.instrumentation.django import DjangoInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import perrequest.otel
from perrequest import add_scope_listener, request_memo

closed = []
add_scope_listener(lambda stats: closed.append([stats.hits, stats.misses]))
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
DjangoInstrumentor().instrument(tracer_provider=provider)
perrequest.otel.instrument()
django.setup()
from django.http import HttpResponse
from django.test import Client
from django.urls import path


@request_memo
def lookup(x):
    return x


urlpatterns = [path("", lambda request: HttpResponse(str(sum(map(lookup, (1, 2, 1, 2, 1))))))]
assert Client().get("/").content == b"7"
print(json.dumps([[dict(s.attributes) for s in exporter.get_finished_spans()], closed]))
"""


def test_opentelemetrys_django_server_span_ends_before_the_scope() -> None:
    """DjangoInstrumentor's middleware ends its server span in process_response; the scope
    ends later, as Django closes the response (DESIGN.md): the totals reach the metrics,
    not that span (a process of its own: instrumenting patches Django's settings)."""
    done = run_python(_DJANGO_INSTRUMENTED)
    assert done.returncode == 0, done.stderr
    [[span], closed] = json.loads(done.stdout)
    assert "http.request.method" in span or "http.method" in span  # the server span
    assert not [name for name in span if name.startswith("perrequest.")]
    assert closed == [[3, 2]]


def test_instrument_again_replaces_and_uninstrument_stops() -> None:
    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    otel.instrument(MeterProvider(metric_readers=[first]))
    otel.instrument(MeterProvider(metric_readers=[second]))
    try:
        assert otel.is_instrumented()
        with request_scope():
            lookup(1)
        assert "perrequest.memo.misses" not in points(first)
        assert by_function(points(second)["perrequest.memo.misses"]) == {NAME: 1}
    finally:
        otel.uninstrument()
    with request_scope():
        lookup(1)
    assert "perrequest.memo.misses" not in points(second)  # stopped: nothing reported
    assert not otel.is_instrumented()
    otel.uninstrument()  # again: nothing to do


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_a_counter_never_goes_back_when_instrument_is_called_again(temporality: str) -> None:
    """The SDK hands a meter's counters back as first made, callback included: a second
    instrument() (or uninstrument() then instrument()) for the same provider reported
    the new listener's totals, from zero: 5 hits, then 1 (-4 as a delta). An audit
    found it."""
    from opentelemetry.sdk.metrics import Counter, ObservableCounter
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    kinds = (Counter, ObservableCounter)
    chosen = getattr(AggregationTemporality, temporality.upper())
    reader = InMemoryMetricReader(preferred_temporality=dict.fromkeys(kinds, chosen))
    provider = MeterProvider(metric_readers=[reader])

    def hits() -> int:
        found = by_function(points(reader).get("perrequest.memo.hits", []))
        return found.get(NAME, 0)

    seen = []
    try:
        otel.instrument(provider)
        for _ in range(5):
            with request_scope():
                lookup(1), lookup(1)
        seen.append(hits())
        otel.instrument(provider)
        with request_scope():
            lookup(1), lookup(1)
        seen.append(hits())
        otel.uninstrument()
        otel.instrument(provider)
        with request_scope():
            lookup(1), lookup(1)
        seen.append(hits())
    finally:
        otel.uninstrument()
    assert seen == ([5, 6, 7] if temporality == "cumulative" else [5, 1, 1]), seen


_GLOBAL_SET_LATE = """
import json
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

from perrequest import otel, request_memo, request_scope


@request_memo
def lookup(x):
    return x


def hits(reader):
    data = reader.get_metrics_data()
    return [p.value for r in data.resource_metrics for s in r.scope_metrics
            for m in s.metrics if m.name == "perrequest.memo.hits" for p in m.data.data_points]


otel.instrument()  # at import, before the SDK is set up
cumulative = InMemoryMetricReader()
delta = InMemoryMetricReader(
    preferred_temporality={ObservableCounter: AggregationTemporality.DELTA}
)
provider = MeterProvider(metric_readers=[cumulative, delta])
metrics.set_meter_provider(provider)
seen = []
for again in (None, lambda: otel.instrument(), lambda: otel.instrument(provider)):
    if again:
        again()  # in the app factory, say; or naming the global provider itself
    with request_scope():
        lookup(1), lookup(1)
    seen.append((hits(cumulative), hits(delta)))
print(json.dumps(seen))
"""


def test_a_counter_never_goes_back_when_the_global_provider_is_set_after_instrument() -> None:
    """``instrument()`` before the app sets the global provider (documented), then again
    once it is set: the totals were kept under the proxy provider of the first call, and
    the second call's started from zero behind the counters the SDK handed back (hits
    1 after 1, a delta of 0; 5 then 1 and -4 with more requests). An audit found it. (A
    process of its own: the global provider can be set once.)"""
    done = run_python(_GLOBAL_SET_LATE)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[[1], [1]], [[2], [1]], [[3], [1]]]


def test_a_bad_meter_provider_is_refused() -> None:
    with pytest.raises(TypeError, match="MeterProvider"):
        otel.instrument("console")  # type: ignore[arg-type]
    # The class, its get_meter a function: it failed later, on "'str' object has no
    # attribute '_disabled'" (a probe).
    with pytest.raises(TypeError, match="a class: pass an instance of it"):
        otel.instrument(MeterProvider)  # type: ignore[arg-type]
    assert not otel.is_instrumented()


def test_a_misspelt_option_names_the_right_one() -> None:
    with pytest.raises(TypeError, match=r"meterprovider=\. Did you mean meter_provider="):
        otel.instrument(meterprovider=None)  # type: ignore[call-arg]
    assert not otel.is_instrumented()


def test_a_provider_that_cannot_be_kept_weakly_is_refused_saying_what_to_do() -> None:
    """A provider wrapper (a dataclass, a slotted class) passed the get_meter check, then
    failed with the WeakKeyDictionary's own words (a probe, 7 December 2026)."""

    class Slotted:
        __slots__ = ("inner",)

        def __init__(self, inner: MeterProvider) -> None:
            self.inner = inner

        def get_meter(self, *args: Any, **kwargs: Any) -> Any:
            return self.inner.get_meter(*args, **kwargs)

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    with pytest.raises(TypeError, match=r"Slotted cannot be hashed or weakly referenced.*wraps"):
        otel.instrument(Slotted(provider))  # type: ignore[arg-type]
    assert not otel.is_instrumented()
