"""Metric attributes are function names: no argument, key or value reaches a metric or a log.

Every argument, key and value below carries ``MARK``; the test collects all that
OpenTelemetry (metrics and span attributes), Prometheus (the exposition text)
and the ``perrequest`` logger (at DEBUG, and the outside-scope warning) emit,
and checks that the function names are there and ``MARK`` is not.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import perrequest
from perrequest import _metrics, otel, prometheus, request_memo, request_scope
from perrequest._stats import function_name
from perrequest.asgi import RequestScopeMiddleware

MARK = "KEYTEXT-7f3a9c"


@request_memo
def profile(user: str) -> str:
    return f"{MARK}-value-of-{user}"


@request_memo(key=lambda query, page: (f"{MARK}-key", query, page))
def search(query: str, page: int) -> list[str]:
    return [query] * page


@request_memo(max_entries=1)
def recent(item: str) -> str:
    return item


@request_memo(outside_scope="warn")
def outside(token: str) -> str:
    return token


@dataclass(eq=False)
class Account:
    secret: str

    def __repr__(self) -> str:
        return f"Account({self.secret!r})"

    @request_memo
    def balance(self, currency: str) -> str:
        return f"{self.secret} {currency}"


@pytest.fixture
def sinks() -> Iterator[tuple[InMemoryMetricReader, CollectorRegistry]]:
    reader, registry = InMemoryMetricReader(), CollectorRegistry()
    otel.instrument(MeterProvider(metric_readers=[reader]))
    prometheus.instrument(registry)
    yield reader, registry
    otel.uninstrument()
    prometheus.uninstrument()


def exercise() -> None:
    """Every kind of call, each with MARK in its arguments, keys and values."""
    for _ in range(2):
        profile(f"{MARK}-user")
        search(f"{MARK}-query", 2)
        recent(f"{MARK}-a")
        recent(f"{MARK}-b")  # evicts the first
        Account(f"{MARK}-secret").balance(f"{MARK}-eur")
        perrequest.get_or_set(f"{MARK}-helper-key", lambda: f"{MARK}-helper-value")
        perrequest.set(f"{MARK}-plain-key", f"{MARK}-plain-value")


def test_no_key_text_in_metrics_spans_or_logs(
    sinks: tuple[InMemoryMetricReader, CollectorRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    reader, registry = sinks
    exporter, tracer = InMemorySpanExporter(), TracerProvider()
    tracer.add_span_processor(SimpleSpanProcessor(exporter))

    async def index(request: Request) -> PlainTextResponse:
        exercise()
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", index)])
    app.add_middleware(RequestScopeMiddleware)
    with caplog.at_level(logging.DEBUG, logger="perrequest"):
        with tracer.get_tracer(__name__).start_as_current_span("work"), request_scope():
            exercise()
        with TestClient(app) as client:
            assert client.get("/", params={"q": MARK}).text == "ok"
        outside(f"{MARK}-token")  # outside any scope: a warning naming the function

    metrics_text = reader.get_metrics_data().to_json()  # type: ignore[union-attr]
    exposition = generate_latest(registry).decode()
    spans = "".join(span.to_json() for span in exporter.get_finished_spans())
    logs = "\n".join(caplog.text.splitlines() + [r.getMessage() for r in caplog.records])
    for name in ("profile", "search", "recent", "Account.balance"):
        assert f"{__name__}.{name}" in metrics_text and f"{__name__}.{name}" in exposition
        assert f"{__name__}.{name}" in logs  # the DEBUG stats name the functions
    assert f"{__name__}.outside" in logs and "outside a request scope" in logs
    assert "perrequest.scope.hits" in spans
    for where, text in (
        ("OpenTelemetry", metrics_text),
        ("Prometheus", exposition),
        ("span", spans),
        ("logs", logs),
    ):
        assert MARK not in text, f"key text reached the {where} output"


def test_a_partial_is_named_after_its_function_and_an_object_after_its_class(
    sinks: tuple[InMemoryMetricReader, CollectorRegistry],
) -> None:
    """A ``functools.partial`` has no ``__qualname__``; its repr would show its bound
    arguments. It was named "functools.partial", so the partials of unrelated functions
    shared one set of counters (stats, ``cache_info``, metrics): it is now named after
    the function it wraps. Neither stats nor metrics carry the bound arguments."""
    reader, registry = sinks

    def fetch(token: str, x: int) -> int:
        return x

    def stock(warehouse: str, x: int) -> int:
        return x

    class Loader:
        def __call__(self, x: int) -> int:
            return x

    bound = request_memo(functools.partial(fetch, f"{MARK}-bound"))
    in_stock = request_memo(functools.partial(stock, "W1"))
    load = request_memo(Loader())
    prefix = f"{__name__}.{fetch.__qualname__.removesuffix('.fetch')}"
    with request_scope() as store:
        bound(1)
        bound(1)
        in_stock(1)
        load(1)
        assert in_stock.cache_info() == (0, 1, None, 1)  # before: bound's counters too
        assert list(store.stats.functions) == [
            f"{prefix}.fetch (partial)",
            f"{prefix}.stock (partial)",
            f"{prefix}.Loader",
        ]
    exposition = generate_latest(registry).decode()
    assert MARK not in exposition and MARK not in reader.get_metrics_data().to_json()  # type: ignore[union-attr]
    assert f'perrequest_memo_hits_total{{function="{prefix}.fetch (partial)"}} 1.0' in exposition
    assert f'perrequest_memo_misses_total{{function="{prefix}.Loader"}} 1.0' in exposition
    assert function_name(functools.partial(bound.__wrapped__, x=1)) == f"{prefix}.fetch (partial)"


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("app.views.lookup", "app.views.lookup"),
        ("app.views.make.<locals>.inner", "app.views.make.<locals>.inner"),
        ("app.<lambda>", "app.<lambda>"),
        ("app.représentation", "app.représentation"),
        ("(other functions)", "(other functions)"),
        ("app.views.fetch (partial)", "app.views.fetch (partial)"),
        ("app.views.fetch (partial) and more", "(unnamed callable)"),
        ("functools.partial(<function f at 0x7f>, 'secret')", "(unnamed callable)"),
        ("app.<app.Loader object at 0x7f00>", "(unnamed callable)"),
        (
            "app." + ".".join(["Outer"] * 60) + ".fetch",
            "app." + ".".join(["Outer"] * 60) + ".fetch",
        ),
        ("a" * 1001, "(unnamed callable)"),
        ("", "(unnamed callable)"),
    ],
)
def test_labels_are_qualified_names_or_one_fixed_label(name: str, label: str) -> None:
    assert _metrics.label(name) == label
