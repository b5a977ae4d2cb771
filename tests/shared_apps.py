"""Apps for the shared-tier tests under real servers: a price lookup behind a TTL cache.

``build_asgi()`` is served by uvicorn in the test process; ``wsgi_app`` by gunicorn
``gthread`` in a subprocess, reporting its own counters at ``/_counts``. Both count how
often the expensive function really ran, per key, and let the test move a fake clock
so that TTL expiry is seen between requests without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import cachetools

import perrequest
from perrequest import request_memo
from perrequest.testing import live_scopes

TTL = 60.0
SLOW = 0.05  # seconds one computation takes: long enough for misses to pile up


class Clock:
    """A TTL timer the test can move forward."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


class Prices:
    """One shared cache, one memoized lookup, and what was computed."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(
            maxsize=1000, ttl=TTL, timer=self.clock
        )
        self.computed: Counter[str] = Counter()
        self.version = 0
        self._lock = threading.Lock()
        self.price = request_memo(shared=self.cache)(self._price)

    def _price(self, sku: str) -> dict[str, Any]:
        time.sleep(SLOW)
        with self._lock:
            self.computed[sku] += 1
            return {"sku": sku, "version": self.version, "computation": self.computed[sku]}

    def request(self, sku: str) -> dict[str, Any]:
        """What one request does: reads the price twice (the second read is the
        request's own copy) and reports the shared tier's counters."""
        first = self.price(sku)
        again = self.price(sku)
        return {
            **first,
            "repeatable": again == first,
            "request_hits": self.price.cache_info().hits,  # type: ignore[attr-defined]
            "shared_hits": self.price.shared_info().hits,  # type: ignore[attr-defined]
            "in_scope": perrequest.in_request_scope(),
        }

    def counts(self) -> dict[str, Any]:
        return {
            "computed": dict(self.computed),
            "cache_size": len(self.cache),
            "live": live_scopes(),
        }


def build_asgi(prices: Prices) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from perrequest.asgi import RequestScopeMiddleware

    def price(request: Request) -> JSONResponse:  # sync: runs in the thread pool
        return JSONResponse(prices.request(request.path_params["sku"]))

    app = Starlette(routes=[Route("/price/{sku}", price)])
    app.add_middleware(RequestScopeMiddleware)
    return app


# -- the WSGI app for gunicorn ---------------------------------------------------------

_prices = Prices()


def _json(start_response: Callable[..., Any], body: dict[str, Any]) -> Iterable[bytes]:
    import json

    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/_counts":
        return _json(start_response, _prices.counts())
    if path == "/_advance":
        _prices.clock.advance(float(environ["QUERY_STRING"]))
        _prices.version += 1
        return _json(start_response, {"now": _prices.clock.now})
    return _json(start_response, _prices.request(path.rsplit("/", 1)[-1]))


def _make_wsgi() -> Any:
    from perrequest.wsgi import RequestScopeMiddleware

    return RequestScopeMiddleware(_app)


wsgi_app = _make_wsgi()
