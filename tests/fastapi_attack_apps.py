"""FastAPI/Starlette features attacked by tests/test_attack_fastapi.py, served for real.

Every request's id is the last segment of its path; ``_Tag`` (inside perrequest's
middleware) stores it as ``"rid"`` first thing. Each place in the app records what it
sees (``_seen``): the request's own id, another's (a leak), or ``None`` (no scope).
``/_report`` is answered outside every middleware: what was recorded, how many scopes
are open in this process, and whether the variable is left set where the server runs
the app. Runs under uvicorn, hypercorn (asyncio and trio) and granian, as a subprocess.
"""

# No `from __future__ import annotations`: FastAPI must resolve Annotated[..., Depends(...)].
import asyncio
import gc
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.websockets import WebSocketDisconnect

import perrequest
import perrequest.asgi
from perrequest import bind_scope, in_request_scope, request_memo
from perrequest._active import _current
from perrequest.scope import passed_through
from perrequest.testing import live_scopes

_lock = threading.Lock()
SEEN: dict[str, Any] = {}  # "rid where" -> what that place saw
CALLS: dict[str, int] = {}  # rid -> how many times _lookup computed for it
LEFT_SET: list[str] = []  # where the variable was found set outside any request


def _seen(rid: str, where: str) -> None:
    value = perrequest.get("rid") if in_request_scope() else None
    with _lock:
        SEEN[f"{rid} {where}"] = value


@request_memo(outside_scope="call")
def _lookup(rid: str) -> str:
    """Counts its computations: once per request however many places ask."""
    with _lock:
        CALLS[rid] = CALLS.get(rid, 0) + 1
    return perrequest.get("rid") if in_request_scope() else "outside"


def _sleep(seconds: float) -> Any:
    return anyio.sleep(seconds)  # asyncio or trio, whichever runs


def _is_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


# -- lifespan: no scope; a memo there is called uncached -----------------------------------


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    _seen("lifespan", "startup")
    _lookup("lifespan")
    _lookup("lifespan")  # outside any scope: computed twice, never cached
    with _lock:
        SEEN["lifespan store"] = _current.get() is not None
    yield
    _seen("lifespan", "shutdown")


api = FastAPI(lifespan=_lifespan)


# -- dependencies with yield, Depends caching, background tasks ----------------------------


async def _async_dep(rid: str) -> AsyncIterator[str]:
    _seen(rid, "async dep before")
    _lookup(rid)
    try:
        yield rid
    finally:
        await _sleep(0.01)
        _seen(rid, "async dep after")
        _lookup(rid)


def _sync_dep(rid: str) -> Iterator[str]:  # in the thread pool, its teardown too
    _seen(rid, "sync dep before")
    try:
        yield rid
    finally:
        _seen(rid, "sync dep after")
        _lookup(rid)


async def _function_dep(rid: str) -> AsyncIterator[str]:
    yield rid
    _seen(rid, "function dep after")  # exits before the response is sent


def _cached_dep(rid: str) -> str:
    with _lock:
        CALLS[f"{rid} cached dep"] = CALLS.get(f"{rid} cached dep", 0) + 1
    return _lookup(rid)


async def _background(rid: str, where: str, delay: float = 0.0) -> None:
    await _sleep(delay)
    _seen(rid, where)
    _lookup(rid)


def _sync_background(rid: str) -> None:
    _seen(rid, "sync background")
    _lookup(rid)


class _Boom(Exception):
    pass


def _raising_background(rid: str) -> None:
    _seen(rid, "raising background")
    raise _Boom(rid)


@api.get("/dep/{rid}")
async def _dep(
    rid: str,
    a: Annotated[str, Depends(_async_dep)],
    s: Annotated[str, Depends(_sync_dep)],
    f: Annotated[str, Depends(_function_dep, scope="function")],
    c1: Annotated[str, Depends(_cached_dep)],
    c2: Annotated[str, Depends(_cached_dep)],
    tasks: BackgroundTasks,
    mode: str = "",
) -> Response:
    _seen(rid, "endpoint")
    _lookup(rid)
    tasks.add_task(_background, rid, "background")
    tasks.add_task(_sync_background, rid)
    if mode == "raise-background":
        tasks.add_task(_raising_background, rid)
    if mode == "long-background":
        tasks.add_task(_background, rid, "long background", 0.5)
    if mode == "stream":

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(400):
                await _sleep(0.005)
                _seen(rid, "chunk")
                yield rid.encode() * 100
            _seen(rid, "stream end")

        return StreamingResponse(chunks())
    return PlainTextResponse(f"{a} {s} {f} {c1} {c2}")


