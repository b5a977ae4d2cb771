"""A request that starts with another request's scope active never sees that scope.

uvicorn starts a pipelined request (and one read after a paused read) from
inside the previous request's ``send``/``receive``, so the new task copies the
previous request's context (CPython issue 140947; uvicorn's opt-in
``--reset-contextvars``), and that request's scope may still be open: its
background tasks run after the response. An app called in-process by a request
(``httpx.ASGITransport``) starts the same way, in that request's own task. The
middleware hides such a scope while the request runs, its own code and a scope
type it does not cover (a websocket) alike, and gives it back after, so the
calling request keeps its scope. What runs outside the middleware in a copied
task (Starlette's 500 handler) is out of its reach: ``--reset-contextvars``
covers that, or the middleware wrapping the whole app, which is the fix under
daphne: it starts a pipelined request the same way, and has no flag
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
from servers import HOST, free_port, serve_hypercorn, serve_subprocess, serve_uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import perrequest
from perrequest import request_memo, request_scope
from perrequest._active import _current
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

Scope = dict[str, Any]


def _http(path: str = "/") -> Scope:
    return {"type": "http", "asgi": {"version": "3.0"}, "method": "GET", "path": path}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    pass


def _seen() -> dict[str, Any]:
    return {"in_scope": perrequest.in_request_scope(), "owner": perrequest.get("owner")}


@pytest.mark.parametrize("made", [False, True], ids=["unmade", "made"])
async def test_a_task_started_inside_another_request_never_sees_its_scope(made: bool) -> None:
    """In-process: request A starts B's task, as uvicorn does from A's send. B's code, and
    a scope type the middleware does not cover, see nothing of A's."""
    seen: dict[str, dict[str, Any]] = {}

    async def b_app(scope: Scope, receive: Any, send: Any) -> None:
        seen[f"{scope['type']} inside"] = _seen()

    middleware = RequestScopeMiddleware(b_app)

    async def a_app(scope: Scope, receive: Any, send: Any) -> None:
        if made:
            perrequest.set("owner", "A")  # A's store is made: the context holds the store
        await asyncio.create_task(middleware(_http("/b"), _receive, _send))
        await asyncio.create_task(middleware({"type": "websocket"}, _receive, _send))
        assert perrequest.get("owner") == ("A" if made else None)  # A's own context keeps it

    await RequestScopeMiddleware(a_app)(_http("/a"), _receive, _send)
    assert seen == {
        "http inside": {"in_scope": True, "owner": None},  # its own store, not A's
        "websocket inside": {"in_scope": False, "owner": None},
    }
    assert live_scopes() == 0


