"""@request_batch under a real uvicorn: concurrent requests never share a batch or a value.

Every key carries the number of the request that asked for it, and the batch
functions record any call whose keys came from more than one request. The async
endpoint loads from several tasks of its request; the sync endpoint runs in
Starlette's thread pool, several threads per request sharing its scope.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from servers import serve_uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import perrequest
from perrequest import bind_scope, request_batch
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

pytestmark = pytest.mark.timeout(120)

mixed: list[list[tuple[int, int]]] = []
_lock = threading.Lock()


def _record(keys: list[tuple[int, int]]) -> None:
    """Count this request's batch calls in its store; note any call that mixed requests."""
    if len({request for request, _ in keys}) != 1:
        with _lock:
            mixed.append(keys)
    perrequest.set("calls", perrequest.get("calls", 0) + 1)
    perrequest.set("fetched", perrequest.get("fetched", 0) + len(keys))


@request_batch
async def load_async(keys: list[tuple[int, int]]) -> list[str]:
    _record(keys)
    await asyncio.sleep(0.01)  # other requests run meanwhile
    return [f"{request}:{n}" for request, n in keys]


@request_batch
def load_sync(keys: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    _record(keys)
    return {key: f"{key[0]}:{key[1]}" for key in keys}


async def async_items(request: Request) -> JSONResponse:
    number = int(request.query_params["request"])

    async def part(start: int) -> list[str]:
        await asyncio.sleep(0)
        return await load_async.load_many([(number, n) for n in range(start, start + 5)])

    parts = await asyncio.gather(*(asyncio.create_task(part(s)) for s in (0, 5, 10, 15)))
    again = await asyncio.gather(*(load_async.load((number, n)) for n in range(20)))
    values = [v for p in parts for v in p]
    return JSONResponse({"values": values, "again": again, **_counts()})


def sync_items(request: Request) -> JSONResponse:
    number = int(request.query_params["request"])
    keys = [(number, n) for n in range(20)]
    with ThreadPoolExecutor(4) as pool:  # threads of this request share its scope
        parts = list(pool.map(bind_scope(load_sync.load_many), [keys[:12], keys[8:]]))
    values = parts[0] + parts[1][4:]
    return JSONResponse({"values": values, "again": load_sync(keys), **_counts()})


def _counts() -> dict[str, int]:
    return {"calls": perrequest.get("calls"), "fetched": perrequest.get("fetched")}


first_calls: list[list[str]] = []


@request_batch(key=lambda key: key.lower(), max_entries=50)
async def load_first(keys: list[str]) -> list[str]:
    first_calls.append(keys)
    return [key.upper() for key in keys]


async def first_use(request: Request) -> JSONResponse:
    """A keyed, bounded loader is the first thing to use the request's store, which the
    middleware makes only then."""
    number = request.query_params["request"]
    keys = [f"r{number}-{n}" for n in range(3)]
    values = await asyncio.gather(*(load_first.load(key) for key in keys))
    again = await asyncio.gather(*(load_first.load(key.upper()) for key in keys))
    return JSONResponse({"values": values, "again": again, "info": load_first.cache_info()})


app = RequestScopeMiddleware(
    Starlette(
        routes=[
            Route("/async", async_items),
            Route("/sync", sync_items),
            Route("/first", first_use),
        ]
    )
)


@pytest.mark.parametrize("path", ["/async", "/sync"])
def test_fifty_concurrent_requests_never_share_a_batch(path: str) -> None:
    mixed.clear()

    async def client(i: int, http: httpx.AsyncClient) -> dict[str, Any]:
        response = await http.get(f"{url}{path}", params={"request": i})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50), timeout=60) as http:
            return await asyncio.gather(*(client(i, http) for i in range(50)))

    with serve_uvicorn(app) as url:
        bodies = asyncio.run(run())
    for i, body in enumerate(bodies):
        wanted = [f"{i}:{n}" for n in range(20)]
        assert body["values"] == wanted and body["again"] == wanted
        # async: the four tasks' loads in one call; sync: one call per thread, and the keys
        # both threads wanted were fetched by one of them only
        assert body["calls"] == (1 if path == "/async" else 2)
        assert body["fetched"] == 20
    assert mixed == []
    assert live_scopes() == 0


def test_a_keyed_loader_first_to_use_a_middlewares_store_batches_and_caches() -> None:
    """_batch_async.miss: the first load of a request whose store the middleware has not
    made yet (a keyed, bounded loader looks for it first) makes it, batches the request's
    loads in one call and caches them under their cache keys."""
    first_calls.clear()
    with serve_uvicorn(app) as url, httpx.Client(timeout=30) as http:
        bodies = [http.get(f"{url}/first", params={"request": i}).json() for i in range(3)]
    for i, body in enumerate(bodies):
        wanted = [f"R{i}-{n}" for n in range(3)]
        assert body["values"] == wanted and body["again"] == wanted
        assert body["info"] == [3, 3, 50, 3]  # hits, misses, maxsize, currsize
    assert first_calls == [[f"r{i}-{n}" for n in range(3)] for i in range(3)]
    assert live_scopes() == 0
