"""Faults: errors before, during and after the body, disconnects, cancellation,
raising on_close callbacks, key= functions and memo functions.

After each fault: the store is closed and empty, no scope is left open, the
server keeps serving, and the error reaches the caller unchanged (the very
same exception object in-process; a 500, or a cut response once the body has
started, over HTTP).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import reliability_apps as apps
from reliability_apps import Boom
from servers import HOST, serve_gunicorn, serve_uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import perrequest
from perrequest import (
    MemoStore,
    ScopeStats,
    current_store,
    in_request_scope,
    request_memo,
    request_scope,
)
from perrequest.asgi import RequestScopeMiddleware as AsgiScope
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware as WsgiScope

pytestmark = pytest.mark.timeout(60)

Scope = dict[str, Any]
Message = dict[str, Any]


def wait_no_live_scopes(timeout: float = 10) -> int:
    """A server thread may still be closing the last response: give it a moment."""
    deadline = time.monotonic() + timeout
    while live_scopes() and time.monotonic() < deadline:
        time.sleep(0.01)
    return live_scopes()


def assert_closed(store: MemoStore) -> None:
    assert wait_no_live_scopes() == 0
    assert store.closed
    assert len(store) == 0
    assert not in_request_scope()


# -- a minimal ASGI driver --------------------------------------------------------


def http_scope(path: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": (HOST, 50000),
        "server": (HOST, 80),
    }


async def drive(app: Callable[..., Any], path: str, sent: list[Message] | None = None) -> None:
    """Call an ASGI app once: the request has no body, the client never leaves."""
    received = False
    forever = asyncio.Event()

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await forever.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if sent is not None:
            sent.append(message)

    await app(http_scope(path), receive, send)


# -- ASGI middleware, in-process: the exception object itself comes out ----------

ERRORS: dict[str, Boom] = {}
STORES: list[MemoStore] = []


async def raw_asgi(scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    STORES.append(current_store())
    perrequest.set("value", "x" * 1000)
    path = scope["path"]
    if path == "/before":
        raise ERRORS[path]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"first;", "more_body": True})
    if path == "/during":
        raise ERRORS[path]
    await send({"type": "http.response.body", "body": b"last", "more_body": False})
    if path == "/after":
        raise ERRORS[path]


@pytest.mark.parametrize("path", ["/before", "/during", "/after"])
async def test_asgi_error_reaches_the_server_unchanged_and_closes_the_store(path: str) -> None:
    app = AsgiScope(raw_asgi)
    ERRORS[path] = Boom(f"raised {path}")
    with pytest.raises(Boom) as info:
        await drive(app, path)
    assert info.value is ERRORS[path]
    assert_closed(STORES[-1])
    sent: list[Message] = []
    await drive(app, "/ok", sent)  # the next request is served, with a fresh store
    assert sent[-1] == {"type": "http.response.body", "body": b"last", "more_body": False}
    assert STORES[-1] is not STORES[-2]
    assert_closed(STORES[-1])


# -- WSGI middleware, in-process ---------------------------------------------------


def environ(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SERVER_NAME": HOST,
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
    }


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    pass


class ClosingBody:
    """A body whose close() raises: the error of the last step of a WSGI response."""

    def __init__(self, error: Boom) -> None:
        self.error = error

    def __iter__(self) -> Iterator[bytes]:
        yield b"all;"

    def close(self) -> None:
        raise self.error


def raw_wsgi(env: dict[str, Any], start: Callable[..., Any]) -> Any:
    STORES.append(current_store())
    perrequest.set("value", "x" * 1000)
    path = env["PATH_INFO"]
    if path == "/before":
        raise ERRORS[path]
    start("200 OK", [])
    if path == "/during":
        return iter_then_raise(ERRORS[path])
    if path == "/after":
        return ClosingBody(ERRORS[path])
    return [b"ok"]


def iter_then_raise(error: Boom) -> Iterator[bytes]:
    yield b"first;"
    raise error


def serve_wsgi_once(app: Callable[..., Any], path: str) -> bytes:
    """What a WSGI server does: iterate the body, and always close it."""
    body = app(environ(path), start_response)
    try:
        return b"".join(body)
    finally:
        if hasattr(body, "close"):
            body.close()


@pytest.mark.parametrize("path", ["/before", "/during", "/after"])
def test_wsgi_error_reaches_the_server_unchanged_and_closes_the_store(path: str) -> None:
    app = WsgiScope(raw_wsgi)
    ERRORS[path] = Boom(f"raised {path}")
    with pytest.raises(Boom) as info:
        serve_wsgi_once(app, path)
    assert info.value is ERRORS[path]
    assert_closed(STORES[-1])
    assert serve_wsgi_once(app, "/ok") == b"ok"
    assert_closed(STORES[-1])


# -- memo functions and key= functions that raise ----------------------------------


def test_a_raising_memo_function_reaches_the_caller_unchanged_and_is_not_cached() -> None:
    error = Boom("lookup failed")
    calls: list[int] = []

    @request_memo
    def lookup(n: int) -> int:
        calls.append(n)
        raise error

    with request_scope() as store:
        for _ in range(2):
            with pytest.raises(Boom) as info:
                lookup(1)
            assert info.value is error
        assert calls == [1, 1]  # exceptions are not cached
        assert len(store) == 0
        perrequest.set("after", 1)  # the store still works
    assert_closed(store)


@pytest.mark.parametrize("error", [Boom("bad key"), KeyError("id"), TypeError("not a key")])
def test_a_raising_key_function_reaches_the_caller_unchanged(error: Exception) -> None:
    def key(record: dict[str, int]) -> int:
        raise error

    @request_memo(key=key)
    def load(record: dict[str, int]) -> int:
        raise AssertionError("never called: the key failed first")

    with request_scope() as store:
        with pytest.raises(type(error)) as info:
            load({"id": 1})
        assert info.value is error
        assert len(store) == 0
    assert_closed(store)


async def test_a_raising_async_memo_reaches_every_single_flight_waiter() -> None:
    error = Boom("shared failure")
    calls = 0

    @request_memo
    async def lookup(n: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise error

    async with request_scope() as store:
        results = await asyncio.gather(*(lookup(1) for _ in range(5)), return_exceptions=True)
        assert calls == 1
        assert all(result is error for result in results)
        assert len(store) == 0
        with pytest.raises(Boom):
            await lookup(1)  # not cached: computed again
        assert calls == 2
    assert_closed(store)


# -- cancellation ------------------------------------------------------------------


async def test_cancelling_the_computing_task_still_serves_the_other_waiters() -> None:
    started = asyncio.Event()
    calls = 0

    @request_memo
    async def slow(n: int) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(0.05)
        return f"value-{n}"

    async with request_scope() as store:
        owner = asyncio.create_task(slow(1))
        await started.wait()
        waiters = [asyncio.create_task(slow(1)) for _ in range(3)]
        await asyncio.sleep(0)
        owner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await owner
        assert await asyncio.gather(*waiters) == ["value-1"] * 3
        assert await slow(1) == "value-1"  # cached now
        assert calls <= 2
    assert_closed(store)


async def test_cancelling_every_waiter_cancels_the_computation_and_caches_nothing() -> None:
    finished = False

    @request_memo
    async def slow(n: int) -> str:
        nonlocal finished
        await asyncio.sleep(0.05)
        finished = True
        return f"value-{n}"

    async with request_scope() as store:
        tasks = [asyncio.create_task(slow(1)) for _ in range(3)]
        await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        await asyncio.sleep(0.08)
        assert not finished
        assert len(store) == 0
        assert slow.cache_info().currsize == 0  # type: ignore[attr-defined]
        assert await slow(2) == "value-2"  # the store still works
    assert_closed(store)


async def test_a_request_cancelled_while_awaiting_a_memo_closes_its_store() -> None:
    started = asyncio.Event()

    @request_memo
    async def slow() -> str:
        started.set()
        await asyncio.sleep(10)
        return "never"

    async def app(scope: Scope, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        STORES.append(current_store())
        await asyncio.gather(slow(), slow())  # an owner and a single-flight waiter

    request = asyncio.create_task(drive(AsgiScope(app), "/slow"))
    await started.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert_closed(STORES[-1])


# -- on_close callbacks that raise ---------------------------------------------------


def raising_on_close(stats: ScopeStats) -> None:
    raise Boom("on_close failed")


def logged_on_close_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "perrequest"
        and record.levelno == logging.ERROR
        and record.exc_info is not None
        and isinstance(record.exc_info[1], Boom)
    ]


def test_a_raising_on_close_never_replaces_the_blocks_result_or_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with request_scope(on_close=raising_on_close) as store:
        perrequest.set("k", "v")
    assert_closed(store)
    error = Boom("the block's own error")
    with pytest.raises(Boom) as info, request_scope(on_close=raising_on_close):
        raise error
    assert info.value is error
    assert len(logged_on_close_errors(caplog)) == 2


async def test_a_raising_on_close_never_fails_an_asgi_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = AsgiScope(raw_asgi, on_close=raising_on_close)
    for _ in range(2):
        sent: list[Message] = []
        await drive(app, "/ok", sent)
        assert sent[-1]["body"] == b"last"
        assert_closed(STORES[-1])
    assert len(logged_on_close_errors(caplog)) == 2


def test_a_raising_on_close_never_fails_a_wsgi_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = WsgiScope(raw_wsgi, on_close=raising_on_close)
    for _ in range(2):
        assert serve_wsgi_once(app, "/ok") == b"ok"
        assert_closed(STORES[-1])
    assert len(logged_on_close_errors(caplog)) == 2


# -- Starlette's exception handlers: which of them see the store -------------------


class Handled(Exception):
    """An exception class with a handler of its own."""


async def test_starlettes_500_handler_sees_no_store_but_specific_handlers_do() -> None:
    seen: dict[str, object] = {}

    async def fail(request: Request) -> Response:
        perrequest.set("user", "alice")
        raise Handled() if request.url.path == "/handled" else Boom("unhandled")

    async def on_handled(request: Request, exc: Exception) -> Response:
        seen["handled"] = perrequest.get("user")
        return PlainTextResponse("handled", status_code=400)

    async def on_500(request: Request, exc: Exception) -> Response:
        seen["500"] = (in_request_scope(), perrequest.get("user", "no store"))
        return PlainTextResponse("oops", status_code=500)

    app = Starlette(
        routes=[Route("/handled", fail), Route("/unhandled", fail)],
        exception_handlers={Handled: on_handled, 500: on_500},
    )
    app.add_middleware(AsgiScope)
    sent: list[Message] = []
    await drive(app, "/handled", sent)
    assert sent[0]["status"] == 400
    with pytest.raises(Boom):  # ServerErrorMiddleware sends the 500, then re-raises
        await drive(app, "/unhandled", sent)
    assert sent[-2]["status"] == 500
    assert seen == {"handled": "alice", "500": (False, "no store")}
    assert wait_no_live_scopes() == 0


# -- over HTTP: uvicorn in-process (so live_scopes() is this process's) -------------


def _remember_store() -> None:
    STORES.append(current_store())
    perrequest.set("value", "x" * 1000)


async def _ok(request: Request) -> Response:
    _remember_store()
    return PlainTextResponse("ok")


async def _before(request: Request) -> Response:
    _remember_store()
    raise Boom("before the response")


async def _during_body() -> AsyncIterator[bytes]:
    yield b"first;"
    await asyncio.sleep(0)
    raise Boom("during the body")


async def _during(request: Request) -> Response:
    _remember_store()
    return StreamingResponse(_during_body())


def _fail_after() -> None:
    raise Boom("after the response")


async def _after(request: Request) -> Response:
    _remember_store()
    return PlainTextResponse("complete", background=BackgroundTask(_fail_after))


async def _endless_body() -> AsyncIterator[bytes]:
    for _ in range(2000):  # bounded: 20 s at most
        yield b"x" * 65536
        await asyncio.sleep(0.01)


async def _endless(request: Request) -> Response:
    _remember_store()
    return StreamingResponse(_endless_body())


async def _memo_raise(request: Request) -> Response:
    _remember_store()
    return PlainTextResponse(apps.failing_memo(1))


async def _key_raise(request: Request) -> Response:
    _remember_store()
    return PlainTextResponse(apps.failing_key(0))


fault_app = Starlette(
    routes=[
        Route("/ok", _ok),
        Route("/before", _before),
        Route("/during", _during),
        Route("/after", _after),
        Route("/endless", _endless),
        Route("/memo-raise", _memo_raise),
        Route("/key-raise", _key_raise),
    ]
)
fault_app.add_middleware(AsgiScope, on_close=raising_on_close)


def read_first_bytes_and_leave(base: str, path: str) -> bytes:
    """A client that disconnects in the middle of the body."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return sock.recv(65536)


