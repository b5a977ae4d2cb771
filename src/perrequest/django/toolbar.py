"""A Django Debug Toolbar panel: what the request's memo store did.

Add ``"perrequest.django.toolbar.PerRequestPanel"`` to ``DEBUG_TOOLBAR_PANELS``,
and list ``perrequest.django.RequestScopeMiddleware`` above
``DebugToolbarMiddleware``, so that the panel reads the store while it is open
(docs/observability.md). Calls outside a scope cost the memo nothing to show:
the panel reads the names ``outside_scope="warn"`` records once per process.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    from debug_toolbar.panels import Panel
    from django.template import Context, Engine
except ImportError as exc:  # name the extra to install
    from .._extras import missing_extra

    missing_extra(exc, __name__, "toolbar", "debug_toolbar", "django")

from .. import memo
from .._active import REQUEST_KEY, active_store
from .._metrics import saved_s
from ..scope import add_scope_listener, remove_scope_listener
from ..store import MemoKey, MemoStore

__all__ = ["PerRequestPanel"]

MIDDLEWARE = "perrequest.django.RequestScopeMiddleware"
NEAR_BOUND = 0.8  # a store whose peak reached 80% of its bound gets a warning row

_engine = Engine(dirs=[str(Path(__file__).resolve().parent / "templates")])


def _observe(stats: object) -> None:
    """A scope listener that does nothing: a listener's presence makes every store
    time its misses (``compute_s``), which "time saved" needs."""


def _request_store(request: Any) -> MemoStore | None:
    """The store perrequest opened for ``request``: on it (the Django middleware's), in
    ``request.META`` (the WSGI middleware's) or in the ASGI scope (the ASGI middleware's)."""
    store = getattr(request, "_perrequest_cell", None) or request.META.get(REQUEST_KEY)
    scope = getattr(request, "scope", None)
    if store is None and isinstance(scope, Mapping):
        store = scope.get(REQUEST_KEY)
    if type(store) is list:  # a middleware's cell: its store, once made
        store = store[1] if len(store) > 1 else None
    return store if isinstance(store, MemoStore) else active_store()


def _entries(store: MemoStore) -> Tally[str]:
    """Entries per function name in an open store; plain entries under ``""``."""
    tally: Tally[str] = Tally()
    for key in list(store):
        tally[getattr(key.owner, "name", "") if type(key) is MemoKey else ""] += 1
    return tally


def _collect(store: MemoStore | None, outside_before: frozenset[str]) -> dict[str, Any]:
    """The panel's data, JSON-serialisable (the toolbar may keep it in a database)."""
    outside_now = frozenset(memo.warned_outside)
    outside = [{"name": name, "now": name not in outside_before} for name in sorted(outside_now)]
    outside.sort(key=lambda row: not row["now"])
    if store is None:
        return {"scope": False, "outside": outside, "functions": [], "middleware": MIDDLEWARE}
    is_open = not store.closed
    stats = store.stats
    entries = _entries(store) if is_open else None
    functions: list[dict[str, Any]] = []
    for name, fn in stats.functions.items():
        calls = fn.hits + fn.misses
        functions.append(
            {
                "name": name,
                "hits": fn.hits,
                "misses": fn.misses,
                "hit_rate": round(100 * fn.hits / calls) if calls else 0,
                "entries": None if entries is None else entries.get(name, 0),
                "evictions": fn.evictions,
                "compute_ms": 1000 * fn.compute_s,
                "saved_ms": 1000 * saved_s(fn),
            }
        )
    functions.sort(key=lambda row: (-row["saved_ms"], -row["hits"], row["name"]))
    bound = store.max_entries
    peak = stats.peak_entries
    return {
        "scope": True,
        "open": is_open,
        "middleware": MIDDLEWARE,
        "functions": functions,
        "outside": outside,
        "hits": stats.hits,
        "misses": stats.misses,
        "entries": stats.entries,
        "peak_entries": peak,
        "max_entries": bound,
        "fill_pct": round(100 * peak / bound) if bound else None,
        "near_bound": bool(bound and (peak >= NEAR_BOUND * bound or stats.evictions)),
        "evictions": stats.evictions,
        "plain_entries": None if entries is None else entries.get("", 0),
        "saved_ms": sum(row["saved_ms"] for row in functions),
        "timed": any(fn.compute_s for fn in stats.functions.values()) or not stats.misses,
    }


class PerRequestPanel(Panel):
    """The request's memo store: per function hits, misses, entries and time saved."""

    title = "perrequest"
    is_async = True  # reads the store only: safe under ASGI

    @property
    def nav_subtitle(self) -> str:
        stats: dict[str, Any] = self.get_stats()
        if not stats:
            return ""
        if not stats.get("scope"):
            return "no request scope"
        text = f"{stats['hits']} hits, {stats['misses']} misses"
        saved = stats["saved_ms"]  # as the panel shows it; none where that would read 0.00
        return text + (f", {saved:.2f} ms saved" if saved >= 0.005 else "")

    @property
    def content(self) -> str:
        html: str = _engine.get_template("perrequest/panel.html").render(Context(self.get_stats()))
        return html

    def enable_instrumentation(self) -> None:
        add_scope_listener(_observe)  # idempotent; stays: a development process

    def process_request(self, request: Any) -> Any:
        self._outside_before = frozenset(memo.warned_outside)
        return super().process_request(request)

    def generate_stats(self, request: Any, response: Any) -> None:
        before: frozenset[str] = getattr(self, "_outside_before", frozenset())
        self.record_stats(_collect(_request_store(request), before))


def remove_listener() -> None:
    """Stop timing misses for the panel (the panel adds its listener again when shown)."""
    remove_scope_listener(_observe)
