"""Attacks on the ASGI side as an adversarial user would make them, on real servers.

What these tests pin down: the wrong middleware for the app's protocol is refused when
it is built, not with Python's bare TypeError on every request; and the attacks that
held (each a regression test now): requests inherited by hypercorn's trio worker, tasks
and threads that outlive their request, FastAPI dependencies with ``yield``, single-flight
memos under ``asyncio.timeout``/``shield``/task groups, websockets and sub-apps, every
value a request stored freed as its response completes with the collector off.
"""

# No `from __future__ import annotations`: FastAPI must resolve Annotated[..., Depends(...)].
import asyncio
import functools
import gc
import random
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
import trio
import websockets.sync.client
from fastapi import BackgroundTasks, Depends, FastAPI
from flask import Flask
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_trio_serve
from servers import HOST, free_port, serve_hypercorn, serve_uvicorn, wait_for_port
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket
from test_inherited_context import BOOM, HOLD, OWN, UPLOAD, WHO, WS, _app, _exchange, _none, _report

import perrequest
import perrequest.asgi
import perrequest.wsgi
from perrequest import bind_scope, in_request_scope, request_memo
from perrequest.testing import live_scopes

SERVERS = {"uvicorn": serve_uvicorn, "hypercorn": serve_hypercorn}

# -- the wrong middleware for the app's protocol -----------------------------------------


