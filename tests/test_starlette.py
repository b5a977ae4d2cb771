"""Starlette with the ASGI middleware: what sees the store, under TestClient and a real server.

``Probe`` and ``build_app`` are shared with ``test_fastapi.py`` and
``test_asgi_servers.py``: every app built here answers the same routes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import httpx
import pytest
from servers import serve_uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import perrequest
from perrequest import ScopeStats, in_request_scope, request_memo
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

# on_close signature of the /boom route: one miss and this many hits.
BOOM_HITS = 3


class MyError(Exception):
    """Raised by /my-error: handled by a class-specific handler, inside user middleware."""


class Probe:
    """What one app saw: a per-request token by request id and place, and closed scopes.

    ``token()`` is memoized per request, so every place in one request must
    report the same value and ``computed`` must grow by one per request.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.computed = 0
        self.seen: defaultdict[str, dict[str, str | None]] = defaultdict(dict)
        self.closed: list[ScopeStats] = []
        self.ended: set[str] = set()

        @request_memo
        def token() -> str:
            with self.lock:
                self.computed += 1
            return uuid.uuid4().hex

        self.token = token

    def on_close(self, stats: ScopeStats) -> None:
        with self.lock:
            self.closed.append(stats)

    def record(self, rid: str, where: str) -> str | None:
        """The request's token as seen here, or None outside a scope."""
        value = self.token() if in_request_scope() else None
        with self.lock:
            self.seen[rid][where] = value
        return value


def make_stream(probe: Probe, rid: str, kind: str, chunks: int) -> Any:
    """A sync or async body recording the token at each chunk; forever if ``chunks < 0``."""

    def sync_body() -> Iterator[str]:
        try:
            i = 0
            while chunks < 0 or i < chunks:
                yield f"{probe.record(rid, f'chunk{i}')}\n"
                i += 1
                time.sleep(0.002 if chunks < 0 else 0)
        finally:
            probe.ended.add(rid)

    async def async_body() -> AsyncIterator[str]:
        try:
            i = 0
            while chunks < 0 or i < chunks:
                yield f"{probe.record(rid, f'chunk{i}')}\n"
                i += 1
                await asyncio.sleep(0.005 if chunks < 0 else 0)
        finally:
            probe.ended.add(rid)

    return sync_body() if kind == "sync" else async_body()


def background_tasks(probe: Probe, rid: str) -> BackgroundTasks:
    """One sync (threadpool) and one async background task, each recording the token."""

    async def async_task() -> None:
        await asyncio.sleep(0)
        probe.record(rid, "bg_async")

    tasks = BackgroundTasks()
    tasks.add_task(probe.record, rid, "bg_sync")
    tasks.add_task(async_task)
    return tasks


async def server_error(request: Request, exc: Exception) -> Response:
    """Runs in ServerErrorMiddleware, outside every user middleware."""
    return PlainTextResponse(f"in_scope={in_request_scope()}", status_code=500)


def build_app(
    probe: Probe | None = None, *, scope_middleware: bool = True, **options: Any
) -> tuple[Starlette, Probe]:
    """A Starlette app answering the shared routes, with the middleware added last (outermost)."""
    probe = probe or Probe()

    async def token(request: Request) -> Response:
        rid = request.path_params["rid"]
        return JSONResponse(
            {"endpoint": probe.record(rid, "endpoint")}, background=background_tasks(probe, rid)
        )

    def token_sync(request: Request) -> Response:
        rid = request.path_params["rid"]
        return JSONResponse({"endpoint": probe.record(rid, "endpoint")})

    async def stream(request: Request) -> Response:
        rid = request.path_params["rid"]
        probe.record(rid, "endpoint")
        kind = request.query_params.get("kind", "async")
        chunks = int(request.query_params.get("chunks", "3"))
        return StreamingResponse(
            make_stream(probe, rid, kind, chunks), background=background_tasks(probe, rid)
        )

    async def boom(request: Request) -> Response:
        for _ in range(BOOM_HITS + 1):
            perrequest.get_or_set("boom", object)
        raise RuntimeError("boom")

    async def my_error(request: Request) -> Response:
        probe.record(request.path_params["rid"], "endpoint")
        raise MyError(request.path_params["rid"])

    async def my_error_handler(request: Request, exc: Exception) -> Response:
        return JSONResponse({"handler": probe.record(str(exc), "handler")}, status_code=409)

    async def iso(request: Request) -> Response:
        rid = request.path_params["rid"]
        perrequest.set("rid", rid)
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return JSONResponse(
            {"rid": perrequest.get("rid"), "token": probe.token(), "live": live_scopes()}
        )

    app = Starlette(
        routes=[
            Route("/token/{rid}", token),
            Route("/token-sync/{rid}", token_sync),
            Route("/stream/{rid}", stream),
            Route("/boom", boom),
            Route("/my-error/{rid}", my_error),
            Route("/iso/{rid}", iso),
        ],
        exception_handlers={Exception: server_error, MyError: my_error_handler},
    )
    if scope_middleware:
        options.setdefault("on_close", probe.on_close)
        app.add_middleware(RequestScopeMiddleware, **options)
    return app, probe


