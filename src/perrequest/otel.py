"""OpenTelemetry metrics and span attributes (``pip install 'perrequest[otel]'``).

On ``opentelemetry-api`` only: the SDK, exporters and views are the app's choice.
The counters are asynchronous, read from running totals when the SDK exports, so a
request pays for a few dict updates, not an SDK call per function and counter. What
is reported: docs/observability.md.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable

try:
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import CallbackOptions, Observation
except ImportError as exc:  # name the extra to install
    from ._extras import missing_extra

    missing_extra(exc, __name__, "otel", "opentelemetry")

from . import __version__
from ._checks import explains_options
from ._metrics import ENTRY_BUCKETS, SAVED_BUCKETS, Totals, scope_saved_s, used
from ._stats import ScopeStats
from .scope import add_scope_listener, remove_scope_listener

__all__ = ["instrument", "is_instrumented", "uninstrument"]

FUNCTION = "perrequest.function"
_COUNTERS = (  # in the order of Totals' columns
    ("perrequest.memo.hits", "{call}", "Memo calls served from the request store"),
    ("perrequest.memo.misses", "{call}", "Memo calls that computed their value"),
    ("perrequest.memo.evictions", "{entry}", "Entries evicted by a store's bound"),
)

_lock = threading.Lock()
_installed: _Listener | None = None
# The totals reported through each provider, kept across instrument() calls: the SDK
# gives a meter's counters back as first made, and a counter must never go back. The
# global provider's are one, whichever it is: before the app sets it, a proxy that hands
# the counters made through it to the provider set later.
_totals: weakref.WeakKeyDictionary[object, Totals] = weakref.WeakKeyDictionary()
_global_totals = Totals()


class _Listener:
    """The scope listener: running totals and the two histograms of one meter."""

    __slots__ = ("entries", "provider", "saved", "totals")

    def __init__(self, meter: metrics.Meter, provider: object, totals: Totals) -> None:
        self.provider = provider
        self.totals = totals
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

    def __call__(self, stats: ScopeStats) -> None:
        if not used(stats):
            return
        self.totals.add(stats)
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


def _observer(column: int, provider: object) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """The callback of one counter: the totals of the listener installed for ``provider``.

    A meter asked again for a counter gives back the first one, with its first
    callback, so the callback looks the current listener up rather than holding
    one. ``None`` is the global provider, whichever it is now: ``instrument()``
    and ``instrument(provider)`` of that very provider share one meter.
    """

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        listener = _installed
        if listener is None or _resolved(listener.provider) is not _resolved(provider):
            return []
        return [Observation(n, {FUNCTION: name}) for name, n in listener.totals.series(column)]

    return observe


def _resolved(provider: object) -> object:
    return metrics.get_meter_provider() if provider is None else provider


@explains_options("perrequest.otel.instrument()")
def instrument(meter_provider: metrics.MeterProvider | None = None) -> None:
    """Report every closing scope's stats to OpenTelemetry, through ``meter_provider``
    (default: the global one, which may be set later). Calling it again replaces the
    previous listener; the counters of a provider reported through before go on from
    their totals (they never go back). ``uninstrument()`` stops."""
    global _installed
    if isinstance(meter_provider, type) or (  # the class: an instance's method is wanted
        meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None))
    ):
        raise TypeError(
            "perrequest.otel.instrument(meter_provider=...) takes an OpenTelemetry "
            f"MeterProvider (opentelemetry.sdk.metrics.MeterProvider), not {meter_provider!r}"
            + " (a class: pass an instance of it)"
            * isinstance(meter_provider, type)
        )
    meter = metrics.get_meter("perrequest", __version__, meter_provider=meter_provider)
    is_global = meter_provider is None or meter_provider is metrics.get_meter_provider()
    if not is_global:  # its totals outlive this call: kept by a weak, hashed key
        try:
            hash(weakref.ref(meter_provider))
        except TypeError as exc:
            raise TypeError(
                f"perrequest.otel.instrument(meter_provider=...): {type(meter_provider).__name__}"
                f" cannot be hashed or weakly referenced ({exc}), which perrequest needs to "
                "carry its counters' totals to a later instrument(). Pass the MeterProvider "
                "it wraps, or make it hashable (a dataclass: eq=False) and weakly "
                "referenceable (__slots__: add '__weakref__')."
            ) from None
    with _lock:
        totals = _global_totals if is_global else _totals.setdefault(meter_provider, Totals())
    listener = _Listener(meter, meter_provider, totals)
    for column, (name, unit, description) in enumerate(_COUNTERS):
        meter.create_observable_counter(
            name, [_observer(column, meter_provider)], unit, description
        )
    with _lock:
        if _installed is not None:
            remove_scope_listener(_installed)
        _installed = listener
        add_scope_listener(listener)


def uninstrument() -> None:
    """Stop reporting; the counters report nothing more, the histograms stay in their
    meter."""
    global _installed
    with _lock:
        if _installed is not None:
            remove_scope_listener(_installed)
            _installed = None


def is_instrumented() -> bool:
    """Whether ``instrument()`` is in force."""
    return _installed is not None