def _wsgi_function(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


class _WsgiObject:
    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        return _wsgi_function(environ, start_response)


async def _asgi_function(scope: Any, receive: Any, send: Any) -> None:
    pass


class _AsgiObject:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


def _returns_a_coroutine(scope: Any, receive: Any, send: Any) -> Any:
    return _asgi_function(scope, receive, send)


@pytest.mark.parametrize(
    "app",
    [Flask(__name__), _wsgi_function, _WsgiObject()],
    ids=["flask", "function", "object"],
)
def test_the_asgi_middleware_refuses_a_wsgi_app_and_names_the_wsgi_one(app: Any) -> None:
    """`from perrequest.wsgi import RequestScopeMiddleware` and the ASGI one share a name:
    mixed up, every request failed with 'takes 3 positional arguments but 4 were given'."""
    with pytest.raises(TypeError, match=r"WSGI app.*perrequest\.wsgi\.RequestScopeMiddleware"):
        perrequest.asgi.RequestScopeMiddleware(app)


@pytest.mark.parametrize(
    "app",
    [Starlette(), _asgi_function, _AsgiObject(), functools.partial(_asgi_function)],
    ids=["starlette", "function", "object", "partial"],
)
def test_the_wsgi_middleware_refuses_an_asgi_app_and_names_the_asgi_one(app: Any) -> None:
    """The other way round, each request failed with "missing 1 required positional
    argument: 'send'" (under gunicorn) or 'start_response' (under uvicorn)."""
    with pytest.raises(TypeError, match=r"ASGI app.*perrequest\.asgi\.RequestScopeMiddleware"):
        perrequest.wsgi.RequestScopeMiddleware(app)


class _Asgi2App:
    """ASGI 2: made from the scope, then called with receive and send."""

    def __init__(self, scope: Any) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        body = b"store" if perrequest.in_request_scope() else b"none"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def _asgi2_function(scope: Any) -> Any:
    return _Asgi2App(scope)


@pytest.mark.parametrize("app", [_Asgi2App, _asgi2_function], ids=["class", "function"])
def test_the_asgi_middleware_refuses_an_asgi2_app_and_names_the_wrapper(app: Any) -> None:
    """Taken, every request failed with '__init__() takes 2 positional arguments but 4 were
    given', naming neither perrequest nor the fix (an audit of 5 December 2026)."""
    with pytest.raises(TypeError, match=r"ASGI 2 app.*guarantee_single_callable\(app\)"):
        perrequest.asgi.RequestScopeMiddleware(app)
    from asgiref.compatibility import guarantee_single_callable

    wrapped = perrequest.asgi.RequestScopeMiddleware(guarantee_single_callable(app))
    assert TestClient(wrapped).get("/").content == b"store"  # (no lifespan: not used)


def test_the_middleware_registered_as_a_function_middleware_names_add_middleware() -> None:
    """``app.middleware("http")(RequestScopeMiddleware)`` calls it with a request and
    ``call_next``: the error says how to add it."""
    app = FastAPI()
    app.middleware("http")(perrequest.asgi.RequestScopeMiddleware)
    with (
        pytest.raises(TypeError, match=r"app\.add_middleware\(RequestScopeMiddleware"),
        TestClient(app) as client,
    ):
        client.get("/")


def test_each_middleware_still_takes_every_app_of_its_protocol() -> None:
    def _unreadable(*args: Any) -> Any:
        return _asgi_function(*args)

    _unreadable.__wrapped__ = type  # type: ignore[attr-defined]

    def _with_defaults(scope: Any, receive: Any = None, send: Any = None) -> Any:
        return _asgi_function(scope, receive, send)

    for asgi_app in (
        Starlette(),
        _asgi_function,
        _AsgiObject(),
        _returns_a_coroutine,
        _with_defaults,  # sync, and takes three: not ASGI 2
        _unreadable,  # a signature inspect cannot read: not refused
    ):
        perrequest.asgi.RequestScopeMiddleware(asgi_app)
    perrequest.asgi.RequestScopeMiddleware(functools.partial(_asgi_function))
    perrequest.asgi.RequestScopeMiddleware(max)  # no signature to read: not refused
    for wsgi_app in (Flask(__name__), _wsgi_function, _WsgiObject()):
        perrequest.wsgi.RequestScopeMiddleware(wsgi_app)


# -- a deep copy of the scope between two perrequest layers --------------------------------


@pytest.mark.parametrize("made", [False, True], ids=["store-not-made-yet", "store-made"])
def test_two_layers_share_one_scope_across_a_middleware_that_deep_copies_it(made: bool) -> None:
    """hypercorn's ProxyFixMiddleware deep-copies the ASGI scope, marker and all. The
    inner layer (a sub-app's own middleware) opened a second scope when the outer one's
    store had not been made before the copy (the lazy cell, a plain list, was copied),
    and shared it when it had: what the endpoint stored was lost to the outer code."""
    from hypercorn.middleware import ProxyFixMiddleware

    seen: dict[str, Any] = {}

    async def endpoint(request: Request) -> Response:
        perrequest.set("user", "alice")
        seen["live inside"] = live_scopes()
        seen["bound inside"] = perrequest.current_store().max_entries
        return PlainTextResponse("ok")

    inner = Starlette(
        routes=[Route("/", endpoint)],
        middleware=[Middleware(perrequest.asgi.RequestScopeMiddleware)],  # its own layer
    )
    proxied = ProxyFixMiddleware(inner, mode="legacy", trusted_hops=1)

    async def logging_middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and made:
            perrequest.get("anything")  # makes the store before the copy
        await proxied(scope, receive, send)
        if scope["type"] == "http":
            seen["user after"] = perrequest.get("user")

    app = perrequest.asgi.RequestScopeMiddleware(logging_middleware, max_entries=50)
    with TestClient(app) as client:
        assert client.get("/", headers={"X-Forwarded-For": "1.2.3.4"}).text == "ok"
    assert seen == {"live inside": 1, "bound inside": 50, "user after": "alice"}
    assert live_scopes() == 0


# -- what held: hypercorn's trio worker starts each request in its own context -----------


@contextmanager
def _serve_hypercorn_trio(app: Any) -> Iterator[str]:
    port = free_port()
    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.loglevel = "CRITICAL"
    config.graceful_timeout = 2
    stop = threading.Event()

    async def main() -> None:
        async def stopped() -> None:
            while not stop.is_set():
                await trio.sleep(0.02)

        await hypercorn_trio_serve(app, config, shutdown_trigger=stopped)

    thread = threading.Thread(target=trio.run, args=(main,), name="hypercorn-trio", daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        yield f"http://{HOST}:{port}"
    finally:
        stop.set()
        thread.join(15)


@pytest.mark.parametrize(
    "requests",
    [(HOLD + WHO,), (UPLOAD, WHO), (HOLD + WS,), (HOLD + BOOM,), (UPLOAD, BOOM)],
    ids=["pipelined", "after-a-large-body", "pipelined-websocket", "pipelined-500", "after-500"],
)
def test_hypercorn_trio_starts_each_request_in_its_own_context(
    requests: tuple[bytes, ...],
) -> None:
    """test_inherited_context's attack (a request started while another's background task
    runs) under hypercorn's trio worker: even outside the middleware, nothing of it."""
    last = requests[-1]
    label = "WHO" if last.endswith(WHO) else "WS" if last.endswith(WS) else "500"
    with _serve_hypercorn_trio(_app()) as base:
        seen = _report(_exchange(base, *requests))
        _wait_for(lambda: live_scopes() == 0)
    assert seen == (OWN if label == "WHO" else _none(label))


# -- what held: every value a request stored dies with its response, collector off ------


class _Value:
    """What a request stores: tracked by a weak reference, by (request id, where)."""

    def __init__(self, rid: str) -> None:
        self.rid = rid


_REFS: dict[tuple[str, str], "weakref.ref[_Value]"] = {}


def _track(rid: str, where: str) -> _Value:
    value = _Value(rid)
    _REFS[rid, where] = weakref.ref(value)
    return value


@request_memo
async def _slow_value(rid: str, where: str) -> _Value:
    await asyncio.sleep(0.02)
    return _track(rid, where)


@request_memo
async def _failing(rid: str) -> None:
    local = _track(rid, "the failing memo's local")
    await asyncio.sleep(0.02)
    raise ValueError(local)


@request_memo
def _sync_value(rid: str, where: str) -> _Value:
    return _track(rid, where)


class _Handled(Exception):
    pass


async def _single_flight_errors(request: Request) -> Response:
    rid = request.path_params["rid"]
    perrequest.set("value", _track(rid, "set"))
    await _slow_value(rid, "memo")
    await asyncio.gather(_failing(rid), _failing(rid), return_exceptions=True)
    with pytest.raises(ValueError):
        await _failing(rid)
    raise _Handled(rid)  # to a handler for its class: inside the middleware


async def _timeouts_and_shield(request: Request) -> Response:
    rid = request.path_params["rid"]
    perrequest.set("value", _track(rid, "set"))

    async def impatient() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.005):
                await _slow_value(rid, "timed")

    await asyncio.gather(impatient(), impatient(), _slow_value(rid, "timed"))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_slow_value(rid, "waited"), 0.005)
    await asyncio.shield(_slow_value(rid, "shielded"))
    return PlainTextResponse(rid)


