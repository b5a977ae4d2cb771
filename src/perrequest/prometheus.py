"""Prometheus metrics (``pip install 'perrequest[prometheus]'``), on ``prometheus-client``.

``instrument()`` registers three counters labelled by function (never an argument,
key or value) and two histograms, and adds the scope listener that feeds them; what
each means: docs/observability.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # name the extra to install
    from ._extras import missing_extra

    missing_extra(exc, __name__, "prometheus", "prometheus_client")

from ._checks import explains_options
from ._metrics import (
    ENTRY_BUCKETS,
    MAX_NAMES,
    OTHER,
    SAVED_BUCKETS,
    Totals,
    label,
    per_function,
    scope_saved_s,
    used,
)
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


class _FileCounters:
    """The three counters as prometheus-client ``Counter`` objects, for multiprocess mode:
    each closing scope increments them, per function (bounded as ``Totals`` is)."""

    def __init__(self) -> None:
        self.counters = [
            Counter(name, documentation, labelnames=("function",), registry=None)
            for name, documentation in _COUNTERS
        ]
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def add(self, stats: ScopeStats) -> None:
        for name, *counts in per_function(stats):
            if name not in self._names:
                with self._lock:
                    if len(self._names) >= MAX_NAMES:
                        name = OTHER
                    self._names.add(name)
            for counter, count in zip(self.counters, counts, strict=True):
                counter.labels(label(name)).inc(count)  # 0 too: the three series start together


class _Listener:
    """The scope listener: the totals behind the counters, and the two histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Made unregistered: ``register`` puts them in ``registry``, all or none."""
        self.registry = registry
        self.totals = Totals()
        # prometheus-client's multiprocess mode (gunicorn workers), detected as it does:
        # there only its own metrics, kept in files, are scraped, so Counter objects.
        multiprocess = {"PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"} & set(os.environ)
        self.files = _FileCounters() if multiprocess else None
        counters = [_Counters(self.totals)] if self.files is None else self.files.counters
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
        self.collectors: list[_Counters | Counter | Histogram] = [
            *counters,
            self.entries,
            self.saved,
        ]

    def register(self, again: bool = False) -> None:
        """Register the three collectors, or none: a name already taken in the registry
        (by another library, or by hand) unregisters those done and raises ValueError.
        ``again``: those still registered stay; those removed behind our back (a test
        fixture clearing the registry) come back."""
        done: list[Collector] = []
        try:
            for collector in self.collectors:
                try:
                    self.registry.register(collector)
                except ValueError as exc:
                    if again:
                        continue
                    names = ", ".join(sorted({family.name for family in collector.describe()}))
                    raise ValueError(
                        "perrequest.prometheus.instrument(): a metric in the registry clashes "
                        f"with perrequest's {names} ({exc}). Nothing was registered, and the "
                        "instrumentation in force (if any) is unchanged. Unregister that "
                        "collector, or instrument another registry."
                    ) from exc
                done.append(collector)
        except BaseException:  # a clash, or a registry of its own failing: none registered
            for registered in done:
                self.registry.unregister(registered)
            raise

    def __call__(self, stats: ScopeStats) -> None:
        if not used(stats):
            return
        if self.files is None:
            self.totals.add(stats)
        else:
            self.files.add(stats)
        self.entries.observe(stats.peak_entries)
        self.saved.observe(scope_saved_s(stats))

    def unregister(self) -> None:
        for collector in self.collectors:
            with contextlib.suppress(KeyError):  # removed behind our back already
                self.registry.unregister(collector)


@explains_options("perrequest.prometheus.instrument()")
def instrument(registry: CollectorRegistry | None = None) -> None:
    """Register perrequest's metrics in ``registry`` (default: prometheus-client's
    global ``REGISTRY``) and feed them from every scope that closes. Idempotent for
    the same registry (metrics unregistered from it since are registered again); another
    registry replaces the first. A metric name already taken in ``registry`` raises
    ``ValueError`` and changes nothing."""
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
            _installed.register(again=True)
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