# -- streaming bodies with a BackgroundTask --------------------------------------------------


@api.get("/stream/{rid}")
async def _stream(rid: str, kind: str = "async", n: int = 3) -> StreamingResponse:
    async def achunks() -> AsyncIterator[str]:
        for i in range(n):
            await _sleep(0.002)
            _seen(rid, f"async chunk {i}")
            yield _lookup(rid)

    def schunks() -> Iterator[str]:
        for i in range(n):
            time.sleep(0.002)
            _seen(rid, f"sync chunk {i}")
            yield _lookup(rid)

    body = achunks() if kind == "async" else schunks()
    return StreamingResponse(body, background=BackgroundTask(_background, rid, "stream bg"))


# -- exception handlers -----------------------------------------------------------------------


class _Teapot(Exception):
    def __init__(self, rid: str) -> None:
        self.rid = rid


@api.exception_handler(_Teapot)
async def _teapot(request: Request, exc: _Teapot) -> Response:
    _seen(exc.rid, "class handler")
    return PlainTextResponse(_lookup(exc.rid), status_code=418)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    rid = request.url.path.rsplit("/", 1)[-1]
    _seen(rid, "http handler")
    return PlainTextResponse(str(perrequest.get("rid")), status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    rid = request.url.path.rsplit("/", 1)[-1]
    _seen(rid, "validation handler")
    return PlainTextResponse(str(perrequest.get("rid")), status_code=422)


@api.get("/teapot/{rid}")
async def _raise_teapot(rid: str) -> None:
    _lookup(rid)
    raise _Teapot(rid)


@api.get("/missing/{rid}")
async def _raise_404(rid: str) -> None:
    raise HTTPException(404)


@api.get("/number/{rid}")
async def _number(rid: str, n: int) -> str:
    return rid


# -- task groups, threads, tasks that outlive the request ----------------------------------


def _in_thread(rid: str, where: str) -> str:
    _seen(rid, where)
    return _lookup(rid)


@api.get("/concurrency/{rid}")
async def _concurrency(rid: str) -> str:
    async with anyio.create_task_group() as group:
        group.start_soon(_background, rid, "task group")
    await anyio.to_thread.run_sync(_in_thread, rid, "anyio thread")
    await run_in_threadpool(bind_scope(_in_thread), rid, "bound threadpool")
    store = perrequest.current_store()

    async def later() -> None:
        await _sleep(0.2)  # the response is complete by then
        deadline = time.monotonic() + 10  # and its scope closed (later on a loaded machine)
        while not store.closed and time.monotonic() < deadline:
            await _sleep(0.01)
        _seen(rid, "outliving task")

    if _is_asyncio():
        task = asyncio.get_running_loop().create_task(later())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)
    return rid


_TASKS: set["asyncio.Task[None]"] = set()


# -- websockets --------------------------------------------------------------------------------


@api.websocket("/ws/{rid}")
async def _ws(websocket: WebSocket, rid: str) -> None:
    await websocket.accept()
    _seen(rid, "ws open")
    try:
        while True:
            text = await websocket.receive_text()

            @request_memo
            def helper(message: str) -> str:  # a new function per message
                return message

            helper(text)
            _lookup(rid)
            store = perrequest.current_store() if in_request_scope() else None
            size = -1 if store is None else len(store)
            if text == "slow":
                await _sleep(0.3)  # the client leaves meanwhile
            await websocket.send_text(f"{perrequest.get('rid')} {size}")
    except WebSocketDisconnect:
        _seen(rid, "ws disconnect")


# -- middleware order ----------------------------------------------------------------------------


