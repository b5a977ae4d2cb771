"""A middleware's store is made when the request first needs it (``scope.open_request``).

Until then the ContextVar holds the request's cell; whoever makes the store
sets it in its own context. These tests attack what that could break: a value
computed twice because another context made the store first, two stores for
one request, a task that outlives its request writing somewhere, a deep copy
of the ASGI scope, the timing of watched scopes. Under real uvicorn and
wsgiref servers as well as the test clients.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import wsgiref.simple_server
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from typing import Any

import httpx
import pytest
from servers import HOST, free_port, serve_uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import perrequest
import perrequest._active
from perrequest import NoActiveScope, ScopeStats, request_memo
from perrequest.asgi import RequestScopeMiddleware
from perrequest.store import MemoStore
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware as WSGIMiddleware


class CountingStore(MemoStore):
    """A MemoStore that counts how many were made."""

    __slots__ = ()
    made = 0
    hold: threading.Barrier | None = None  # makers wait there for each other

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        type(self).made += 1
        if self.hold is not None:
            self.hold.wait(10)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[CountingStore]:
    CountingStore.made = 0
    CountingStore.hold = None
    monkeypatch.setattr(perrequest._active, "MemoStore", CountingStore)
    return CountingStore


def test_a_request_that_memoizes_nothing_makes_no_store(counting: type[CountingStore]) -> None:
    seen: list[bool] = []

    async def hello(request: Request) -> PlainTextResponse:
        seen.append(perrequest.in_request_scope())
        return PlainTextResponse("hi")

    app = RequestScopeMiddleware(Starlette(routes=[Route("/", hello)]))
    with TestClient(app) as client:
        for _ in range(5):
            assert client.get("/").text == "hi"
    assert seen == [True] * 5 and counting.made == 0 and live_scopes() == 0

    def wsgi_hello(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        seen.append(perrequest.in_request_scope())
        start_response("200 OK", [])
        yield b"hi"

    wrapped = WSGIMiddleware(wsgi_hello)
    for _ in range(5):
        body: Any = wrapped({"REQUEST_METHOD": "GET"}, lambda *a: None)
        assert b"".join(body) == b"hi"
        body.close()
    assert seen == [True] * 10 and counting.made == 0 and live_scopes() == 0


def test_a_request_that_memoizes_makes_one_store(counting: type[CountingStore]) -> None:
    @request_memo
    def double(n: int) -> int:
        return 2 * n

    async def endpoint(request: Request) -> JSONResponse:
        first = perrequest.current_store()
        values = [double(1), double(2), await asyncio.to_thread(double, 3)]
        return JSONResponse({"values": values, "same": perrequest.current_store() is first})

    app = RequestScopeMiddleware(Starlette(routes=[Route("/", endpoint)]))
    with TestClient(app) as client:
        assert client.get("/").json() == {"values": [2, 4, 6], "same": True}
    assert counting.made == 1


async def test_first_used_in_gathered_tasks_then_here_computes_once() -> None:
    """Tasks started before anything was written hold the cell; the first of them
    makes the store, the others find it, and so does the request's own context later:
    nothing is computed twice (the value made in a task is a hit afterwards)."""
    calls: list[int] = []

    @request_memo
    async def load(n: int) -> int:
        calls.append(n)
        await asyncio.sleep(0.001)
        return n * 10

    async def endpoint(request: Request) -> JSONResponse:
        gathered = await asyncio.gather(*(load(1) for _ in range(5)), load(2))
        again = [await load(1), await load(2)]
        return JSONResponse({"gathered": gathered, "again": again, "calls": calls[:]})

    app = RequestScopeMiddleware(Starlette(routes=[Route("/", endpoint)]))
    with serve_uvicorn(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(3):
                calls.clear()
                body = (await client.get("/")).json()
                assert body == {"gathered": [10] * 5 + [20], "again": [10, 20], "calls": [1, 2]}
    assert live_scopes() == 0


def test_first_used_in_a_thread_then_here_computes_once() -> None:
    calls: list[int] = []

    @request_memo
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    async def endpoint(request: Request) -> JSONResponse:
        in_thread = await asyncio.to_thread(square, 4)
        here = square(4)
        return JSONResponse([in_thread, here, len(calls)])

    app = RequestScopeMiddleware(Starlette(routes=[Route("/", endpoint)]))
    with TestClient(app) as client:
        calls.clear()
        assert client.get("/").json() == [16, 16, 1]


def test_threads_that_make_the_store_at_once_share_one(counting: type[CountingStore]) -> None:
    """Sixteen copies of the request's context, each the first to need the store, in
    threads that make their stores together: one store is kept, and a key is
    computed once."""
    calls: list[int] = []
    lock = threading.Lock()

    @request_memo
    def slow(n: int) -> int:
        with lock:
            calls.append(n)
        threading.Event().wait(0.01)
        return n

    start = threading.Barrier(16)
    stores: list[MemoStore] = []

    def first_use() -> int:
        start.wait()
        stores.append(perrequest.current_store())
        return slow(7)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        contexts = [copy_context() for _ in range(16)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda ctx: ctx.run(first_use), contexts))
        stores.append(perrequest.current_store())
        start_response("200 OK", [])
        return [repr(results).encode()]

    for _ in range(5):
        calls.clear()
        stores.clear()
        counting.made = 0
        counting.hold = threading.Barrier(16)  # all sixteen make a store before any keeps it
        body = WSGIMiddleware(app)({"REQUEST_METHOD": "GET"}, lambda *a: None)
        assert b"".join(body) == repr([7] * 16).encode()
        assert counting.made == 16
        assert len({id(store) for store in stores}) == 1 and stores[0].closed
        assert calls == [7]  # single-flight across the threads
    assert live_scopes() == 0


def test_a_task_that_outlives_its_request_is_outside_any_scope() -> None:
    """Whether the request made its store or not, a task still running after the
    response finds its scope closed: no store to read or write, anybody's."""
    outcomes: list[tuple[str, bool, str]] = []
    done = threading.Event()

    @request_memo(outside_scope="call")
    def whoami() -> str:
        return "computed"

    async def late(label: str) -> None:
        await asyncio.sleep(0.05)
        try:
            perrequest.current_store()
            store = "store"
        except NoActiveScope:
            store = "no store"
        outcomes.append((label, perrequest.in_request_scope(), store))
        whoami()  # outside: called, nothing stored
        if len(outcomes) == 2:
            done.set()

    tasks: set[asyncio.Task[None]] = set()

    async def endpoint(request: Request) -> PlainTextResponse:
        label = request.query_params["label"]
        if label == "made":
            whoami()
        task = asyncio.get_running_loop().create_task(late(label))
        tasks.add(task)
        return PlainTextResponse(label)

    app = RequestScopeMiddleware(Starlette(routes=[Route("/", endpoint)]))
    with serve_uvicorn(app) as url:
        for label in ("made", "unmade"):
            assert httpx.get(f"{url}/?label={label}").text == label
        assert done.wait(10)
    assert sorted(outcomes) == [("made", False, "no store"), ("unmade", False, "no store")]
    assert live_scopes() == 0
    # The closed store every unmade cell shares was never written to, nor set up for it.
    shared_closed = perrequest._active._NONE_MADE
    assert shared_closed.closed and shared_closed._subs is None and len(shared_closed) == 0


