"""What observing the memo adds to a request: scope listeners, OpenTelemetry, Prometheus.

One Starlette app with ``perrequest.asgi.RequestScopeMiddleware``, whose only route
calls three memoized functions seven times (3 misses, 4 hits: a request that uses
the memo), served in-process by ``middleware_overhead``'s driver (no network).
Variants, each set up before its batch and torn down after (listeners are
process-wide):

- no listener: what every request costs when nobody observes (the baseline);
- a listener that does nothing: the cost of being observed at all (the misses are
  timed, the stats snapshotted at close, the listener called);
- ``perrequest.otel.instrument()`` with the OpenTelemetry SDK's ``MeterProvider``
  and an in-memory reader (the SDK aggregates on every add; the reader is never
  read while timing, as an exporter reads every minute or so);
- a recording span around each request (what OpenTelemetry's ASGI instrumentation
  opens), without and with ``perrequest.otel``: the totals set on the span;
- ``perrequest.prometheus.instrument()`` in a fresh registry.

Reported: median microseconds per request, and the median over rounds of (variant -
its baseline) measured in the same round: no listener for the first variants, the
span alone for span + OpenTelemetry.

Usage: ``.venv/bin/python benchmarks/observability_cost.py [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
from collections.abc import Callable
from typing import Any

import _common as common
from middleware_overhead import ASGIApp, check_asgi, serve_asgi
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import perrequest
import perrequest.otel
import perrequest.prometheus
from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware


@request_memo
def user(uid: int) -> dict[str, int]:
    return {"id": uid}


@request_memo
def permissions(uid: int) -> frozenset[str]:
    return frozenset({"read"})


@request_memo
def flag(name: str) -> bool:
    return True


async def page(request: Request) -> PlainTextResponse:
    user(1)
    for _ in range(3):
        permissions(1)
    flag("beta")
    flag("beta")
    user(1)
    return PlainTextResponse("Hello, world!")


class SpanMiddleware:
    """A recording server span around each request, as OpenTelemetry's ASGI middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        provider = TracerProvider()
        self.exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = provider.get_tracer("bench")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        with self.tracer.start_as_current_span("GET /"):
            await self.app(scope, receive, send)
        self.exporter.clear()  # keep memory flat


def app() -> ASGIApp:
    return Starlette(routes=[Route("/", page)], middleware=[Middleware(RequestScopeMiddleware)])


def _noop(stats: object) -> None:
    pass


def _nothing() -> None:
    pass


_otel_reader = InMemoryMetricReader()
_otel_provider = MeterProvider(metric_readers=[_otel_reader])
_registry = CollectorRegistry()

Setup = Callable[[], None]
NO_LISTENER = "no listener"
SPAN = "recording span, no listener"
# name -> (app, set up, tear down, the variant it is compared with)
VARIANTS: dict[str, tuple[ASGIApp, Setup, Setup, str]] = {
    NO_LISTENER: (app(), _nothing, _nothing, NO_LISTENER),
    "a listener that does nothing": (
        app(),
        lambda: perrequest.add_scope_listener(_noop),
        lambda: perrequest.remove_scope_listener(_noop),
        NO_LISTENER,
    ),
    "perrequest.otel (SDK meter provider)": (
        app(),
        lambda: perrequest.otel.instrument(_otel_provider),
        perrequest.otel.uninstrument,
        NO_LISTENER,
    ),
    "perrequest.prometheus": (
        app(),
        lambda: perrequest.prometheus.instrument(_registry),
        perrequest.prometheus.uninstrument,
        NO_LISTENER,
    ),
    SPAN: (SpanMiddleware(app()), _nothing, _nothing, SPAN),
    "recording span + perrequest.otel": (
        SpanMiddleware(app()),
        lambda: perrequest.otel.instrument(_otel_provider),
        perrequest.otel.uninstrument,
        SPAN,
    ),
    "no listener, a second copy (noise)": (app(), _nothing, _nothing, NO_LISTENER),
}


def measure(rounds: int, requests: int) -> dict[str, list[float]]:
    loop = asyncio.new_event_loop()
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for asgi, setup, teardown, _ in VARIANTS.values():
            setup()
            try:
                loop.run_until_complete(check_asgi(asgi))
                loop.run_until_complete(serve_asgi(asgi, requests))  # warm up
            finally:
                teardown()
        for r in range(rounds):
            names = list(VARIANTS)
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                asgi, setup, teardown, _ = VARIANTS[name]
                setup()
                gc.collect()
                try:
                    samples[name].append(loop.run_until_complete(serve_asgi(asgi, requests)))
                finally:
                    teardown()
    finally:
        loop.close()
    return samples


def report(samples: dict[str, list[float]], rounds: int, requests: int) -> dict[str, Any]:
    meta = common.meta(rounds=rounds, requests_per_round=requests)
    print(
        f"perrequest observability_cost: {meta['python']}, {meta['platform']}, "
        f"{meta['cpus']} CPUs, {rounds} interleaved rounds of {requests} requests, in-process"
    )
    print(f"\n| {'variant':<38} | {'us/request':>10} | {'added us':>8} | {'x base':>6} |")
    print(f"| {'-' * 38} | {'-' * 10}:| {'-' * 8}:| {'-' * 6}:|")
    rows: dict[str, Any] = {}
    for name, values in samples.items():
        base = samples[VARIANTS[name][3]]
        added = statistics.median(v - b for v, b in zip(values, base, strict=True))
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        median_us = statistics.median(values)
        print(f"| {name:<38} | {median_us:10.1f} | {added:8.2f} | {ratio:6.3f} |")
        rows[name] = {
            "median_us": median_us,
            "added_us": added,
            "ratio": ratio,
            "baseline": VARIANTS[name][3],
        }
    print("\nadded us: median over rounds of (variant - its baseline), measured in the same round.")
    return {"meta": meta, "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = common.arguments(__doc__)
    args = parser.parse_args(argv)
    rounds, requests = (3, 20) if args.quick else (41, 300)
    rounds = args.rounds or rounds
    results = report(measure(rounds, requests), rounds, requests)
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
