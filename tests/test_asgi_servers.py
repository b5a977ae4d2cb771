"""Starlette and FastAPI apps with the middleware under real uvicorn and hypercorn servers.

One server per (server, framework) for the whole module; each test uses its
own request ids, so the probe's records never mix between tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from servers import STOPPING_HYPERCORN, serve_hypercorn, serve_uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route
from test_fastapi import build_fastapi_app
from test_starlette import BOOM_HITS, Probe, build_app

import perrequest
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

SERVERS = {"uvicorn": serve_uvicorn, "hypercorn": serve_hypercorn}
BUILDERS: dict[str, Callable[[], tuple[object, Probe]]] = {
    "starlette": build_app,
    "fastapi": build_fastapi_app,
}
CONCURRENT_REQUESTS = 300


@contextmanager
def _serve(server: str, framework: str) -> Iterator[tuple[str, Probe]]:
    app, probe = BUILDERS[framework]()
    options = {"log_level": "critical"} if server == "uvicorn" else {}
    with SERVERS[server](app, **options) as base:
        yield base, probe


@pytest.fixture(
    scope="module",
    params=[(s, f) for s in SERVERS for f in BUILDERS],
    ids=lambda p: "-".join(p),
)
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Probe]]:
    with _serve(*request.param) as served:
        yield served


def _rid() -> str:
    return uuid.uuid4().hex[:12]


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _background_done(probe: Probe, rid: str) -> Callable[[], bool]:
    return lambda: {"bg_sync", "bg_async"} <= set(probe.seen[rid])


def test_one_store_per_request_including_background_tasks(served: tuple[str, Probe]) -> None:
    base, probe = served
    rids = [_rid() for _ in range(5)]
    with httpx.Client(base_url=base, timeout=10) as client:
        tokens = [client.get(f"/token/{rid}").json()["endpoint"] for rid in rids]
    for rid, token in zip(rids, tokens, strict=True):
        _wait_for(_background_done(probe, rid))
        assert set(probe.seen[rid].values()) == {token}
        assert "bg_sync" in probe.seen[rid] and "endpoint" in probe.seen[rid]
    assert None not in tokens
    assert len(set(tokens)) == len(rids)  # keep-alive connection, fresh store each time


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_streaming_body_sees_the_request_store(served: tuple[str, Probe], kind: str) -> None:
    base, probe = served
    rid = _rid()
    with httpx.Client(base_url=base, timeout=10) as client:
        lines = client.get(f"/stream/{rid}?kind={kind}&chunks=5").text.split()
    _wait_for(_background_done(probe, rid))
    assert len(lines) == 5 and len(set(lines)) == 1 and "None" not in lines
    assert set(probe.seen[rid].values()) == set(lines)
    assert rid in probe.ended


def test_endpoint_that_raises_still_closes_the_store(served: tuple[str, Probe]) -> None:
    base, probe = served

    def booms() -> int:
        return sum((s.misses, s.hits) == (1, BOOM_HITS) for s in list(probe.closed))

    before = booms()
    rid = _rid()
    # uvicorn closes the connection after an app error: one connection per request.
    boom = httpx.get(f"{base}/boom", timeout=10)
    handled = httpx.get(f"{base}/my-error/{rid}", timeout=10)
    assert boom.status_code == 500 and boom.text == "in_scope=False"
    _wait_for(lambda: booms() == before + 1)
    assert handled.status_code == 409
    assert handled.json()["handler"] == probe.seen[rid]["endpoint"] is not None


def _disconnect_mid_stream(base: str, probe: Probe, kind: str) -> str:
    """Read the first chunk of an endless body on a raw socket, then hang up."""
    rid = _rid()
    url = urlsplit(base)
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        request = f"GET /stream/{rid}?kind={kind}&chunks=-1 HTTP/1.1\r\nHost: test\r\n\r\n"
        sock.sendall(request.encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        _wait_for(lambda: "chunk0" in probe.seen[rid])
        assert live_scopes() >= 1  # the endless body is running, its store open
    return rid


def test_client_disconnect_ends_an_async_body_and_closes_the_store(
    served: tuple[str, Probe],
) -> None:
    base, probe = served
    rid = _disconnect_mid_stream(base, probe, "async")
    _wait_for(lambda: rid in probe.ended and live_scopes() == 0)
    # Starlette still runs the background tasks after a disconnect, in the same store.
    _wait_for(_background_done(probe, rid))
    assert set(probe.seen[rid].values()) == {probe.seen[rid]["chunk0"]} != {None}


def test_client_disconnect_stops_a_sync_body_and_closes_the_store(
    served: tuple[str, Probe],
) -> None:
    """Starlette stops pulling a sync body at once, but only the garbage collector closes it."""
    base, probe = served
    rid = _disconnect_mid_stream(base, probe, "sync")
    _wait_for(lambda: live_scopes() == 0)
    _wait_for(_background_done(probe, rid))
    produced = len(probe.seen[rid])
    time.sleep(0.05)
    assert len(probe.seen[rid]) == produced  # no longer iterated
    gc.collect()
    _wait_for(lambda: rid in probe.ended)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "framework"), [("uvicorn", "fastapi"), ("hypercorn", "starlette")]
)
async def test_concurrent_requests_never_cross_talk(server: str, framework: str) -> None:
    prefix = _rid()
    rids = [f"{prefix}-{i}" for i in range(CONCURRENT_REQUESTS)]
    limits = httpx.Limits(max_connections=16)
    with _serve(server, framework) as (base, probe):
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
            responses = await asyncio.gather(*(client.get(f"/iso/{rid}") for rid in rids))
    bodies = [r.json() for r in responses]
    cross_talk = sum(body["rid"] != rid for body, rid in zip(bodies, rids, strict=True))
    assert cross_talk == 0
    assert len({body["token"] for body in bodies}) == CONCURRENT_REQUESTS
    assert probe.computed == CONCURRENT_REQUESTS
    assert max(body["live"] for body in bodies) > 1  # requests really overlapped


def _shutdown_app() -> tuple[Starlette, list[str], list[str]]:
    """Three requests that never end by themselves: an endless body, a handler asleep, and
    a background task asleep. What their cleanups saw, and one entry per closed scope."""
    seen: list[str] = []
    closed: list[str] = []

    def cleanup(where: str) -> None:
        seen.append(f"{where}: {perrequest.get('rid')}")

    async def endless(request: Request) -> StreamingResponse:
        perrequest.set("rid", "endless")

        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"x" * 1024
                    await asyncio.sleep(0.01)
            finally:
                cleanup("body")

        return StreamingResponse(body())

    async def asleep(request: Request) -> PlainTextResponse:
        perrequest.set("rid", "asleep")
        try:
            await asyncio.sleep(60)
        finally:
            cleanup("handler")
        return PlainTextResponse("never")

    async def background(request: Request) -> PlainTextResponse:
        perrequest.set("rid", "background")

        async def later() -> None:
            try:
                await asyncio.sleep(60)
            finally:
                cleanup("background")

        return PlainTextResponse("sent", background=BackgroundTask(later))

    app = Starlette(
        routes=[Route("/endless", endless), Route("/asleep", asleep), Route("/bg", background)]
    )
    app.add_middleware(RequestScopeMiddleware, on_close=lambda stats: closed.append("closed"))
    return app, seen, closed


@pytest.mark.parametrize("server", ["uvicorn", STOPPING_HYPERCORN])
def test_a_server_shutting_down_mid_request_closes_each_store_once(server: str) -> None:
    """uvicorn (timeout_graceful_shutdown) and hypercorn (graceful_timeout) cancel what is
    still running when they stop: each request's cleanup sees its own store, then the
    store closes, once."""
    app, seen, closed = _shutdown_app()
    options = {"timeout_graceful_shutdown": 1} if server == "uvicorn" else {}
    with contextlib.ExitStack() as clients, SERVERS[server](app, **options) as base:
        url = urlsplit(base)
        assert url.hostname is not None and url.port is not None
        for path in ("/endless", "/asleep", "/bg"):
            sock = clients.enter_context(socket.create_connection((url.hostname, url.port)))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        _wait_for(lambda: live_scopes() == 3)
    assert sorted(seen) == ["background: background", "body: endless", "handler: asleep"]
    assert closed == ["closed"] * 3
    assert live_scopes() == 0