class _Tag:
    """Pure ASGI, inside perrequest's: stores the request's id first thing."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and in_request_scope():
            perrequest.set("rid", scope["path"].rsplit("/", 1)[-1])
        await self.app(scope, receive, send)


async def _dispatch_inside(request: Request, call_next: Any) -> Response:
    rid = request.url.path.rsplit("/", 1)[-1]
    _seen(rid, "base inside before")
    response = await call_next(request)
    _seen(rid, "base inside after")
    return response  # type: ignore[no-any-return]


async def _dispatch_outside(request: Request, call_next: Any) -> Response:
    rid = request.url.path.rsplit("/", 1)[-1]
    _seen(rid, "base outside")
    return await call_next(request)  # type: ignore[no-any-return]


# add_middleware: the last added is outermost.
api.add_middleware(BaseHTTPMiddleware, dispatch=_dispatch_inside)
api.add_middleware(_Tag)
api.add_middleware(GZipMiddleware, minimum_size=10)
api.add_middleware(perrequest.asgi.RequestScopeMiddleware, scope_types=("http", "websocket"))
api.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"])
api.add_middleware(BaseHTTPMiddleware, dispatch=_dispatch_outside)


# -- mounted: a Starlette sub-app with its own middleware, a WSGI app ----------------------------


sub = FastAPI()


@sub.get("/{rid}")
async def _sub(rid: str) -> str:
    _seen(rid, "sub app")
    return _lookup(rid)


sub.add_middleware(perrequest.asgi.RequestScopeMiddleware, max_entries=3)


def _wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    rid = environ["PATH_INFO"].rsplit("/", 1)[-1]
    _seen(rid, "wsgi app")
    start_response("200 OK", [("content-type", "text/plain")])
    yield _lookup(rid).encode()
    _seen(rid, "wsgi body")


def _mount_wsgi() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StarletteDeprecationWarning: a2wsgi is not installed
        from starlette.middleware.wsgi import WSGIMiddleware

    api.mount("/wsgi", WSGIMiddleware(_wsgi))  # type: ignore[arg-type]


api.mount("/sub", sub)
_mount_wsgi()


# -- under load: every place checks it sees its own request's id -------------------------------

WRONG: list[str] = []
CHECKS = [0]


def _check(rid: str, where: str, *, or_none: bool = False) -> None:
    got = perrequest.get("rid")
    with _lock:
        CHECKS[0] += 1
        if got != rid and not (or_none and got is None):
            WRONG.append(f"{rid} {where}: {got!r}")


def _check_in_thread(rid: str) -> str:
    _check(rid, "thread")
    return _lookup(rid)


async def _load_dep(rid: str) -> AsyncIterator[str]:
    _check(rid, "dependency")
    try:
        yield rid
    finally:
        await _sleep(0.001)
        _check(rid, "dependency teardown")  # after a disconnect too: still in the request


async def _load_background(rid: str) -> None:
    await _sleep(0.001)
    _check(rid, "background")


@api.api_route("/load/{rid}", methods=["GET", "POST"])
async def _load(
    rid: str,
    request: Request,
    d: Annotated[str, Depends(_load_dep)],
    tasks: BackgroundTasks,
    kind: str = "plain",
    collect: bool = False,
) -> Response:
    tasks.add_task(_load_background, rid)
    if collect:  # abandoned bodies' cleanups run here, in this request's middle
        gc.collect()
    if kind == "upload":
        body = await request.body()
        _check(rid, "after the upload")
        return PlainTextResponse(f"{rid} {len(body)}")
    values = [await _alookup(rid), await anyio.to_thread.run_sync(_check_in_thread, rid)]
    if kind == "slow":
        await _sleep(0.5)  # the client has given up by then
    _check(rid, kind)
    values.append(perrequest.get("rid"))
    if kind not in ("stream", "sync-stream"):
        return PlainTextResponse(" ".join(values))

    async def chunks() -> AsyncIterator[str]:
        try:
            for _ in range(200):
                await _sleep(0.002)
                _check(rid, "chunk")
                yield " ".join(values) + " "
        finally:  # after a disconnect: its own store or none, never another's
            _check(rid, "body cleanup", or_none=True)

    def sync_chunks() -> Iterator[str]:
        try:
            for _ in range(200):
                time.sleep(0.002)
                _check(rid, "sync chunk")
                yield " ".join(values) + " "
        finally:  # abandoned: run by the collector, maybe in another request's middle
            _check(rid, "sync body cleanup", or_none=True)

    return StreamingResponse(chunks() if kind == "stream" else sync_chunks())


# -- the whole app, and /_report outside every middleware -----------------------------------------


async def app(scope: Any, receive: Any, send: Any) -> None:
    if _current.get() is not None or passed_through.get() is not None:  # never set here
        LEFT_SET.append(f"{scope['type']} {scope.get('path')}")
    if scope["type"] == "http" and scope["path"] == "/_report":
        with _lock:
            body = {"seen": SEEN, "calls": CALLS, "live": live_scopes(), "left": LEFT_SET}
            body.update(wrong=WRONG, checks=CHECKS[0])
            body = json.loads(json.dumps(body))
        await JSONResponse(body)(scope, receive, send)
        return
    await api(scope, receive, send)


# -- probes added later ----------------------------------------------------------------------

import anyio.from_thread  # noqa: E402
from fastapi.sse import EventSourceResponse  # noqa: E402


@request_memo
async def _alookup(rid: str) -> str:
    await _sleep(0)
    return _lookup(rid)


@api.get("/sse/{rid}", response_class=EventSourceResponse)
async def _sse(rid: str, n: int = 3) -> AsyncIterator[str]:
    for i in range(n):
        await _sleep(0.002)
        _seen(rid, f"sse {i}")
        yield _lookup(rid)


@api.get("/sse-sync/{rid}", response_class=EventSourceResponse)
def _sse_sync(rid: str, n: int = 3) -> Iterator[str]:
    for i in range(n):
        _seen(rid, f"sse sync {i}")
        yield _lookup(rid)


def _from_thread_dep(rid: str) -> str:  # a sync dependency: in the thread pool
    return anyio.from_thread.run(_alookup, rid)


@api.get("/from-thread/{rid}")
async def _from_thread(rid: str, v: Annotated[str, Depends(_from_thread_dep)]) -> str:
    return v


async def _ws_dep(rid: str) -> AsyncIterator[str]:
    yield rid
    _seen(rid, "ws dep after")


@api.websocket("/wsdep/{rid}")
async def _wsdep(websocket: WebSocket, rid: str, d: Annotated[str, Depends(_ws_dep)]) -> None:
    await websocket.accept()
    await websocket.send_text(str(perrequest.get("rid")))
    try:
        await websocket.receive_text()
    except WebSocketDisconnect:
        _seen(rid, "wsdep disconnect")


# -- a small bound for a long websocket; a websocket left out of scope_types ----------------------

small = FastAPI()
small.add_api_websocket_route("/ws/{rid}", _ws)
small.add_middleware(_Tag)
small.add_middleware(
    perrequest.asgi.RequestScopeMiddleware, max_entries=16, scope_types=("http", "websocket")
)


def _errors() -> list[str]:
    """What the errors say where no scope is active."""
    messages = []
    for call in (lambda: perrequest.set("rid", "x"), lambda: _raises("x")):
        try:
            call()
        except perrequest.NoActiveScope as exc:
            messages.append(str(exc))
    return messages


@request_memo(outside_scope="raise")
def _raises(rid: str) -> str:
    return rid


@asynccontextmanager
async def _lifespan_errors(app: FastAPI) -> AsyncIterator[dict[str, list[str]]]:
    yield {"startup_errors": _errors()}


http_only = FastAPI(lifespan=_lifespan_errors)


@http_only.websocket("/ws")
async def _ws_outside(websocket: WebSocket) -> None:
    """Without "websocket" in scope_types: what the errors say here, and at start-up."""
    await websocket.accept()
    await websocket.send_json([*_errors(), *websocket.state.startup_errors])
    await websocket.close()


http_only.add_middleware(perrequest.asgi.RequestScopeMiddleware)
