"""Prometheus metrics (``pip install 'perrequest[prometheus]'``), on ``prometheus-client``.

``instrument()`` registers three counters labelled by function (never an argument,
key or value) and two histograms, and adds the scope listener that feeds them; what
each means: docs/observability.md.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ._checks import explains_options
from ._metrics import ENTRY_BUCKETS, SAVED_BUCKETS, Totals, scope_saved_s, used
from ._stats import ScopeStats
from .scope import add_scope_listener, remove_scope_listener

__all__ = ["instrument", "is_instrumented", "uninstrument"]

_COUNTERS = (
    ("perrequest_memo_hits", "Memo calls served from the request store"),
    ("perrequest_memo_misses", "Memo calls that computed their value"),
    ("perrequest_memo_evictions", "Entries evicted by a store's bound"),
)

_lock = threading.Lock()
_installed: _Listener | None = None


class _Counters(Collector):
    """The three counters, read from the running totals at each scrape: a request pays
    for a few dict updates, not for a labelled counter call per function."""

    def __init__(self, totals: Totals) -> None:
        self.totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        for column, (name, documentation) in enumerate(_COUNTERS):
            family = CounterMetricFamily(name, documentation, labels=("function",))
            for function, total in self.totals.series(column):
                family.add_metric((function,), total)
            yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        for name, documentation in _COUNTERS:
            yield CounterMetricFamily(name, documentation, labels=("function",))


class _Listener:
    """The scope listener: the totals behind the counters, and the two histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Made unregistered: ``register`` puts them in ``registry``, all or none."""
        self.registry = registry
        self.totals = Totals()
        self.counters = _Counters(self.totals)
        self.entries = Histogram(
            "perrequest_scope_entries",
            "Most entries a request store held at once",
            registry=None,
            buckets=ENTRY_BUCKETS,
        )
        self.saved = Histogram(
            "perrequest_scope_saved_seconds",
            "Seconds the memo saved in a scope: hits x mean miss time, per function",
            registry=None,
            buckets=SAVED_BUCKETS,
        )

    def register(self) -> None:
        """Register the three collectors, or none: a name already taken in the registry
        (by another library, or by hand) unregisters those done and raises ValueError."""
        done: list[Collector] = []
        for collector in (self.counters, self.entries, self.saved):
            try:
                self.registry.register(collector)
            except ValueError as exc:
                for registered in done:
                    self.registry.unregister(registered)
                names = ", ".join(sorted({family.name for family in collector.describe()}))
                raise ValueError(
                    "perrequest.prometheus.instrument(): a metric in the registry clashes "
                    f"with perrequest's {names} ({exc}). Nothing was registered, and the "
                    "instrumentation in force (if any) is unchanged. Unregister that "
                    "collector, or instrument another registry."
                ) from exc
            done.append(collector)

    def __call__(self, stats: ScopeStats) -> None:
        if not used(stats):
            return
        self.totals.add(stats)
        self.entries.observe(stats.peak_entries)
        self.saved.observe(scope_saved_s(stats))

    def unregister(self) -> None:
        for collector in (self.counters, self.entries, self.saved):
            self.registry.unregister(collector)


@explains_options("perrequest.prometheus.instrument()")
def instrument(registry: CollectorRegistry | None = None) -> None:
    """Register perrequest's metrics in ``registry`` (default: prometheus-client's
    global ``REGISTRY``) and feed them from every scope that closes. Idempotent for
    the same registry; another registry replaces the first. A metric name already
    taken in ``registry`` raises ``ValueError`` and changes nothing."""
    global _installed
    if registry is None:
        registry = REGISTRY
    elif not isinstance(registry, CollectorRegistry):
        raise TypeError(
            "perrequest.prometheus.instrument(registry=...) takes a "
            f"prometheus_client.CollectorRegistry, not {registry!r}"
        )
    with _lock:
        if _installed is not None and _installed.registry is registry:
            return
        listener = _Listener(registry)
        listener.register()  # first: a failure leaves the instrumentation in force alone
        if _installed is not None:
            remove_scope_listener(_installed)
            _installed.unregister()
        add_scope_listener(listener)
        _installed = listener


def uninstrument() -> None:
    """Stop feeding the metrics and unregister them from their registry."""
    global _installed
    with _lock:
        if _installed is not None:
            remove_scope_listener(_installed)
            _installed.unregister()
            _installed = None


def is_instrumented() -> bool:
    """Whether ``instrument()`` is in force."""
    return _installed is not None
