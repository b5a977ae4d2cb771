"""The ASGI middleware alone: options, plain ASGI apps, lifespan, websockets, on_close, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from servers import serve_hypercorn, serve_uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket
from watchers import writing_on_close
from websockets.sync.client import connect

import perrequest
from perrequest import DEFAULT_MAX_ENTRIES, MemoStore, ScopeStats, in_request_scope, request_memo
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

Scope = dict[str, Any]


async def _noop_app(scope: Scope, receive: Any, send: Any) -> None:
    """A plain ASGI app that answers any HTTP request with 200 'ok'."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


# -- options -------------------------------------------------------------------


async def test_defaults() -> None:
    seen: list[int | None] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(perrequest.current_store().max_entries)
        await _noop_app(scope, receive, send)

    middleware = RequestScopeMiddleware(app)
    assert middleware.app is app
    assert (await _get(middleware)).text == "ok"
    assert seen == [DEFAULT_MAX_ENTRIES]


@pytest.mark.parametrize(
    "scope_types", [("http", "websocket"), ["websocket"], {"http"}, frozenset({"websocket"})]
)
def test_scope_types_accepts_collections(scope_types: Any) -> None:
    middleware = RequestScopeMiddleware(_noop_app, scope_types=scope_types)
    assert middleware._scope_types == frozenset(scope_types)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_entries": "10"}, TypeError, "max_entries"),
        ({"max_entries": True}, TypeError, "max_entries"),
        ({"max_entries": 0}, ValueError, "max_entries"),
        ({"max_entries": -5}, ValueError, "max_entries"),
        ({"on_close": "log"}, TypeError, "on_close"),
        ({"scope_types": "http"}, TypeError, "tuple"),
        ({"scope_types": None}, TypeError, "scope_types"),
        ({"scope_types": ("http", 1)}, TypeError, "strings"),
        ({"scope_types": ()}, ValueError, "empty"),
        ({"scope_types": ("http", "lifespan")}, ValueError, "lifetime|lasts as long"),
        ({"scope_types": ("HTTP",)}, ValueError, "unknown scope type 'HTTP'"),
        ({"scope_types": ("webhook",)}, ValueError, "unknown scope type"),
        ({"max_entry": 10}, TypeError, "max_entry"),
    ],
)
def test_bad_options_fail_at_construction(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        RequestScopeMiddleware(_noop_app, **options)


def test_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="ASGI app"):
        RequestScopeMiddleware("main:app")  # type: ignore[arg-type]


def test_lifespan_error_says_why() -> None:
    with pytest.raises(ValueError, match="process") as info:
        RequestScopeMiddleware(_noop_app, scope_types=["lifespan"])
    assert "'http'" in str(info.value)


def test_max_entries_none_is_an_explicit_unbounded_store() -> None:
    seen: list[int | None] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(perrequest.current_store().max_entries)
        await _noop_app(scope, receive, send)

    asyncio.run(_get(RequestScopeMiddleware(app, max_entries=None)))
    asyncio.run(_get(RequestScopeMiddleware(app, max_entries=7)))
    assert seen == [None, 7]


# -- a plain ASGI app, called directly ----------------------------------------------


def _http_scope() -> Scope:
    return {"type": "http", "asgi": {"version": "3.0"}, "method": "GET", "path": "/", "headers": []}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _get(app: Any, path: str = "/") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path)


async def test_plain_asgi_app_sees_a_store_that_closes_when_it_returns() -> None:
    stores: list[MemoStore] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        stores.append(perrequest.current_store())
        perrequest.set("user", scope["path"])
        await _noop_app(scope, receive, send)

    wrapped = RequestScopeMiddleware(app)
    responses = [await _get(wrapped, f"/u{i}") for i in range(3)]
    assert [r.text for r in responses] == ["ok"] * 3
    assert len({id(s) for s in stores}) == 3
    assert all(s.closed and len(s) == 0 for s in stores)
    assert live_scopes() == 0


async def test_the_contextvar_is_reset_in_the_callers_context() -> None:
    """Called in this task's context: no store may be left set here afterwards, even on error."""

    async def fails(scope: Scope, receive: Any, send: Any) -> None:
        assert in_request_scope()
        raise KeyError("boom")

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await RequestScopeMiddleware(_noop_app)(_http_scope(), _receive, send)
    assert not in_request_scope()
    with pytest.raises(KeyError, match="boom"):
        await RequestScopeMiddleware(fails)(_http_scope(), _receive, send)
    assert not in_request_scope()
    assert live_scopes() == 0
    assert sent[0]["status"] == 200


