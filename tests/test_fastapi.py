"""FastAPI with the ASGI middleware: dependencies (sync and async), endpoints, streaming
bodies and background tasks of one request share one store; requests never share.

``build_fastapi_app`` answers the same routes as ``test_starlette.build_app``, so
``test_asgi_servers.py`` runs both under real servers.
"""

# No `from __future__ import annotations`: FastAPI must resolve Annotated[..., Depends(local)].
import asyncio
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from servers import serve_hypercorn
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.testclient import TestClient
from test_starlette import BOOM_HITS, MyError, Probe, make_stream, server_error, wait_for

import perrequest
from perrequest import in_request_scope
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes


def build_fastapi_app(
    probe: Probe | None = None, *, scope_middleware: bool = True, **options: Any
) -> tuple[FastAPI, Probe]:
    """A FastAPI app answering the shared routes; every route also runs the dependencies."""
    probe = probe or Probe()

    def sync_dep(rid: str) -> str | None:  # a plain def: FastAPI runs it in the threadpool
        return probe.record(rid, "sync_dep")

    async def async_dep(rid: str) -> str | None:
        return probe.record(rid, "async_dep")

    def yield_dep(rid: str) -> Iterator[None]:
        probe.record(rid, "yield_dep_enter")
        yield
        probe.record(rid, "yield_dep_exit")

    deps = [Depends(sync_dep), Depends(async_dep), Depends(yield_dep)]

    def add_background(tasks: BackgroundTasks, rid: str) -> None:
        async def async_task() -> None:
            probe.record(rid, "bg_async")

        tasks.add_task(probe.record, rid, "bg_sync")
        tasks.add_task(async_task)

    app = FastAPI(exception_handlers={Exception: server_error, MyError: _my_error_handler(probe)})

    @app.get("/token/{rid}", dependencies=deps)
    async def token(rid: str, tasks: BackgroundTasks) -> dict[str, str | None]:
        add_background(tasks, rid)
        return {"endpoint": probe.record(rid, "endpoint")}

    @app.get("/token-sync/{rid}", dependencies=deps)
    def token_sync(
        rid: str, sync_value: Annotated[str | None, Depends(sync_dep)]
    ) -> dict[str, str | None]:
        return {"endpoint": probe.record(rid, "endpoint"), "sync_dep": sync_value}

    @app.get("/stream/{rid}", dependencies=deps)
    async def stream(
        rid: str, tasks: BackgroundTasks, kind: str = "async", chunks: int = 3
    ) -> StreamingResponse:
        probe.record(rid, "endpoint")
        add_background(tasks, rid)
        return StreamingResponse(make_stream(probe, rid, kind, chunks))

    @app.get("/boom")
    async def boom() -> None:
        for _ in range(BOOM_HITS + 1):
            perrequest.get_or_set("boom", object)
        raise RuntimeError("boom")

    @app.get("/my-error/{rid}", dependencies=deps)
    async def my_error(rid: str) -> None:
        probe.record(rid, "endpoint")
        raise MyError(rid)

    @app.get("/iso/{rid}")
    async def iso(rid: str) -> dict[str, Any]:
        perrequest.set("rid", rid)
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return {"rid": perrequest.get("rid"), "token": probe.token(), "live": live_scopes()}

    if scope_middleware:
        options.setdefault("on_close", probe.on_close)
        app.add_middleware(RequestScopeMiddleware, **options)
    return app, probe


def _my_error_handler(probe: Probe) -> Any:
    async def handler(request: Request, exc: Exception) -> Response:
        return JSONResponse({"handler": probe.record(str(exc), "handler")}, status_code=409)

    return handler


class _Recording(BaseHTTPMiddleware):
    """Notes whether its dispatch sees a store."""

    def __init__(self, app: Any, seen: list[bool]) -> None:
        super().__init__(app)
        self.seen = seen

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        self.seen.append(in_request_scope())
        return await call_next(request)


ALL_PLACES = {
    "sync_dep",
    "async_dep",
    "yield_dep_enter",
    "yield_dep_exit",
    "endpoint",
    "bg_sync",
    "bg_async",
}