@pytest.fixture
def app_probe() -> tuple[Starlette, Probe]:
    return build_app()


def _tokens(probe: Probe, rid: str) -> set[str | None]:
    return set(probe.seen[rid].values())


def test_endpoint_and_background_tasks_share_one_store(app_probe: tuple[Starlette, Probe]) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        body = client.get("/token/a").json()
    assert set(probe.seen["a"]) == {"endpoint", "bg_sync", "bg_async"}
    assert _tokens(probe, "a") == {body["endpoint"]}
    assert probe.computed == 1
    assert len(probe.closed) == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_streaming_body_sees_the_request_store(
    app_probe: tuple[Starlette, Probe], kind: str
) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        lines = client.get(f"/stream/s?kind={kind}").text.split()
    assert set(probe.seen["s"]) == {"endpoint", "chunk0", "chunk1", "chunk2", "bg_sync", "bg_async"}
    assert _tokens(probe, "s") == set(lines) and len(set(lines)) == 1
    assert probe.computed == 1
    assert "s" in probe.ended


def test_no_sharing_across_requests_on_one_connection(app_probe: tuple[Starlette, Probe]) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        tokens = [client.get(f"/token-sync/{i}").json()["endpoint"] for i in range(5)]
        tokens += [client.get(f"/token/{i}").json()["endpoint"] for i in range(5, 10)]
    assert None not in tokens
    assert len(set(tokens)) == 10
    assert probe.computed == 10
    assert len(probe.closed) == 10


def test_uncaught_error_closes_the_store_and_the_500_handler_sees_none(
    app_probe: tuple[Starlette, Probe],
) -> None:
    app, probe = app_probe
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    # Trap: ServerErrorMiddleware is outside user middleware; the store is closed by then.
    assert response.text == "in_scope=False"
    assert [(s.misses, s.hits) for s in probe.closed] == [(1, BOOM_HITS)]


def test_uncaught_error_reaches_the_caller_after_the_store_closed(
    app_probe: tuple[Starlette, Probe],
) -> None:
    app, probe = app_probe
    with TestClient(app) as client, pytest.raises(RuntimeError, match="boom"):
        client.get("/boom")
    assert live_scopes() == 0
    assert len(probe.closed) == 1


def test_class_specific_exception_handler_sees_the_request_store(
    app_probe: tuple[Starlette, Probe],
) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        response = client.get("/my-error/e")
    assert response.status_code == 409
    # ExceptionMiddleware is inside user middleware: same store as the endpoint.
    assert response.json()["handler"] == probe.seen["e"]["endpoint"] is not None
    assert probe.computed == 1
    assert len(probe.closed) == 1


class _Recording(BaseHTTPMiddleware):
    """A BaseHTTPMiddleware noting what its dispatch sees before and after call_next."""

    def __init__(self, app: Any, probe: Probe) -> None:
        super().__init__(app)
        self.probe = probe

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        rid = request.url.path.rsplit("/", 1)[-1]
        self.probe.record(rid, "dispatch_before")
        response = await call_next(request)
        self.probe.record(rid, "dispatch_after")
        return response


def test_base_http_middleware_inside_ours_sees_the_store() -> None:
    """Ours outermost (added last): the endpoint and the BaseHTTPMiddleware all share it."""
    probe = Probe()
    app, _ = build_app(probe, scope_middleware=False)
    app.add_middleware(_Recording, probe=probe)
    app.add_middleware(RequestScopeMiddleware, on_close=probe.on_close)
    with TestClient(app) as client:
        body = client.get("/stream/b?kind=async").text.split()
    assert set(probe.seen["b"]) >= {"dispatch_before", "dispatch_after", "endpoint", "bg_async"}
    assert _tokens(probe, "b") == set(body) and len(set(body)) == 1
    assert probe.computed == 1
    assert len(probe.closed) == 1


