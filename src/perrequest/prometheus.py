"""Prometheus metrics (``pip install 'perrequest[prometheus]'``), on ``prometheus-client``.

``instrument()`` registers, in the default registry or the one given:

- ``perrequest_memo_hits_total``, ``perrequest_memo_misses_total`` and
  ``perrequest_memo_evictions_total``, counters with the label ``function``
  (a memoized function's qualified name, never an argument, key or value);
- ``perrequest_scope_entries``, a histogram of the most entries each request
  store held at once, and ``perrequest_scope_saved_seconds``, of the seconds
  the memo saved per scope (hits x mean miss time, per function);

and adds the scope listener that feeds them. Serve them as usual, e.g.
``app.mount("/metrics", prometheus_client.make_asgi_app())``.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from ._metrics import ENTRY_BUCKETS, SAVED_BUCKETS, per_function, scope_saved_s
from ._stats import ScopeStats
from .scope import add_scope_listener, remove_scope_listener

__all__ = ["instrument", "is_instrumented", "uninstrument"]

_MAX_NAMES = 4096  # label children kept per function name; beyond, looked up again

_lock = threading.Lock()
_installed: _Listener | None = None


class _Listener:
    """The scope listener: the five metrics, registered in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        label = ("function",)
        self.hits = Counter(
            "perrequest_memo_hits",
            "Memo calls served from the request store",
            label,
            registry=registry,
        )
        self.misses = Counter(
            "perrequest_memo_misses",
            "Memo calls that computed their value",
            label,
            registry=registry,
        )
        self.evictions = Counter(
            "perrequest_memo_evictions",
            "Entries evicted by a store's bound",
            label,
            registry=registry,
        )
        self.entries = Histogram(
            "perrequest_scope_entries",
            "Most entries a request store held at once",
            registry=registry,
            buckets=ENTRY_BUCKETS,
        )
        self.saved = Histogram(
            "perrequest_scope_saved_seconds",
            "Seconds the memo saved in a scope: hits x mean miss time, per function",
            registry=registry,
            buckets=SAVED_BUCKETS,
        )
        self._children: dict[str, tuple[Counter, Counter, Counter]] = {}

    def _labelled(self, name: str) -> tuple[Counter, Counter, Counter]:
        children = self._children.get(name)
        if children is None:
            if len(self._children) >= _MAX_NAMES:
                self._children.clear()
            children = self._children[name] = (
                self.hits.labels(name),
                self.misses.labels(name),
                self.evictions.labels(name),
            )
        return children

    def __call__(self, stats: ScopeStats) -> None:
        for name, hits, misses, evictions in per_function(stats):
            hits_c, misses_c, evictions_c = self._labelled(name)
            if hits:
                hits_c.inc(hits)
            if misses:
                misses_c.inc(misses)
            if evictions:
                evictions_c.inc(evictions)
        self.entries.observe(stats.peak_entries)
        self.saved.observe(scope_saved_s(stats))

    def unregister(self) -> None:
        for metric in (self.hits, self.misses, self.evictions, self.entries, self.saved):
            self.registry.unregister(metric)


def instrument(registry: CollectorRegistry | None = None) -> None:
    """Register perrequest's metrics in ``registry`` (default: prometheus-client's
    global ``REGISTRY``) and feed them from every scope that closes. Idempotent for
    the same registry; another registry replaces the first."""
    global _installed
    if registry is None:
        registry = REGISTRY
    elif not isinstance(registry, CollectorRegistry):
        raise TypeError(
            "perrequest.prometheus.instrument(registry=...) takes a "
            f"prometheus_client.CollectorRegistry, not {registry!r}"
        )
    with _lock:
        if _installed is not None:
            if _installed.registry is registry:
                return
            remove_scope_listener(_installed)
            _installed.unregister()
            _installed = None
        listener = _Listener(registry)
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
