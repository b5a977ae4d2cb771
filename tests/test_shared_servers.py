"""The shared tier for real: through uvicorn and gunicorn ``gthread``, and under a
million unique keys.

Under each server: the second request for a key is served by the shared cache (one
computation), concurrent misses on one key across requests compute once, an entry
that expires between requests is computed again, and every read is repeatable
within its request.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Iterator
from typing import Any

import cachetools
import httpx
import pytest
from servers import serve_gunicorn, serve_uvicorn
from shared_apps import TTL, Prices, build_asgi

from perrequest import request_memo, request_scope
from perrequest.testing import live_scopes

pytestmark = pytest.mark.timeout(120)

CONCURRENT = 24


class Uvicorn:
    """The ASGI app under uvicorn in this process: counters are read directly."""

    def __init__(self, base: str, prices: Prices) -> None:
        self.base, self.prices = base, prices

    def counts(self) -> dict[str, Any]:
        return self.prices.counts()

    def advance(self, seconds: float) -> None:
        self.prices.clock.advance(seconds)
        self.prices.version += 1


class Gunicorn:
    """The WSGI app under gunicorn gthread in a subprocess: counters come over HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base

    def counts(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base}/_counts", timeout=10).json())

    def advance(self, seconds: float) -> None:
        httpx.get(f"{self.base}/_advance?{seconds}", timeout=10).raise_for_status()


@pytest.fixture(params=["uvicorn", "gunicorn-gthread"])
def server(request: pytest.FixtureRequest) -> Iterator[Uvicorn | Gunicorn]:
    if request.param == "uvicorn":
        prices = Prices()
        with serve_uvicorn(build_asgi(prices)) as base:
            yield Uvicorn(base, prices)
        assert live_scopes() == 0
    else:
        with serve_gunicorn("shared_apps:wsgi_app", worker_class="gthread", threads=8) as base:
            yield Gunicorn(base)


def _get(base: str, sku: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/price/{sku}", timeout=30)
    response.raise_for_status()
    return dict(response.json())


def test_hits_across_requests_and_ttl_expiry_between_them(server: Uvicorn | Gunicorn) -> None:
    first = _get(server.base, "apple")
    second = _get(server.base, "apple")
    assert first["computation"] == second["computation"] == 1  # the second came from the cache
    assert second["shared_hits"] >= 1
    assert first["repeatable"] and second["repeatable"] and first["in_scope"]
    assert server.counts()["computed"] == {"apple": 1}
    server.advance(TTL + 1)  # the shared entry expires between requests
    third = _get(server.base, "apple")
    assert third["computation"] == 2 and third["version"] == 1 and third["repeatable"]
    assert server.counts()["computed"] == {"apple": 2}


def test_concurrent_misses_across_requests_compute_once(server: Uvicorn | Gunicorn) -> None:
    async def burst() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=CONCURRENT)
        async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.get("/price/pear") for _ in range(CONCURRENT))
            )
        return [r.raise_for_status().json() for r in responses]

    bodies = asyncio.run(burst())
    assert {b["computation"] for b in bodies} == {1}  # every request got the one computation
    assert all(b["repeatable"] for b in bodies)
    counts = server.counts()
    assert counts["computed"] == {"pear": 1}
    assert counts["live"] in (0, 1)  # gunicorn: the /_counts request's own scope


def test_a_404_raised_in_a_shared_computation_is_a_404_for_every_waiting_request() -> None:
    """FastAPI's ``raise HTTPException(status_code=404, detail=...)`` in a shared memo,
    under uvicorn, requests for the key at once: the requests that waited for the one that
    computed got a SharedComputationError (its keyword arguments could not rebuild it), a
    500. Each gets a copy of the 404 now."""
    from fastapi import FastAPI, HTTPException

    from perrequest.asgi import RequestScopeMiddleware

    waiting = 5
    computed: list[str] = []

    @request_memo(shared=cachetools.TTLCache(maxsize=100, ttl=60))
    async def product(sku: str) -> dict[str, str]:
        computed.append(sku)
        for _ in range(2000):  # until the other requests wait for this computation
            if product.shared_info().hits >= waiting:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.005)
        raise HTTPException(status_code=404, detail=f"no product {sku}")

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/product/{sku}")
    async def show(sku: str) -> dict[str, str]:
        return await product(sku)

    async def burst(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await asyncio.gather(*(client.get("/product/x1") for _ in range(waiting + 1)))

    with serve_uvicorn(app) as base:
        responses = asyncio.run(burst(base))
    assert [r.status_code for r in responses] == [404] * (waiting + 1)
    assert {r.json()["detail"] for r in responses} == {"no product x1"}
    assert computed == ["x1"]  # one computation; the others waited for it
    assert live_scopes() == 0


@pytest.mark.slow
def test_a_million_unique_keys_stay_within_the_shared_bound() -> None:
    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(maxsize=1000)

    @request_memo(shared=cache)
    def ident(x: int) -> int:
        return x

    def batch(start: int) -> None:
        with request_scope(max_entries=1000):
            for i in range(start, start + 10_000):
                ident(i)

    for start in range(0, 50_000, 10_000):  # warm up
        batch(start)
    gc.collect()
    # Live small-object blocks, not tracemalloc (which would make this minutes long):
    # anything a call left behind (a key, a tuple, an entry) is at least one block.
    before = sys.getallocatedblocks()
    peak_entries = 0
    for start in range(50_000, 1_000_000, 10_000):
        batch(start)
        peak_entries = max(peak_entries, len(cache))
    gc.collect()
    growth = sys.getallocatedblocks() - before
    assert peak_entries == 1000 and len(cache) == 1000
    assert growth < 1000, growth  # 950,000 computations, nothing left behind
    assert live_scopes() == 0