def test_base_http_middleware_outside_ours_sees_no_store() -> None:
    """The trap: a BaseHTTPMiddleware outside ours cannot see the store; the app still can."""
    probe = Probe()
    app, _ = build_app(probe, scope_middleware=False)
    app.add_middleware(RequestScopeMiddleware, on_close=probe.on_close)
    app.add_middleware(_Recording, probe=probe)
    with TestClient(app) as client:
        body = client.get("/stream/c?kind=sync").text.split()
    assert probe.seen["c"]["dispatch_before"] is None
    assert probe.seen["c"]["dispatch_after"] is None
    inner = {k: v for k, v in probe.seen["c"].items() if not k.startswith("dispatch")}
    assert set(inner.values()) == set(body) and len(set(body)) == 1 and None not in body
    assert probe.computed == 1
    assert len(probe.closed) == 1


def test_endpoint_writes_reach_an_enclosing_base_http_middleware_through_the_store() -> None:
    """BaseHTTPMiddleware runs the app in a copied context, so a ContextVar the endpoint sets
    is lost on the way out; the store is one shared object, so entries written to it are not."""
    marker: ContextVar[str | None] = ContextVar("marker", default=None)
    seen: dict[str, object] = {}

    class Reader(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            response = await call_next(request)
            seen["contextvar"] = marker.get()
            seen["store"] = perrequest.get("user")
            return response

    async def endpoint(request: Request) -> Response:
        marker.set("set by the endpoint")
        perrequest.set("user", "alice")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(Reader)
    app.add_middleware(RequestScopeMiddleware)
    with TestClient(app) as client:
        assert client.get("/").text == "ok"
    assert seen == {"contextvar": None, "store": "alice"}


def test_lifespan_gets_no_store() -> None:
    seen: list[bool] = []

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        seen.append(in_request_scope())
        yield
        seen.append(in_request_scope())

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse(str(in_request_scope()))

    app = Starlette(routes=[Route("/", endpoint)], lifespan=asynccontextmanager(lifespan))
    app.add_middleware(RequestScopeMiddleware)
    with TestClient(app) as client:
        assert live_scopes() == 0
        assert client.get("/").text == "True"
    assert seen == [False, False]


def test_real_server_shares_within_and_not_across_requests() -> None:
    app, probe = build_app()
    with serve_uvicorn(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        first = client.get("/stream/r1?kind=sync").text.split()
        second = client.get("/token/r2").json()["endpoint"]
    wait_for(lambda: {"bg_sync", "bg_async"} <= set(probe.seen["r2"]))
    assert len(set(first)) == 1 and _tokens(probe, "r1") == set(first)
    assert _tokens(probe, "r2") == {second}
    assert second not in first
    assert probe.computed == 2


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll until ``condition()`` holds: a server finishes background work after the response."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_mounted_sub_app_with_its_own_middleware_shares_the_outer_scope() -> None:
    """Registered on the app and on a mounted sub-app: one store per request, not two."""
    from starlette.routing import Mount

    computed: list[str] = []

    @request_memo
    def user(name: str) -> str:
        computed.append(name)
        return name.upper()

    class Prime:
        """Pure ASGI, inside the outer middleware: computes the lookup first."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                user("alice")
            await self.app(scope, receive, send)

    async def inner(request: Request) -> Response:
        return PlainTextResponse(user("alice"))

    sub = Starlette(routes=[Route("/inner", inner)])
    sub.add_middleware(RequestScopeMiddleware)
    closed: list[ScopeStats] = []
    app = Starlette(routes=[Mount("/sub", app=sub)])
    app.add_middleware(Prime)
    app.add_middleware(RequestScopeMiddleware, on_close=closed.append)
    with TestClient(app) as client:
        assert client.get("/sub/inner").text == "ALICE"
        assert client.get("/sub/inner").text == "ALICE"
    assert computed == ["alice", "alice"]  # once per request: the sub-app reused the store
    assert [s.hits for s in closed] == [1, 1] and live_scopes() == 0


def test_a_misspelt_option_under_real_uvicorn_fails_loudly_not_silently() -> None:
    """Starlette makes its middleware when the first ASGI event arrives. With
    ``--lifespan on`` a typo stops the start-up with our TypeError."""
    import uvicorn

    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(RequestScopeMiddleware, max_entires=5)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="critical")
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:  # uvicorn exits when the lifespan start-up fails
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive() and not server.started
    assert errors and isinstance(errors[0], SystemExit)