async def _task_group(request: Request) -> Response:
    rid = request.path_params["rid"]
    perrequest.set("value", _track(rid, "set"))

    async def fails() -> None:
        await _slow_value(rid, "task group")
        raise _Handled(rid)

    with pytest.raises(BaseExceptionGroup):
        async with anyio.create_task_group() as group:
            group.start_soon(fails)
            group.start_soon(fails)
    return PlainTextResponse(rid)


async def _stream(request: Request) -> Response:
    rid = request.path_params["rid"]
    perrequest.set("value", _track(rid, "set"))

    async def chunks() -> AsyncIterator[str]:
        for n in range(3):
            yield (await _slow_value(rid, f"chunk {n}")).rid

    def sync_chunks() -> Iterator[str]:
        for n in range(3):
            yield _sync_value(rid, f"sync chunk {n}").rid

    body = sync_chunks() if request.query_params.get("kind") == "sync" else chunks()
    background = BackgroundTask(_slow_value, rid, "background")
    return StreamingResponse(body, background=background)


async def _threads(request: Request) -> Response:
    rid = request.path_params["rid"]
    perrequest.set("value", _track(rid, "set"))
    await run_in_threadpool(_sync_value, rid, "threadpool")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, bind_scope(functools.partial(_sync_value, rid, "bound")))
    return PlainTextResponse(rid)


async def _per_message(websocket: WebSocket) -> None:
    rid = websocket.path_params["rid"]
    await websocket.accept()
    perrequest.set("value", _track(rid, "set"))
    async for text in websocket.iter_text():

        @request_memo
        def helper(message: str) -> _Value:  # defined anew for each message
            return _track(rid, f"message {message}")

        await websocket.send_text(helper(text).rid)