async def test_cancellation_closes_the_store() -> None:
    started = asyncio.Event()
    stores: list[MemoStore] = []

    async def hangs(scope: Scope, receive: Any, send: Any) -> None:
        stores.append(perrequest.current_store())
        started.set()
        await asyncio.Event().wait()

    async def send(message: Any) -> None:
        pass

    task = asyncio.create_task(RequestScopeMiddleware(hangs)(_http_scope(), _receive, send))
    await started.wait()
    assert live_scopes() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stores[0].closed
    assert live_scopes() == 0


@pytest.mark.parametrize("scope_types", [("http",), ("http", "websocket")])
async def test_lifespan_passes_through_without_a_store(scope_types: tuple[str, ...]) -> None:
    seen: list[Any] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append((scope["type"], in_request_scope(), live_scopes()))
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    async def receive() -> Any:
        return next(messages)

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await RequestScopeMiddleware(app, scope_types=scope_types)({"type": "lifespan"}, receive, send)
    assert seen == [("lifespan", False, 0)]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# -- on_close and logging -------------------------------------------------------------


def _counting_app() -> Any:
    """Two get_or_set calls on one key: one miss, one hit, one entry."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        perrequest.get_or_set("k", object)
        perrequest.get_or_set("k", object)
        await _noop_app(scope, receive, send)

    return app


async def test_on_close_called_once_per_request_with_stats() -> None:
    closed: list[ScopeStats] = []
    wrapped = RequestScopeMiddleware(_counting_app(), on_close=closed.append)
    for _ in range(4):
        assert (await _get(wrapped)).status_code == 200
    assert len(closed) == 4
    assert all((s.hits, s.misses, s.entries, s.peak_entries) == (1, 1, 1, 1) for s in closed)
    assert all(s.duration_s >= 0 for s in closed)


async def test_on_close_raising_is_logged_and_the_response_stays_200(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(stats: ScopeStats) -> None:
        raise ZeroDivisionError("metrics backend down")

    caplog.set_level(logging.ERROR, logger="perrequest")
    response = await _get(RequestScopeMiddleware(_counting_app(), on_close=broken))
    assert response.status_code == 200 and response.text == "ok"
    errors = [r for r in caplog.records if r.name == "perrequest" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ZeroDivisionError
    assert live_scopes() == 0


async def test_debug_log_of_stats_per_closed_scope(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="perrequest")
    wrapped = RequestScopeMiddleware(_counting_app())
    for _ in range(3):
        await _get(wrapped)
    debug = [r for r in caplog.records if r.name == "perrequest" and r.levelno == logging.DEBUG]
    assert len(debug) == 3
    assert all("hits=1" in r.getMessage() and "misses=1" in r.getMessage() for r in debug)


async def test_a_request_that_memoizes_nothing_is_heard_by_a_listener_added_meanwhile() -> None:
    """Its store is never made; it still closes a scope, which a listener added while
    it ran hears of."""
    heard: list[ScopeStats] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        perrequest.add_scope_listener(heard.append)
        await _noop_app(scope, receive, send)

    try:
        await _get(RequestScopeMiddleware(app))
    finally:
        perrequest.remove_scope_listener(heard.append)
    assert [(s.hits, s.misses, s.entries) for s in heard] == [(0, 0, 0)]
    assert live_scopes() == 0


# -- websockets --------------------------------------------------------------------


def _ws_app(**options: Any) -> tuple[Any, list[ScopeStats]]:
    """Echo per message: in scope?, the connection's memo token, a counter kept in the store."""
    closed: list[ScopeStats] = []
    calls: list[int] = []

    @request_memo
    def connection_token() -> int:
        calls.append(1)
        return len(calls)

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            if not in_request_scope():
                await websocket.send_json({"in_scope": False, "token": connection_token()})
                continue
            store = perrequest.current_store()
            count = perrequest.get("count", 0) + 1
            if text.startswith("fill"):  # new keys each message: (message number, i)
                for i in range(int(text[4:])):
                    store[count, i] = i
            perrequest.set("count", count)
            await websocket.send_json(
                {
                    "in_scope": True,
                    "token": connection_token(),
                    "count": count,
                    "entries": len(store),
                    "evictions": store.stats.evictions,
                }
            )

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    options.setdefault("on_close", closed.append)
    app.add_middleware(RequestScopeMiddleware, **options)
    return app, closed


