"""OpenTelemetry metrics and span attributes (``pip install 'perrequest[otel]'``).

Built on ``opentelemetry-api`` only: the SDK, exporters and views are the
app's choice. ``instrument()`` adds a scope listener that, for every scope
that closes in the process, adds each memoized function's hits, misses and
evictions to three counters (attribute ``perrequest.function``: the function's
qualified name, never an argument, key or value) and records the scope's
entries and the seconds the memo saved in two histograms. When a span is
recording as the scope closes (the server span of OpenTelemetry's ASGI,
WSGI or Django instrumentation, which wraps perrequest's middleware), the
scope's totals are set on it as attributes.
"""

from __future__ import annotations

import threading

from opentelemetry import metrics, trace

from . import __version__
from ._metrics import ENTRY_BUCKETS, SAVED_BUCKETS, per_function, scope_saved_s
from ._stats import ScopeStats
from .scope import add_scope_listener, remove_scope_listener

__all__ = ["instrument", "is_instrumented", "uninstrument"]

FUNCTION = "perrequest.function"
_MAX_NAMES = 4096  # attribute dicts kept per function name; beyond, made anew

_lock = threading.Lock()
_installed: _Listener | None = None


class _Listener:
    """The scope listener: one set of instruments from one meter."""

    __slots__ = ("_attributes", "entries", "evictions", "hits", "misses", "saved")

    def __init__(self, meter: metrics.Meter) -> None:
        self.hits = meter.create_counter(
            "perrequest.memo.hits", "{call}", "Memo calls served from the request store"
        )
        self.misses = meter.create_counter(
            "perrequest.memo.misses", "{call}", "Memo calls that computed their value"
        )
        self.evictions = meter.create_counter(
            "perrequest.memo.evictions", "{entry}", "Entries evicted by a store's bound"
        )
        self.entries = meter.create_histogram(
            "perrequest.scope.entries",
            "{entry}",
            "Most entries a request store held at once",
            explicit_bucket_boundaries_advisory=ENTRY_BUCKETS,
        )
        self.saved = meter.create_histogram(
            "perrequest.scope.saved",
            "s",
            "Seconds the memo saved in a scope: hits x mean miss time, per function",
            explicit_bucket_boundaries_advisory=SAVED_BUCKETS,
        )
        self._attributes: dict[str, dict[str, str]] = {}

    def __call__(self, stats: ScopeStats) -> None:
        known = self._attributes
        for name, hits, misses, evictions in per_function(stats):
            attributes = known.get(name)
            if attributes is None:
                if len(known) >= _MAX_NAMES:
                    known.clear()
                attributes = known[name] = {FUNCTION: name}
            if hits:
                self.hits.add(hits, attributes)
            if misses:
                self.misses.add(misses, attributes)
            if evictions:
                self.evictions.add(evictions, attributes)
        saved = scope_saved_s(stats)
        self.entries.record(stats.peak_entries)
        self.saved.record(saved)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {
                    "perrequest.scope.hits": stats.hits,
                    "perrequest.scope.misses": stats.misses,
                    "perrequest.scope.entries": stats.entries,
                    "perrequest.scope.peak_entries": stats.peak_entries,
                    "perrequest.scope.evictions": stats.evictions,
                    "perrequest.scope.saved": saved,
                }
            )


def instrument(meter_provider: metrics.MeterProvider | None = None) -> None:
    """Report every closing scope's stats to OpenTelemetry, through ``meter_provider``
    (default: the global one, which may be set later). Calling it again replaces the
    previous instruments; ``uninstrument()`` stops."""
    global _installed
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise TypeError(
            "perrequest.otel.instrument(meter_provider=...) takes an OpenTelemetry "
            f"MeterProvider (opentelemetry.sdk.metrics.MeterProvider), not {meter_provider!r}"
        )
    meter = metrics.get_meter("perrequest", __version__, meter_provider=meter_provider)
    listener = _Listener(meter)
    with _lock:
        if _installed is not None:
            remove_scope_listener(_installed)
        _installed = listener
        add_scope_listener(listener)


def uninstrument() -> None:
    """Stop reporting; the instruments already made stay in their meter."""
    global _installed
    with _lock:
        if _installed is not None:
            remove_scope_listener(_installed)
            _installed = None


def is_instrumented() -> bool:
    """Whether ``instrument()`` is in force."""
    return _installed is not None
