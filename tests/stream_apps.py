"""A Starlette app whose streaming bodies report, in their cleanup, whose store they see.

Run by tests/test_stream_cleanup.py under uvicorn, hypercorn and granian. Every
request puts its id in its store. A client reads part of a stream and resets
the connection; the abandoned body's ``finally`` runs later, often inside a
garbage collection that another request (``/collect``) triggers. It must see
its own store or none, never another request's.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

import perrequest
from perrequest.asgi import RequestScopeMiddleware

CHUNK = b"x" * 16384
counts = {"cleanups": 0, "own": 0, "none": 0, "other": 0}


def _cleanup(rid: str) -> None:
    seen = perrequest.get("rid")
    counts["cleanups"] += 1
    counts["own" if seen == rid else "none" if seen is None else "other"] += 1


def _rid(request: Request) -> str:
    rid = request.query_params["rid"]
    perrequest.set("rid", rid)
    return rid


async def stream_sync(request: Request) -> StreamingResponse:
    rid = _rid(request)

    def body() -> Iterator[bytes]:  # Starlette runs it in a thread, a chunk at a time
        try:
            for _ in range(2000):
                yield CHUNK
        finally:
            _cleanup(rid)

    return StreamingResponse(body())


async def stream_async(request: Request) -> StreamingResponse:
    rid = _rid(request)

    async def body() -> AsyncIterator[bytes]:
        try:
            for _ in range(2000):
                yield CHUNK
                await asyncio.sleep(0)
        finally:
            _cleanup(rid)

    return StreamingResponse(body())


async def collect(request: Request) -> PlainTextResponse:
    """Another request, in whose middle the garbage collector runs."""
    rid = _rid(request)
    gc.collect()
    await asyncio.sleep(0.01)  # the async-generator finalizer's aclose() tasks run here
    gc.collect()
    return PlainTextResponse(str(perrequest.get("rid") == rid))


async def report(request: Request) -> JSONResponse:
    return JSONResponse(counts)


app = Starlette(
    routes=[
        Route("/stream/sync", stream_sync),
        Route("/stream/async", stream_async),
        Route("/collect", collect),
        Route("/counts", report),
    ]
)
app.add_middleware(RequestScopeMiddleware)