def test_websocket_without_scope_type_gets_no_store() -> None:
    app, closed = _ws_app()
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        replies = []
        for _ in range(3):
            ws.send_text("hi")
            replies.append(ws.receive_json())
    assert [r["in_scope"] for r in replies] == [False] * 3
    assert [r["token"] for r in replies] == [1, 2, 3]  # outside a scope memos just call
    assert closed == []


def test_websocket_store_lasts_for_the_connection() -> None:
    app, closed = _ws_app(scope_types=("http", "websocket"))
    with TestClient(app) as client:
        for connection in range(2):
            with client.websocket_connect("/ws") as ws:
                replies = []
                for _ in range(3):
                    ws.send_text("hi")
                    replies.append(ws.receive_json())
            assert [r["count"] for r in replies] == [1, 2, 3]
            assert {r["token"] for r in replies} == {connection + 1}
    assert len(closed) == 2


def test_max_entries_bounds_a_websocket_store_for_its_whole_life() -> None:
    app, closed = _ws_app(scope_types=["websocket"], max_entries=5)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        replies = []
        for _ in range(4):
            ws.send_text("fill3")
            replies.append(ws.receive_json())
    assert all(r["entries"] <= 5 for r in replies)
    assert replies[-1]["entries"] == 5
    assert replies[-1]["evictions"] > 0
    # The count and the token are used on every message, so LRU keeps them.
    assert [r["count"] for r in replies] == [1, 2, 3, 4]
    assert {r["token"] for r in replies} == {1}
    # 4 x 3 fill keys + the count + the token = 14 distinct keys into 5 slots.
    assert len(closed) == 1
    assert closed[0].peak_entries == 5
    assert closed[0].evictions == 14 - 5


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
@pytest.mark.parametrize("scope_types", [("http",), ("http", "websocket")])
def test_websocket_on_a_real_server(scope_types: tuple[str, ...], server: str) -> None:
    """Two connections closed cleanly, then one the client resets mid-connection: each
    connection has its own store, and each store closes once."""
    app, closed = _ws_app(scope_types=scope_types)
    with (serve_uvicorn if server == "uvicorn" else serve_hypercorn)(app) as base:
        url = base.replace("http://", "ws://") + "/ws"
        for _ in range(2):
            with connect(url, open_timeout=10) as ws:
                replies = []
                for _ in range(3):
                    ws.send("hi")
                    replies.append(json.loads(ws.recv(timeout=10)))
            assert {r["in_scope"] for r in replies} == {"websocket" in scope_types}
        with connect(url, open_timeout=10, close_timeout=1) as reset:
            reset.send("hi")
            assert json.loads(reset.recv(timeout=10))["in_scope"] == ("websocket" in scope_types)
            linger = struct.pack("ii", 1, 0)  # close() sends a RST
            reset.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            reset.socket.close()
        _wait(lambda: len(closed) == (3 if "websocket" in scope_types else 0))
        _wait(lambda: live_scopes() == 0)
    if "websocket" in scope_types:
        assert [r["count"] for r in replies] == [1, 2, 3]
        assert {r["token"] for r in replies} == {2}  # second connection, its own store
        assert [stats.misses for stats in closed] == [1, 1, 1]
    else:
        assert closed == []


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_a_middleware_below_that_deep_copies_the_scope_still_sees_the_store() -> None:
    """hypercorn's ProxyFixMiddleware deep-copies the ASGI scope, store marker and all."""
    from hypercorn.middleware import ProxyFixMiddleware
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> JSONResponse:
        perrequest.set("k", "v")
        assert request.client is not None
        return JSONResponse({"client": request.client.host, "k": perrequest.get("k")})

    inner = Starlette(routes=[Route("/", endpoint)])
    app = RequestScopeMiddleware(ProxyFixMiddleware(inner, mode="legacy", trusted_hops=1))
    with TestClient(app) as client:
        response = client.get("/", headers={"X-Forwarded-For": "1.2.3.4"})
    assert response.status_code == 200
    assert response.json() == {"client": "1.2.3.4", "k": "v"}
    assert live_scopes() == 0