def _track_dependency(rid: str) -> Iterator[_Value]:
    value = _track(rid, "sync dependency")
    perrequest.set("dependency", value)
    yield value
    assert perrequest.get("dependency") is value  # its cleanup: still in the request


async def _async_track_dependency(rid: str) -> AsyncIterator[None]:
    yield
    assert (await _slow_value(rid, "async dependency cleanup")).rid == rid


_fastapi = FastAPI()


@_fastapi.get("/fastapi/{rid}")
async def _fastapi_endpoint(
    rid: str,
    value: Annotated[_Value, Depends(_track_dependency)],
    _cleanup: Annotated[None, Depends(_async_track_dependency)],
    tasks: BackgroundTasks,
    stream: bool = False,
) -> Response:
    tasks.add_task(_slow_value, rid, "fastapi background")
    if stream:
        return StreamingResponse(iter([value.rid, (await _slow_value(rid, "streamed")).rid]))
    return PlainTextResponse(value.rid)


@_fastapi.get("/fastapi-sync/{rid}")
def _fastapi_sync_endpoint(
    rid: str, value: Annotated[_Value, Depends(_track_dependency)]
) -> PlainTextResponse:  # in the threadpool
    return PlainTextResponse(_sync_value(rid, "sync endpoint").rid + value.rid[:0])


_fastapi.add_middleware(perrequest.asgi.RequestScopeMiddleware)  # a third layer, mounted