def test_a_deep_copied_scope_shares_the_request_and_copies_cleanly() -> None:
    copies: list[Any] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        copied = copy.deepcopy(scope)
        copies.append(copied[perrequest._active.REQUEST_KEY])
        perrequest.set("k", "v")
        await PlainTextResponse(perrequest.get("k"))(copied, receive, send)

    client = TestClient(RequestScopeMiddleware(inner))  # no lifespan: inner ignores it
    assert client.get("/").text == "v"
    assert isinstance(copies[0], list)  # the cell, copied: it holds no Token
    assert live_scopes() == 0


def test_a_watched_request_gets_its_store_at_once_and_timed() -> None:
    closed: list[ScopeStats] = []

    async def hello(request: Request) -> PlainTextResponse:
        await asyncio.sleep(0.01)
        return PlainTextResponse("hi")

    app = RequestScopeMiddleware(Starlette(routes=[Route("/", hello)]), on_close=closed.append)
    with TestClient(app) as client:
        client.get("/")
    assert len(closed) == 1 and closed[0].duration_s >= 0.01


def test_wsgiref_serves_lazily_made_stores_without_leaking_into_the_thread() -> None:
    """A real WSGI server (wsgiref, one thread): each request's store, made on first
    use, is gone from the thread when the next request starts."""

    @request_memo
    def rid(path: str) -> str:
        return path

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield rid(environ["PATH_INFO"]).encode()

    seen_at_start: list[object] = []

    def outer(environ: dict[str, Any], start_response: Any) -> Any:
        seen_at_start.append(perrequest._active._current.get())
        return WSGIMiddleware(app)(environ, start_response)

    port = free_port()
    server = wsgiref.simple_server.make_server(HOST, port, outer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for n in range(5):
            assert httpx.get(f"http://{HOST}:{port}/r{n}").text == f"/r{n}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert seen_at_start == [None] * 5 and live_scopes() == 0