def test_a_store_is_shared_by_copies_and_refuses_pickling() -> None:
    import copy
    import pickle

    with perrequest.request_scope() as store:
        holder = {"store": store, "headers": [(b"a", b"b")]}
        assert copy.deepcopy(holder)["store"] is store and copy.copy(store) is store
        with pytest.raises(TypeError, match="cannot be pickled") as refused:
            pickle.dumps(store)
        # What the error advises works with memo entries in the store too (a probe: the
        # advice was dict(store), whose memo keys hold an unpicklable spec).
        store["user"] = 1
        _module_memo(2)
        advice = str(refused.value).split("Pickle the entries you set: ")[1].split(" (memo")[0]
        kept = eval(advice, {"store": store, "perrequest": perrequest})
        assert pickle.loads(pickle.dumps(kept)) == {"user": 1} and len(store) == 2
        store.update(self=3, other=4)  # MutableMapping.update's own: both are keys
        assert store["self"] == 3 and store["other"] == 4


@perrequest.request_memo
def _module_memo(x: int) -> int:
    return x


async def test_an_inner_layer_reached_inside_a_request_scope_gives_the_mark_back() -> None:
    """semantics.md: a sub-request with a copy of the scope shares the request's store.
    An inner layer called with the request's own scope dict inside a request_scope()
    (a scope of its own, rightly) left its mark in that dict: every later copy then
    opened a store of its own (a probe, 7 December)."""
    seen: dict[str, Any] = {}

    async def leaf(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen[scope["path"]] = perrequest.get("user")

    inner = RequestScopeMiddleware(leaf)

    async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
        perrequest.set("user", "alice")
        await inner(dict(scope, path="/first"), receive, send)
        with perrequest.request_scope():
            await inner(scope, receive, send)  # its own store: the block's, isolated
        await inner(dict(scope, path="/after"), receive, send)

    await RequestScopeMiddleware(handler)({"type": "http", "path": "/"}, None, None)
    assert seen == {"/first": "alice", "/": None, "/after": "alice"}


async def test_a_deep_copied_scope_shares_the_store_with_an_int_subclass_bound() -> None:
    """semantics.md: a deep copy of the scope (hypercorn's ProxyFixMiddleware) shares the
    store. The inner layer knows the outer's scope by its options tuple, which deepcopy
    keeps only if its items copy to themselves: an int subclass's max_entries did not,
    and the inner layer's writes went to a store of its own (a probe)."""
    import copy

    class Size(int):  # a settings library's validated int
        pass

    seen: list[object] = []

    async def leaf(scope: dict[str, Any], receive: Any, send: Any) -> None:
        perrequest.set("user", "alice")

    inner = RequestScopeMiddleware(leaf)

    async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await inner(copy.deepcopy(scope), receive, send)
        seen.append(perrequest.get("user"))

    outer = RequestScopeMiddleware(handler, max_entries=Size(100))
    await outer({"type": "http", "path": "/"}, None, None)
    assert seen == ["alice"]


async def test_inner_layers_called_concurrently_inside_request_scopes_leave_the_mark() -> None:
    """Two in-process calls of an inner layer with the request's own scope dict, each in
    a request_scope(), gathered: the second saved the first's mark as the one to give
    back, and a later layer then opened a store of its own (a review of the day's fix).
    The inner layer now works on a copy, and the caller's dict keeps its mark."""
    seen: dict[str, list[object]] = {}

    async def leaf(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.setdefault(scope["path"], []).append(perrequest.current_store())
        await asyncio.sleep(0.01)

    inner = RequestScopeMiddleware(leaf)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["outer"] = [perrequest.current_store()]

        async def scoped_call() -> None:
            with perrequest.request_scope():
                await inner(scope, receive, send)

        await asyncio.gather(scoped_call(), scoped_call())
        scope["path"] = "/later"
        await inner(scope, receive, send)

    await RequestScopeMiddleware(app)({"type": "http", "path": "/"}, None, None)
    assert seen["/later"][0] is seen["outer"][0]  # (by identity: a store is a Mapping)
    assert all(store is not seen["outer"][0] for store in seen["/"])


async def test_on_close_runs_outside_the_scope_of_an_in_process_caller() -> None:
    """An app called in-process from inside a scope (a test's block through httpx's
    ASGITransport, a request calling a mounted app): the request's on_close ran with the
    caller's store active, and what it wrote there stayed (a review, 7 December)."""
    seen: list[Any] = []

    on_close = writing_on_close(seen)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        perrequest.set("who", "the request")

    wrapped = RequestScopeMiddleware(app, on_close=on_close)
    async with perrequest.request_scope():
        await wrapped({"type": "http"}, None, None)
        assert perrequest.get("leaked") is None and perrequest.get("who") is None
    assert seen == [False, "NoActiveScope"]