@pytest.fixture
def app_probe() -> tuple[FastAPI, Probe]:
    return build_fastapi_app()


def test_dependencies_endpoint_and_background_tasks_share_one_store(
    app_probe: tuple[FastAPI, Probe],
) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        body = client.get("/token/a").json()
    assert set(probe.seen["a"]) == ALL_PLACES
    assert set(probe.seen["a"].values()) == {body["endpoint"]}
    assert body["endpoint"] is not None
    assert probe.computed == 1
    assert len(probe.closed) == 1


def test_sync_endpoint_and_sync_dependency_share_one_store(
    app_probe: tuple[FastAPI, Probe],
) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        body = client.get("/token-sync/t").json()
    assert body["sync_dep"] == body["endpoint"] is not None
    assert set(probe.seen["t"].values()) == {body["endpoint"]}
    assert probe.computed == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_streaming_body_shares_the_dependencies_store(
    app_probe: tuple[FastAPI, Probe], kind: str
) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        lines = client.get(f"/stream/s?kind={kind}").text.split()
    assert set(probe.seen["s"]) == ALL_PLACES | {"chunk0", "chunk1", "chunk2"}
    assert set(probe.seen["s"].values()) == set(lines) and len(set(lines)) == 1
    assert None not in lines
    assert probe.computed == 1


def test_requests_never_share(app_probe: tuple[FastAPI, Probe]) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        tokens = [client.get(f"/token/{i}").json()["endpoint"] for i in range(8)]
    assert len(set(tokens)) == 8
    assert probe.computed == 8
    for i, token in enumerate(tokens):
        assert set(probe.seen[str(i)].values()) == {token}


def test_uncaught_error_closes_the_store_and_runs_on_close(
    app_probe: tuple[FastAPI, Probe],
) -> None:
    app, probe = app_probe
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.text == "in_scope=False"
    assert [(s.misses, s.hits) for s in probe.closed] == [(1, BOOM_HITS)]
    assert live_scopes() == 0


def test_class_specific_exception_handler_sees_the_dependencies_store(
    app_probe: tuple[FastAPI, Probe],
) -> None:
    app, probe = app_probe
    with TestClient(app) as client:
        response = client.get("/my-error/e")
    assert response.status_code == 409
    handler_token = response.json()["handler"]
    assert handler_token is not None
    assert {probe.seen["e"][k] for k in ("sync_dep", "async_dep", "endpoint")} == {handler_token}
    assert probe.computed == 1


def test_base_http_middleware_either_order() -> None:
    """Both orders work for the app; only a BaseHTTPMiddleware outside ours misses the store."""
    results: dict[str, list[bool]] = {}
    for order in ("ours_outside", "ours_inside"):
        probe = Probe()
        app, _ = build_fastapi_app(probe, scope_middleware=False)
        seen: list[bool] = []

        stack: list[Any] = [
            (_Recording, {"seen": seen}),
            (RequestScopeMiddleware, {"on_close": probe.on_close}),
        ]
        for cls, kwargs in stack if order == "ours_outside" else reversed(stack):
            app.add_middleware(cls, **kwargs)
        with TestClient(app) as client:
            body = client.get("/token/x").json()
        assert set(probe.seen["x"]) == ALL_PLACES
        assert set(probe.seen["x"].values()) == {body["endpoint"]} != {None}
        assert len(probe.closed) == 1
        results[order] = seen
    assert results == {"ours_outside": [True], "ours_inside": [False]}