@pytest.mark.parametrize("made", [False, True], ids=["unmade", "made"])
async def test_an_app_called_in_process_by_a_request_leaves_that_requests_scope(
    made: bool,
) -> None:
    """The same task, not a copy: a request that calls a perrequest-wrapped app through
    httpx.ASGITransport keeps its own scope after the call."""
    inner_stores: list[Any] = []

    async def inner_app(scope: Scope, receive: Any, send: Any) -> None:
        inner_stores.append(perrequest.current_store())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"inner"})

    after: list[Any] = []

    async def outer_app(scope: Scope, receive: Any, send: Any) -> None:
        if made:
            perrequest.set("owner", "outer")
        mine = perrequest.current_store()
        transport = httpx.ASGITransport(app=RequestScopeMiddleware(inner_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://inner") as client:
            assert (await client.get("/")).text == "inner"
        after.append((perrequest.current_store() is mine, perrequest.get("owner")))

    await RequestScopeMiddleware(outer_app)(_http("/outer"), _receive, _send)
    assert after == [(True, "outer" if made else None)]
    assert inner_stores[0].closed and live_scopes() == 0


async def test_a_closed_scope_left_in_the_context_is_dropped_by_the_next_request() -> None:
    with request_scope() as left:
        pass
    seen: list[bool] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(perrequest.in_request_scope())

    async def in_a_context_left_with_it() -> Any:
        _current.set(left)
        await RequestScopeMiddleware(app)(_http(), _receive, _send)
        return _current.get()

    assert await asyncio.create_task(in_a_context_left_with_it()) is None
    assert seen == [True] and live_scopes() == 0


async def test_a_request_scope_the_caller_opened_around_the_app_is_kept() -> None:
    stores: list[Any] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        stores.append(perrequest.current_store())

    with request_scope() as outer:
        await RequestScopeMiddleware(app)(_http(), _receive, _send)
        assert perrequest.current_store() is outer
        await RequestScopeMiddleware(app)({"type": "websocket"}, _receive, _send)
        assert perrequest.current_store() is outer
    assert stores[0] is not outer and stores[0].closed
    assert stores[1] is outer  # a scope type the middleware does not cover: the caller's


# -- under real uvicorn: a request pipelined behind one whose background task runs -------


class _Resource:
    """A request's object with a finalizer (a session, a temporary file, a span), kept in
    ``request.state``: freed, by reference counting, as the server drops the request."""

    freed: list[dict[str, Any]] = []

    def __del__(self) -> None:
        _Resource.freed.append(_seen())


def _app(outermost: bool = False) -> Any:
    """``outermost``: the middleware wraps the whole app, Starlette's 500 handler included
    (the fix for servers that copy a request's context into the next, docs/security.md).
    ``/hold``'s background task keeps its request open (its scope too) until ``/release``
    (which ``_exchange`` asks for once it has every answer), 1 s at most."""
    release = threading.Event()

    async def linger() -> None:  # also under trio (hypercorn's trio worker)
        with anyio.move_on_after(1.0):
            while not release.is_set():
                await anyio.sleep(0.01)

    async def released(request: Request) -> PlainTextResponse:
        release.set()
        return PlainTextResponse("released")

    @request_memo(outside_scope="call")
    def ident(tag: str) -> str:
        return f"{tag} by {perrequest.get('owner')}"

    def report(label: str) -> dict[str, Any]:
        result = {**_seen(), "ident": ident(label)}
        try:
            perrequest.set("written by", label)
            result["write"] = "ok"
        except perrequest.NoActiveScope:
            result["write"] = "NoActiveScope"
        return result

    async def hold(request: Request) -> PlainTextResponse:
        perrequest.set("owner", "A")
        ident("A")  # A's memo, keyed by the same argument as the others' calls below
        ident("WS")
        ident("500")
        return PlainTextResponse("held", background=BackgroundTask(linger))

    async def upload(request: Request) -> PlainTextResponse:
        await request.body()  # over uvicorn's 64 KiB high-water mark: reading pauses, resumes
        return await hold(request)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(report("WS"))
        await websocket.close()

    async def who(request: Request) -> JSONResponse:
        return JSONResponse(report("WHO"))

    async def boom(request: Request) -> None:
        raise RuntimeError("boom")

    async def on_500(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(report("500"), status_code=500)

    async def resource(request: Request) -> PlainTextResponse:
        request.state.resource = _Resource()
        return PlainTextResponse("kept until the server drops this request")

    async def freed(request: Request) -> JSONResponse:
        return JSONResponse({"freed": len(_Resource.freed), **dict(*_Resource.freed[:1])})

    app = Starlette(
        routes=[
            Route("/hold", hold),
            Route("/upload", upload, methods=["POST"]),
            Route("/who", who),
            Route("/boom", boom),
            Route("/resource", resource),
            Route("/freed", freed),
            Route("/release", released),
            WebSocketRoute("/ws", ws),
        ],
        middleware=[] if outermost else [Middleware(RequestScopeMiddleware)],
        exception_handlers={500: on_500},
    )
    return RequestScopeMiddleware(app) if outermost else app


def __getattr__(name: str) -> Any:
    """What daphne and gunicorn import by name (``module:attribute``), made when asked for:
    the apps, and the uvicorn worker that docs/security.md shows for gunicorn."""
    if name in ("daphne_app", "daphne_outermost_app"):
        return _app(outermost=name == "daphne_outermost_app")
    if name == "ResetContextvarsWorker":
        from uvicorn.workers import UvicornWorker

        class ResetContextvarsWorker(UvicornWorker):
            CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "reset_contextvars": True}

        return ResetContextvarsWorker
    raise AttributeError(name)


def _exchange(base: str, *requests: bytes) -> bytes:
    """Send each request on one connection, the next as soon as the previous response's
    first bytes arrived (the last request's answer must be JSON); then, on another
    connection, end ``/hold``'s background task (it waited for this, 1 s at most)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        received = b""
        deadline = time.monotonic() + 5
        for request in requests:
            sock.sendall(request)
            received = b""
            while time.monotonic() < deadline and b"HTTP/1.1" not in received:
                received += sock.recv(65536)
        while time.monotonic() < deadline and b"}" not in received[received.find(b"{") :]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    httpx.get(f"{base}/release", timeout=5).raise_for_status()
    return received


def _report(received: bytes) -> dict[str, Any]:
    start = received.index(b"{")
    result: dict[str, Any] = json.loads(received[start : received.index(b"}", start) + 1])
    return result


HOLD = b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n"
UPLOAD = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300_000
BOOM = b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n"
WHO = b"GET /who HTTP/1.1\r\nHost: x\r\n\r\n"
WS = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


OWN = {"in_scope": True, "owner": None, "ident": "WHO by None", "write": "ok"}
OWN_500 = {**OWN, "ident": "500 by None"}  # the 500 handler, inside the outermost middleware


def _none(label: str) -> dict[str, Any]:
    return {"in_scope": False, "owner": None, "ident": f"{label} by None", "write": "NoActiveScope"}


@pytest.mark.parametrize(
    ("requests", "reset_contextvars", "expected"),
    [
        # Before: the first request's owner, its memo entry, a write to its store.
        ((HOLD + WHO,), False, OWN),  # pipelined: started from the first one's send()
        ((UPLOAD, WHO), False, OWN),  # one after the other, after a paused read
        ((HOLD + WS,), False, _none("WS")),  # a scope type the middleware passes through
        # Outside the middleware (Starlette's 500 handler): uvicorn's own flag.
        ((HOLD + BOOM,), True, _none("500")),
        ((UPLOAD, BOOM), True, _none("500")),
    ],
    ids=[
        "pipelined",
        "after-a-large-body",
        "pipelined-websocket",
        "pipelined-500-handler-reset-contextvars",
        "after-a-large-body-500-handler-reset-contextvars",
    ],
)
def test_a_request_uvicorn_starts_inside_another_never_sees_its_store(
    requests: tuple[bytes, ...], reset_contextvars: bool, expected: dict[str, Any]
) -> None:
    options: dict[str, Any] = {"reset_contextvars": True} if reset_contextvars else {}
    with serve_uvicorn(_app(), log_level="critical", **options) as base:
        seen = _report(_exchange(base, *requests))
        deadline = time.monotonic() + 5
        while live_scopes() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert seen == expected
    assert live_scopes() == 0


@pytest.mark.parametrize(
    "requests",
    [(HOLD + WHO,), (HOLD + BOOM,), (UPLOAD, BOOM)],
    ids=["pipelined", "500", "after-500"],
)
def test_the_middleware_wrapping_the_whole_app_needs_no_flag_under_uvicorn(
    requests: tuple[bytes, ...],
) -> None:
    """docs/security.md: outermost, the middleware hides the copied scope from the whole
    request; the 500 handler then runs in the request's own store."""
    with serve_uvicorn(_app(outermost=True), log_level="critical") as base:
        seen = _report(_exchange(base, *requests))
        deadline = time.monotonic() + 5
        while live_scopes() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert seen == (OWN if requests[-1].endswith(WHO) else OWN_500)
    assert live_scopes() == 0


@pytest.mark.parametrize(
    ("requests", "outermost", "expected"),
    [
        ((HOLD + WHO,), False, OWN),
        ((UPLOAD, WHO), False, OWN),
        ((HOLD + WS,), False, _none("WS")),
        ((HOLD + BOOM,), True, OWN_500),
        ((UPLOAD, BOOM), True, OWN_500),
    ],
    ids=["pipelined", "after-a-large-body", "pipelined-websocket", "500", "after-500"],
)
def test_a_request_daphne_starts_inside_another_never_sees_its_store(
    requests: tuple[bytes, ...], outermost: bool, expected: dict[str, Any]
) -> None:
    """daphne starts a pipelined request from the previous one's context too, and has no
    flag to stop it: the middleware hides it in the request's own code; wrapping the whole
    app covers the 500 handler (docs/security.md)."""
    port = free_port()
    app = "daphne_outermost_app" if outermost else "daphne_app"
    argv = [sys.executable, "-m", "daphne", "-b", HOST, "-p", str(port), f"{__name__}:{app}"]
    with serve_subprocess(argv, port) as base:
        seen = _report(_exchange(base, *requests))
    assert seen == expected


@pytest.mark.parametrize("worker", ["uvicorn.workers.UvicornWorker", "ResetContextvarsWorker"])
def test_gunicorns_uvicorn_worker_takes_reset_contextvars_from_a_subclass(worker: str) -> None:
    """docs/security.md: the flag cannot be given on gunicorn's command line; a worker
    subclass gives it, and the 500 handler of a pipelined request sees nothing then."""
    port = free_port()
    worker = worker if "." in worker else f"{__name__}.{worker}"
    argv = [sys.executable, "-m", "gunicorn", "-k", worker, "-b", f"{HOST}:{port}"]
    with serve_subprocess([*argv, "-w", "1", f"{__name__}:daphne_app"], port) as base:
        seen = _report(_exchange(base, HOLD + BOOM))
    if worker.endswith("ResetContextvarsWorker"):
        assert seen == _none("500")
    else:  # the leak the flag stops: the first request's owner, memo and store
        assert seen == {"in_scope": True, "owner": "A", "ident": "500 by A", "write": "ok"}


@contextmanager
def _serve_granian(factory: str) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", HOST]
    argv += ["--port", str(port), "--log-level", "warning", "--factory", factory]
    with serve_subprocess(argv, port) as base:
        yield base


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
@pytest.mark.parametrize(
    "requests",
    [(HOLD + WHO,), (UPLOAD, WHO), (HOLD + WS,), (HOLD + BOOM,), (UPLOAD, BOOM)],
    ids=["pipelined", "after-a-large-body", "pipelined-websocket", "pipelined-500", "after-500"],
)
def test_hypercorn_and_granian_start_each_request_in_their_own_context(
    server: str, requests: tuple[bytes, ...]
) -> None:
    """docs/security.md: no flag needed there, even outside the middleware (the 500 handler)."""
    last = requests[-1]
    label = "WHO" if last.endswith(WHO) else "WS" if last.endswith(WS) else "500"
    serve = serve_hypercorn(_app()) if server == "hypercorn" else _serve_granian(f"{__name__}:_app")
    with serve as base:
        seen = _report(_exchange(base, *requests))
    assert seen == (OWN if label == "WHO" else _none(label))


RESOURCE = b"GET /resource HTTP/1.1\r\nHost: x\r\n\r\n"
FREED = b"GET /freed HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("requests", "loop", "reset_contextvars", "seen_there"),
    [
        ((UPLOAD, RESOURCE, FREED), "asyncio", False, "A"),
        ((UPLOAD, RESOURCE, FREED), "uvloop", False, None),
        ((HOLD + RESOURCE, FREED), "asyncio", False, "A"),
        ((HOLD + RESOURCE, FREED), "uvloop", True, None),
    ],
    ids=["upload-asyncio", "upload-uvloop", "pipelined-asyncio", "pipelined-uvloop-flag"],
)
def test_what_uvicorn_frees_after_a_paused_read_is_finalized_where_the_docs_say(
    requests: tuple[bytes, ...], loop: str, reset_contextvars: bool, seen_there: str | None
) -> None:
    """docs/security.md: a later request's object with a finalizer, freed by reference
    counting as uvicorn drops that request, is finalized with an earlier request's store
    while that one is open (its background task). On asyncio a paused read resumed inside
    that request (its ``receive()`` after a large body, its ``send()`` with a request
    pipelined behind) registers the socket's reader with a copy of its context, where
    ``data_received`` runs from then on; without ``--reset-contextvars`` a pipelined
    request's task also ends with the scope the middleware hid given back. Pinned where
    both places agree (with the flag on asyncio, or without it on uvloop, the object goes
    at the task's end or in the next ``data_received``, whichever comes first: a race).
    Not fixed (the docs say why): when uvicorn or CPython change this, these fail, and the
    docs must change with them. uvloop with the flag finalizes in no store."""
    _Resource.freed.clear()
    options: dict[str, Any] = {"reset_contextvars": True} if reset_contextvars else {}
    app = _app(outermost=True)
    with serve_uvicorn(app, loop=loop, log_level="critical", **options) as base:
        gc.disable()  # freed by reference counting, not by the collector's hook
        try:
            seen = _report(_exchange(base, *requests))
        finally:
            gc.enable()
    assert seen == {"freed": 1, "in_scope": seen_there is not None, "owner": seen_there}