@pytest.fixture(scope="module")
def uvicorn_faults() -> Iterator[str]:
    with serve_uvicorn(fault_app, log_level="critical") as base:
        yield base


@pytest.mark.parametrize("path", ["/before", "/memo-raise", "/key-raise"])
def test_uvicorn_error_before_the_body_is_a_500_and_the_server_goes_on(
    uvicorn_faults: str, path: str
) -> None:
    response = httpx.get(uvicorn_faults + path)
    assert response.status_code == 500
    assert_closed(STORES[-1])
    assert httpx.get(uvicorn_faults + "/ok").text == "ok"
    assert_closed(STORES[-1])


def test_uvicorn_error_during_the_body_cuts_the_response_and_the_server_goes_on(
    uvicorn_faults: str,
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(uvicorn_faults + "/during")
    assert_closed(STORES[-1])
    assert httpx.get(uvicorn_faults + "/ok").text == "ok"
    assert_closed(STORES[-1])


def test_uvicorn_error_after_the_body_keeps_the_response_and_the_server_goes_on(
    uvicorn_faults: str,
) -> None:
    response = httpx.get(uvicorn_faults + "/after")
    assert (response.status_code, response.text) == (200, "complete")
    assert_closed(STORES[-1])
    assert httpx.get(uvicorn_faults + "/ok").text == "ok"
    assert_closed(STORES[-1])


def test_uvicorn_client_leaving_mid_body_closes_the_store(uvicorn_faults: str) -> None:
    first = read_first_bytes_and_leave(uvicorn_faults, "/endless")
    assert first.startswith(b"HTTP/1.1 200")
    assert_closed(STORES[-1])
    assert httpx.get(uvicorn_faults + "/ok").text == "ok"
    assert_closed(STORES[-1])


# -- over HTTP: gunicorn gthread, whose pooled threads are the classic leak ----------


def test_gunicorn_gthread_survives_every_fault_with_nothing_left_open() -> None:
    with (
        serve_gunicorn("reliability_apps:wsgi_app", worker_class="gthread", threads=2) as base,
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        for path in ("/raise-before", "/memo-raise", "/key-raise") * 10:
            assert http.get(path).status_code == 500
        for _ in range(5):
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.get(base + "/raise-during")
            assert read_first_bytes_and_leave(base, "/endless").startswith(b"HTTP/1.1 200")
        # Every request after a fault, on the same two threads, starts with a fresh store.
        for i in range(40):
            assert http.get(f"/iso/after{i}").content == apps.expected_body(f"after{i}")
        deadline = time.monotonic() + 10
        while (live := http.get("/live").json()["live"]) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        tally = http.get("/tally").json()
    assert live == 1  # only the /live request's own scope
    assert tally["mismatches"] == 0, tally["examples"]
    assert tally["where"]["fresh"] == 40
    assert tally["where"]["thread"] == 30 + 5 + 5 + 40  # every request, outside the middleware
