"""A Starlette app for tests/test_http2.py: many requests multiplexed on one HTTP/2
connection, some streams reset by the client mid-body.

Every request stores its id and memoizes ``whose()`` (the same key in every
request); what each request sees is checked and tallied: its own id, never
another's. An abandoned body's ``finally`` may run later (its own store or
none is fine).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import perrequest
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

TALLY: dict[str, Any] = {"checks": 0, "bad": [], "cleanups": 0}


@perrequest.request_memo
async def whose() -> Any:
    await asyncio.sleep(0.001)
    return perrequest.get("rid")


def _check(place: str, rid: str, seen: Any) -> None:
    TALLY["checks"] += 1
    if seen != rid and len(TALLY["bad"]) < 20:
        TALLY["bad"].append(f"{place} of {rid} saw {seen!r}")


async def echo(request: Request) -> JSONResponse:
    rid = request.query_params["rid"]
    perrequest.set("rid", rid)
    await asyncio.sleep(0.005)  # the other streams' handlers run meanwhile
    seen = await asyncio.gather(*(whose() for _ in range(3)))
    for value in seen:
        _check("echo", rid, value)
    _check("echo get", rid, perrequest.get("rid"))
    return JSONResponse({"rid": rid, "seen": seen, "misses": whose.cache_info().misses})


async def stream(request: Request) -> StreamingResponse:
    rid = request.query_params["rid"]
    perrequest.set("rid", rid)

    async def body() -> AsyncIterator[bytes]:
        try:
            for _ in range(4000):
                _check("chunk", rid, perrequest.get("rid"))
                yield b"x" * 16384
                await asyncio.sleep(0)
        finally:
            TALLY["cleanups"] += 1
            seen = perrequest.get("rid")
            if seen is not None:
                _check("finally", rid, seen)

    return StreamingResponse(body())


async def report(request: Request) -> JSONResponse:
    """The tally and the stores open now (this request's included)."""
    return JSONResponse({**TALLY, "live": live_scopes()})


app = Starlette(routes=[Route("/echo", echo), Route("/stream", stream), Route("/report", report)])
app.add_middleware(RequestScopeMiddleware)
