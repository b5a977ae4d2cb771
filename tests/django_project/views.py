"""Views of the test project. Each reports what it saw of the request's store."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.template.loader import render_to_string

import perrequest
from perrequest.testing import live_scopes

from .hooks import lookup, who

EVENTS = {"aborted": 0}
"""Streams whose generator was closed before it finished (a client went away)."""


def _seen(request: Any, **extra: Any) -> dict[str, Any]:
    before = perrequest.get("marker")
    marker = uuid.uuid4().hex
    perrequest.set("marker", marker)
    return {
        "before": before,
        "marker": marker,
        "mw": request.mw_lookup,
        "lookup": lookup("alice"),
        "lookups": perrequest.get("lookups"),
        "thread": threading.get_ident(),
        **extra,
    }


def sync_view(request: Any) -> JsonResponse:
    return JsonResponse(_seen(request))


async def async_view(request: Any) -> JsonResponse:
    await asyncio.sleep(0)
    return JsonResponse(_seen(request))


def shared_view(request: Any) -> JsonResponse:
    """Middleware, view and template (through a context processor) call one lookup."""
    page = render_to_string("page.html", request=request).strip()
    return JsonResponse(_seen(request, page=page))


def _line(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def _chunk() -> bytes:
    return _line(
        in_scope=perrequest.in_request_scope(),
        marker=perrequest.get("marker"),
        lookup=lookup("alice"),
        lookups=perrequest.get("lookups"),
    )


def _streaming(request: Any, body: Any) -> StreamingHttpResponse:
    marker = uuid.uuid4().hex
    perrequest.set("marker", marker)
    response = StreamingHttpResponse(body, content_type="application/x-ndjson")
    response["X-Marker"] = marker
    response["X-Lookup"] = lookup("alice")
    return response


def stream_sync(request: Any) -> StreamingHttpResponse:
    def body() -> Iterator[bytes]:
        for _ in range(3):
            yield _chunk()

    return _streaming(request, body())


def stream_async(request: Any) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(3):
            await asyncio.sleep(0)
            yield _chunk()

    return _streaming(request, body())


def stream_slow(request: Any) -> StreamingHttpResponse:
    """About 64 MB in 64 KB chunks, slowly: a client is expected to leave early."""

    def body() -> Iterator[bytes]:
        done = False
        try:
            for _ in range(1000):
                yield b"x" * 65536
                time.sleep(0.002)
            done = True
        finally:
            EVENTS["aborted"] += not done

    return StreamingHttpResponse(body())


def stream_slow_async(request: Any) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[bytes]:
        done = False
        try:
            for _ in range(1000):
                yield b"x" * 65536
                await asyncio.sleep(0.002)
            done = True
        finally:
            EVENTS["aborted"] += not done

    return StreamingHttpResponse(body())


def boom(request: Any) -> HttpResponse:
    perrequest.set("marker", "set-before-boom")
    raise RuntimeError("boom")


def server_error(request: Any) -> HttpResponse:
    """handler500: Django runs it inside the middleware stack, so it sees the view's store."""
    return HttpResponse(
        f"500 in_scope={perrequest.in_request_scope()} marker={perrequest.get('marker')}",
        status=500,
    )


def echo(request: Any) -> JsonResponse:
    """Store a value unique to this request, yield the thread, read it back."""
    before = perrequest.get("value")
    perrequest.set("value", request.GET["v"])
    time.sleep(0)
    return JsonResponse({"before": before, "seen": perrequest.get("value"), "memo": who()})


async def aecho(request: Any) -> JsonResponse:
    before = perrequest.get("value")
    perrequest.set("value", request.GET["v"])
    await asyncio.sleep(0)
    return JsonResponse({"before": before, "seen": perrequest.get("value"), "memo": who()})


def live(request: Any) -> JsonResponse:
    """Open scopes in this process, not counting this request's own; for forked servers."""
    own = 1 if perrequest.in_request_scope() else 0
    return JsonResponse({"live": live_scopes() - own, "pid": os.getpid(), **EVENTS})