async def test_real_hypercorn_dependencies_and_background_tasks() -> None:
    app, probe = build_fastapi_app()
    with serve_hypercorn(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            first = (await client.get("/token/h1")).json()["endpoint"]
            lines = (await client.get("/stream/h2?kind=sync")).text.split()
        wait_for(lambda: {"bg_sync", "bg_async"} <= set(probe.seen["h2"]))
    assert set(probe.seen["h1"].values()) == {first}
    assert set(probe.seen["h2"].values()) == set(lines) and len(set(lines)) == 1
    assert first not in lines
    assert probe.computed == 2


def test_a_scope_opened_in_a_sync_generator_or_sync_yield_dependency_stays_in_that_step() -> None:
    """docs/frameworks/fastapi.md: Starlette runs each step of a sync streaming generator, and
    FastAPI enters a sync ``yield`` dependency, in a worker thread with a fresh copy of the
    request's context, so a ``request_scope()`` opened there covers that step only (a
    newcomer's audit); opened in ``async def`` code, it covers what follows."""
    app = FastAPI()

    def sync_scoped() -> Iterator[None]:
        with perrequest.request_scope():
            yield

    async def async_scoped() -> Any:
        async with perrequest.request_scope():
            yield

    @app.get("/dep/sync", dependencies=[Depends(sync_scoped)])
    def under_sync() -> bool:
        return in_request_scope()

    @app.get("/dep/async", dependencies=[Depends(async_scoped)])
    def under_async() -> bool:
        return in_request_scope()

    def sync_rows() -> Iterator[str]:
        with perrequest.request_scope() as own:
            for _ in range(3):
                yield f"{perrequest.current_store() is own}:{perrequest.get('set by')} "

    async def async_rows() -> Any:
        async with perrequest.request_scope() as own:
            for _ in range(3):
                yield f"{perrequest.current_store() is own} "

    @app.get("/stream/{kind}")
    def stream(kind: str) -> StreamingResponse:
        perrequest.set("set by", "request")
        return StreamingResponse(sync_rows() if kind == "sync" else async_rows())

    app.add_middleware(RequestScopeMiddleware)
    with TestClient(app) as client:
        # After the first step, the request's store again.
        assert client.get("/stream/sync").text == "True:None False:request False:request "
        assert client.get("/stream/async").text == "True True True "
    plain = TestClient(FastAPI(routes=app.router.routes))  # no middleware: the dependency's
    assert plain.get("/dep/sync").json() is False
    assert plain.get("/dep/async").json() is True
    assert live_scopes() == 0


def test_an_async_loader_in_a_def_endpoint_is_named_when_never_awaited() -> None:
    """A ``def`` endpoint (run in a thread, no event loop there) calling an async loader's
    ``load`` gets a coroutine: Python's "never awaited" warning names the loader's
    ``load`` (a newcomer's walk-through, 7 December 2026); awaited, it loads."""

    @perrequest.request_batch
    async def users_for_endpoints(ids: list[int]) -> list[str]:
        return [f"user{i}" for i in ids]

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/sync")
    def sync_endpoint() -> dict[str, str]:
        pending = users_for_endpoints.load(1)
        name = pending.__qualname__
        pending.close()  # a test's tidiness: a user's would warn under that name
        return {"name": name}

    @app.get("/async")
    async def async_endpoint() -> dict[str, str]:
        return {"user": await users_for_endpoints.load(2)}

    with TestClient(app) as client:
        assert client.get("/sync").json() == {
            "name": f"{__name__}.{users_for_endpoints.__qualname__}.load"
        }
        assert client.get("/async").json() == {"user": "user2"}
    assert live_scopes() == 0


def test_an_async_loaders_load_is_no_dependency_by_itself_an_async_def_around_it_is() -> None:
    """``Depends(users.load)``: ``load`` is a plain ``def`` returning an awaitable, so
    FastAPI runs it in a thread and hands the endpoint an un-awaited coroutine (a probe, 7
    December 2026). fastapi.md says so and gives the one-line ``async def`` around it."""

    @perrequest.request_batch
    async def users_by_key(keys: list[str]) -> list[str]:
        return [f"user-{k}" for k in keys]

    async def user(key: str) -> str:  # the documented dependency
        return await users_by_key.load(key)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/bare/{key}")
    async def bare(loaded: Annotated[Any, Depends(users_by_key.load)]) -> str:
        kind = type(loaded).__name__
        loaded.close()  # a test's tidiness: a user's would warn "never awaited"
        return kind

    @app.get("/wrapped/{key}")
    async def wrapped(name: Annotated[str, Depends(user)]) -> str:
        return name

    with TestClient(app) as client:
        assert client.get("/bare/7").json() == "coroutine"  # as fastapi.md warns
        assert client.get("/wrapped/7").json() == "user-7"
    assert live_scopes() == 0