async def _handled(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("handled", status_code=409)


def _leak_app() -> Starlette:
    inner = Starlette(
        routes=[Route("/{rid}", _timeouts_and_shield)],
        middleware=[Middleware(perrequest.asgi.RequestScopeMiddleware, max_entries=5)],
    )
    return Starlette(
        routes=[
            Route("/errors/{rid}", _single_flight_errors),
            Route("/timeouts/{rid}", _timeouts_and_shield),
            Route("/task-group/{rid}", _task_group),
            Route("/stream/{rid}", _stream),
            Route("/threads/{rid}", _threads),
            WebSocketRoute("/ws/{rid}", _per_message),
            Mount("/mounted", inner),
            Mount("/", _fastapi),
        ],
        middleware=[
            Middleware(perrequest.asgi.RequestScopeMiddleware, scope_types=("http", "websocket")),
            Middleware(perrequest.asgi.RequestScopeMiddleware),  # added twice
        ],
        exception_handlers={_Handled: _handled},
    )


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.parametrize("server", SERVERS)
def test_what_a_request_stored_dies_with_its_response_without_the_collector(server: str) -> None:
    paths = ["errors", "timeouts", "task-group", "stream", "stream?kind=sync", "threads"]
    paths += ["mounted", "fastapi", "fastapi?stream=1", "fastapi-sync"]
    gc.collect()
    gc.disable()
    try:
        with (
            SERVERS[server](_leak_app()) as base,
            httpx.Client(base_url=base, timeout=10) as client,
        ):
            for n, path in enumerate(paths):
                route, _, query = path.partition("?")
                rid = f"{server}-{n}"
                response = client.get(f"/{route}/{rid}" + (f"?{query}" if query else ""))
                assert response.status_code in (200, 409), (path, response.text)
                _wait_for(lambda: live_scopes() == 0)
                tracked = {where: ref for (owner, where), ref in _REFS.items() if owner == rid}
                assert tracked, path
                _wait_for(lambda: all(ref() is None for ref in tracked.values()))  # noqa: B023
            rid = f"{server}-ws"
            with websockets.sync.client.connect(f"{base.replace('http', 'ws')}/ws/{rid}") as ws:
                for text in "abc":
                    ws.send(text)
                    assert ws.recv() == rid
            _wait_for(lambda: live_scopes() == 0)
            _wait_for(lambda: all(ref() is None for (o, _), ref in _REFS.items() if o == rid))
    finally:
        gc.enable()


# -- what held: tasks and threads that outlive their request, a client gone early --------


_LATE: dict[str, dict[str, Any]] = {}
_KEEP: set["asyncio.Task[None]"] = set()


@request_memo(outside_scope="call")
def _owner_of(tag: str) -> Any:
    return perrequest.get("owner")


@request_memo(outside_scope="call")
async def _async_owner_of(tag: str) -> Any:
    await asyncio.sleep(0)
    return perrequest.get("owner")


def _what_is_seen(tag: str) -> dict[str, Any]:
    seen: dict[str, Any] = {"in scope": in_request_scope(), "get": perrequest.get("owner")}
    seen["memo"] = _owner_of(tag)
    try:
        perrequest.set("late", tag)
        seen["set"] = "stored"
    except perrequest.NoActiveScope:
        seen["set"] = "NoActiveScope"
    return seen


async def _outlive(request: Request) -> Response:
    rid = request.path_params["rid"]
    if request.query_params.get("made"):
        perrequest.set("owner", rid)  # the store is made before the task starts
    loop = asyncio.get_running_loop()
    bound: list[Callable[[], dict[str, Any]]] = []

    async def later() -> None:
        await asyncio.sleep(0.1)  # the response is complete by then
        seen = _what_is_seen("task")
        seen["async memo"] = await _async_owner_of("task")
        _LATE[f"{rid} task"] = seen
        _LATE[f"{rid} thread"] = await loop.run_in_executor(None, bound[0])

    task = asyncio.create_task(later())  # unmade: the task's context holds the scope's cell
    _KEEP.add(task)
    task.add_done_callback(_KEEP.discard)
    bound.append(bind_scope(functools.partial(_what_is_seen, "thread")))  # makes the store
    return PlainTextResponse(rid)


async def _read_body(request: Request) -> Response:
    perrequest.set("owner", "body")
    return PlainTextResponse(str(len(await request.body())))


_OUTSIDE = {"in scope": False, "get": None, "memo": None, "set": "NoActiveScope"}


@pytest.mark.parametrize("server", SERVERS)
def test_tasks_and_threads_that_outlive_their_request_see_no_store(server: str) -> None:
    app = Starlette(
        routes=[Route("/outlive/{rid}", _outlive), Route("/body", _read_body, methods=["POST"])],
        middleware=[Middleware(perrequest.asgi.RequestScopeMiddleware)],
    )
    with SERVERS[server](app, **({"log_level": "critical"} if server == "uvicorn" else {})) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            for made in ("", "1"):
                client.get(f"/outlive/{server}{made}", params={"made": made})
        host, port = base.removeprefix("http://").split(":")
        for partial_body in (b"", b"abc"):  # the client leaves before the body is complete
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
                sock.sendall(partial_body)
                time.sleep(0.05)
        _wait_for(lambda: live_scopes() == 0 and len(_LATE) >= 4 and not _KEEP)
    for made in ("", "1"):
        assert _LATE.pop(f"{server}{made} task") == {**_OUTSIDE, "async memo": None}
        assert _LATE.pop(f"{server}{made} thread") == _OUTSIDE


# -- what held: isolation under load, read back after awaits and in cleanup code -------


_WRONG: list[tuple[str, str, Any]] = []
_CHECKS = [0]


def _check(rid: str, where: str, *, or_none: bool = False) -> None:
    got = perrequest.get("rid")
    _CHECKS[0] += 1
    if got != rid and not (or_none and got is None):
        _WRONG.append((rid, where, got))


@request_memo
async def _whose(tag: str) -> Any:
    await asyncio.sleep(random.random() * 0.005)
    return perrequest.get("rid")


@request_memo
def _whose_sync(tag: str) -> Any:
    return perrequest.get("rid")


async def _rid_dependency(rid: str) -> AsyncIterator[str]:
    perrequest.set("rid", rid)
    yield rid
    await asyncio.sleep(0)
    _check(rid, "dependency cleanup")
    if await _whose("cleanup") != rid:
        _WRONG.append((rid, "memo in the dependency cleanup", await _whose("cleanup")))


def _sync_dependency(rid: str) -> None:
    _check(rid, "sync dependency")


_loaded = FastAPI()


@_loaded.get("/load/{rid}")
async def _load(
    rid: str,
    _rid: Annotated[str, Depends(_rid_dependency)],
    _sync: Annotated[None, Depends(_sync_dependency)],
    tasks: BackgroundTasks,
    stream: int = 0,
) -> Response:
    async def impatient() -> Any:
        try:
            async with asyncio.timeout(0.001):
                return await _whose("shared")
        except TimeoutError:
            return rid

    values = await asyncio.gather(
        impatient(), _whose("shared"), _whose("shared"), run_in_threadpool(_whose_sync, "shared")
    )
    _WRONG.extend((rid, "single flight", v) for v in values if v != rid)
    bound = bind_scope(lambda: (perrequest.get("rid"), _whose_sync("bound")))
    got = await asyncio.get_running_loop().run_in_executor(None, bound)
    if got != (rid, rid):
        _WRONG.append((rid, "bound thread", got))

    async def later() -> None:
        await asyncio.sleep(random.random() * 0.03)
        _check(rid, "outliving task", or_none=True)

    task = asyncio.create_task(later())
    _KEEP.add(task)
    task.add_done_callback(_KEEP.discard)

    async def background() -> None:
        await asyncio.sleep(0.001)
        _check(rid, "background task")

    tasks.add_task(background)
    if not stream:
        _check(rid, "endpoint")
        return PlainTextResponse(rid)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            for _ in range(stream):
                await asyncio.sleep(0.002)
                _check(rid, "chunk")
                yield rid.encode() * 100
        finally:
            _check(rid, "body cleanup", or_none=True)

    return StreamingResponse(chunks())


_loaded.add_middleware(perrequest.asgi.RequestScopeMiddleware)


async def _client(base: str, number: int, requests: int) -> None:
    host, port = base.removeprefix("http://").split(":")
    async with httpx.AsyncClient(base_url=base, timeout=20) as client:
        for n in range(requests):
            rid = f"client{number}-{n}"
            kind = n % 5
            if kind == 0:  # a stream the client leaves, closing or resetting
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(f"GET /load/{rid}?stream=50 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                await writer.drain()
                await reader.read(2000)
                if n % 2:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                writer.close()
                continue
            response = await client.get(f"/load/{rid}", params={"stream": 5 if kind == 1 else 0})
            assert response.status_code == 200 and rid in response.text


@pytest.mark.parametrize("server", SERVERS)
def test_under_load_every_read_is_the_requests_own_or_none(server: str) -> None:
    _WRONG.clear()
    _CHECKS[0] = 0
    options = {"log_level": "critical"} if server == "uvicorn" else {}
    with SERVERS[server](_loaded, **options) as base:

        async def clients() -> None:
            await asyncio.gather(*(_client(base, n, 15) for n in range(12)))

        asyncio.run(clients())
        _wait_for(lambda: live_scopes() == 0 and not _KEEP)
    assert _WRONG == []
    assert _CHECKS[0] > 12 * 15 * 4


def test_apps_made_by_decorators_around_a_function_of_request_are_still_apps() -> None:
    """Only a callable whose own parameters are ``(request)`` is refused (Django's
    get_response, a view): Werkzeug's ``@Request.application`` and an ASGI app made by a
    ``functools.wraps`` decorator around an endpoint keep their wrappers' signatures (a
    review of the check found both refused)."""
    from werkzeug.test import Client
    from werkzeug.wrappers import Request, Response

    @Request.application  # type: ignore[arg-type]
    def application(request: Request) -> Response:
        return Response(f"hi {request.args.get('name')} {perrequest.in_request_scope()}")

    wsgi = perrequest.wsgi.RequestScopeMiddleware(application)
    assert Client(wsgi).get("/?name=bob").get_data() == b"hi bob True"

    def asgi_endpoint(fn: Any) -> Any:
        @functools.wraps(fn)
        async def app(scope: Any, receive: Any, send: Any) -> None:
            body = (await fn(scope)).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})

        return app

    @asgi_endpoint
    async def homepage(request: Any) -> str:
        return f"home {perrequest.in_request_scope()}"

    asgi = perrequest.asgi.RequestScopeMiddleware(homepage)
    assert TestClient(asgi).get("/").content == b"home True"


def test_an_endpoint_given_for_an_app_is_told_to_wrap_the_application() -> None:
    async def homepage(request: Any) -> None:
        pass

    with pytest.raises(TypeError, match=r"as a view, an endpoint.*wrap the application itself"):
        perrequest.asgi.RequestScopeMiddleware(homepage)
