"""FastAPI 0.165 / Starlette 1.10 features under perrequest's ASGI middleware, served for real.

tests/fastapi_attack_apps.py records what each place of a FastAPI app sees (its own
request's id, another request's, or no scope), in a subprocess under uvicorn, hypercorn
(asyncio and trio) and granian: dependencies with ``yield`` (their teardown after a
raising background task and after a client disconnect), ``Depends(scope="function")``,
``Depends`` caching beside ``@request_memo``, ``BackgroundTasks`` (one that raises, one
that outlives the response), streaming and server-sent-event bodies, sync and async, with
a ``BackgroundTask``, exception handlers (a class's, ``HTTPException``'s, validation
errors'), anyio task groups and threads, ``run_in_threadpool`` with ``bind_scope``,
``anyio.from_thread.run`` from a sync dependency, a task that outlives its request,
websockets (a dependency with ``yield``, a client leaving mid-message), the lifespan, a
mounted sub-app with its own middleware, a WSGI app mounted with Starlette's
``WSGIMiddleware``, ``CORSMiddleware``/``GZipMiddleware``/``BaseHTTPMiddleware`` on both
sides of ours, HTTP/2 streams multiplexed on one connection; then 50 clients at once,
some leaving mid-body. All of that held; what broke is at the end.
"""

# No `from __future__ import annotations`: FastAPI must resolve Annotated[..., Depends(...)].
import asyncio
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import fastapi_attack_apps as apps
import httpx
import pytest
import websockets.asyncio.client
import websockets.sync.client
from fastapi import Depends, FastAPI, Header, Query
from fastapi.testclient import TestClient
from servers import HOST, free_port, serve_hypercorn, serve_subprocess, serve_uvicorn
from test_stream_cleanup import _argv

import perrequest.asgi
from perrequest import request_memo
from perrequest.testing import live_scopes

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # a server farm

SERVERS = ("uvicorn", "hypercorn", "hypercorn-trio", "granian")


@contextmanager
def _serve(server: str, app: str = "fastapi_attack_apps:app") -> Iterator[tuple[str, int]]:
    """``app`` served in a subprocess; yields its base URL and port."""
    port = free_port()
    argv = _argv(server.removesuffix("-trio"), port, app)
    if server == "hypercorn-trio":
        argv[-2:-2] = ["--worker-class", "trio"]
    elif server == "granian":
        argv[-2:-2] = ["--http", "auto"]  # HTTP/2 with prior knowledge, too
    with serve_subprocess(argv, port) as base:
        yield base, port


def _report(base: str, until_closed: bool = True, seen: Iterable[str] = ()) -> dict[str, Any]:
    """What the app recorded, once every scope has closed and each record in ``seen`` is
    there (or the deadline passed)."""
    deadline = time.monotonic() + 20
    while True:
        report: dict[str, Any] = httpx.get(f"{base}/_report", timeout=10).json()
        done = report["live"] == 0 and set(seen) <= report["seen"].keys()
        if not until_closed or done or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


# -- every feature, each place seeing its own request's store (or none, where documented) ----

# Where each request's code ran (the records of "rid where"), by path.
PLACES = {
    "/dep/d1": "async dep before, async dep after, sync dep before, sync dep after, "
    "function dep after, endpoint, background, sync background",
    "/dep/d2?mode=raise-background": "async dep before, async dep after, sync dep before, "
    "sync dep after, function dep after, endpoint, background, sync background, "
    "raising background",
    "/dep/d3?mode=long-background": "async dep before, async dep after, sync dep before, "
    "sync dep after, function dep after, endpoint, background, sync background, "
    "long background",
    "/stream/s1?kind=async": "async chunk 0, async chunk 1, async chunk 2, stream bg",
    "/stream/s2?kind=sync": "sync chunk 0, sync chunk 1, sync chunk 2, stream bg",
    "/sse/e1": "sse 0, sse 1, sse 2",
    "/sse-sync/e2": "sse sync 0, sse sync 1, sse sync 2",
    "/teapot/t1": "class handler",
    "/missing/m1": "http handler",
    "/number/v1?n=x": "validation handler",
    "/concurrency/c1": "task group, anyio thread, bound threadpool",
    "/from-thread/f1": "",
    "/sub/u1": "sub app",
    "/wsgi/w1": "wsgi app, wsgi body",
}
# Where the documentation says no store is seen: BaseHTTPMiddleware outside ours, a task
# that outlives its request (asyncio only), the lifespan.
OUTSIDE = {"base outside", "outliving task", "startup"}


def _expected(server: str) -> dict[str, Any]:
    seen: dict[str, Any] = {"lifespan startup": None, "lifespan store": False}
    for path, places in PLACES.items():
        rid = path.split("?")[0].rsplit("/", 1)[-1]
        where = [p for p in places.split(", ") if p]
        where += ["base inside before", "base inside after", "base outside"]
        seen.update({f"{rid} {w}": None if w in OUTSIDE else rid for w in where})
    if server != "hypercorn-trio":
        seen["c1 outliving task"] = None
    seen.update({"x1 " + w: "x1" for w in PLACES["/dep/d1"].split(", ")})
    seen.update({"x1 chunk": "x1", "x1 base inside before": "x1", "x1 base inside after": "x1"})
    seen["x1 base outside"] = None
    seen["o1 base outside"] = None  # a CORS preflight, answered outside ours
    seen.update({"ws1 ws open": "ws1", "ws1 ws disconnect": "ws1"})
    seen.update({"q1 ws dep after": "q1", "q1 wsdep disconnect": "q1"})
    return seen


@pytest.mark.parametrize("server", SERVERS)
def test_every_place_of_a_fastapi_app_sees_its_own_requests_store(server: str) -> None:
    """docs/frameworks/fastapi.md's table, and more, on four servers: each place sees its
    own request's store, the documented ones none; the memo computes once per request
    (the lifespan's twice: no scope, no cache); every scope closes; nothing is left set."""
    with _serve(server) as (base, port), httpx.Client(base_url=base, timeout=10) as client:
        headers = {"accept-encoding": "gzip", "origin": "http://example.com", "connection": "close"}
        for path in PLACES:
            response = client.get(path, headers=headers)
            assert response.status_code in (200, 404, 418, 422), (path, response.text)
            rid = path.split("?")[0].rsplit("/", 1)[-1]
            rest = response.text.replace(rid, "").replace("data:", "")
            assert set(rest) <= set(' "\n'), (path, response.text)
        preflight = {"origin": "http://example.com", "access-control-request-method": "GET"}
        assert client.options("/dep/o1", headers=preflight).status_code == 200
        with socket.create_connection((HOST, port), timeout=10) as sock:  # leaves mid-body
            sock.sendall(b"GET /dep/x1?mode=stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(5000)
        ws_base = base.replace("http", "ws")
        with websockets.sync.client.connect(f"{ws_base}/wsdep/q1") as ws:
            assert ws.recv() == "q1"
        with websockets.sync.client.connect(f"{ws_base}/ws/ws1") as ws:
            for n in range(50):
                ws.send(str(n))
                assert str(ws.recv()).split()[0] == "ws1"
            ws.send("slow")  # the client leaves while the server handles it
        # the long background task (0.5 s), and the outliving task (0.2 s, after its scope)
        expected = _expected(server)
        report = _report(base, seen=expected)
    assert report["seen"] == expected
    calls = {rid: n for rid, n in report["calls"].items() if rid != "lifespan"}
    assert calls == dict.fromkeys(calls, 1) and "d1 cached dep" in calls
    assert report["calls"]["lifespan"] == 2
    assert report["live"] == 0
    assert report["left"] == []


@pytest.mark.parametrize("server", ["hypercorn", "hypercorn-trio", "granian"])
def test_http2_streams_on_one_connection_each_get_their_own_store(server: str) -> None:
    """HTTP/2 multiplexes concurrent requests on one connection (one task of the server's
    per connection): each stream still gets its own store, and every scope closes."""

    async def streams(base: str) -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(base_url=base, http1=False, http2=True, timeout=20) as h2:
            rids = [f"h{n}" for n in range(30)]
            paths = [
                f"/load/{rid}" + ("?kind=stream" if n % 3 == 0 else "")
                for n, rid in enumerate(rids)
            ]
            return list(zip(rids, await asyncio.gather(*map(h2.get, paths)), strict=True))

    with _serve(server) as (base, _):
        answers = asyncio.run(streams(base))
        report = _report(base)
    assert {response.http_version for _, response in answers} == {"HTTP/2"}
    assert [(rid, r.text[:40]) for rid, r in answers if set(r.text.split()) != {rid}] == []
    assert report["wrong"] == [] and report["checks"] >= 30 * 5
    assert report["live"] == 0 and report["left"] == []


# -- 50 clients at once, some leaving mid-body, some giving up on a slow answer ----------------


async def _leave(port: int, request: bytes, reset: bool, read: bool) -> None:
    """Send ``request``, read a little of the answer (or nothing), then close or reset."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request)
    await writer.drain()
    if read:  # hypercorn sometimes closes a fresh connection unanswered under load, also
        await asyncio.wait_for(reader.read(3000), 10)  # without perrequest: not checked
    else:
        await asyncio.sleep(0.05)
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    writer.close()


async def _one_client(base: str, port: int, number: int, wrong: list[Any]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=20) as client:
        for n in range(8):
            rid, kind, reset = f"c{number}-{n}", (number + n) % 7, bool(n % 2)
            if kind == 6:  # a websocket: a few messages, then it leaves (mid-message or not)
                url = f"{base.replace('http', 'ws')}/ws/{rid}"
                async with websockets.asyncio.client.connect(url) as ws:
                    for text in "abc":
                        await ws.send(text)
                        answer = str(await ws.recv())
                        if answer.split()[0] != rid:
                            wrong.append((rid, "websocket", answer))
                    if reset:
                        await ws.send("slow")
                continue
            if kind == 0:  # a long stream (async or sync), left after its first chunks
                body = "stream" if n % 4 < 2 else "sync-stream"
                get = f"GET /load/{rid}?kind={body} HTTP/1.1\r\nHost: x\r\n\r\n"
                await _leave(port, get.encode(), reset, read=True)
            elif kind == 1:  # an upload, left mid-body while the endpoint awaits it
                head = f"POST /load/{rid}?kind=upload HTTP/1.1\r\nHost: x\r\n"
                await _leave(
                    port,
                    f"{head}Content-Length: 100000\r\n\r\n".encode() + b"x" * 5000,
                    reset,
                    read=False,
                )
            elif kind == 2:  # a slow answer the client stops waiting for
                try:
                    early = await client.get(f"/load/{rid}?kind=slow", timeout=0.1)
                except httpx.TimeoutException:
                    pass
                else:  # this loop, busy with 49 other clients, gave up too late: then
                    # the answer must still be the request's own
                    if (early.status_code, early.text) != (200, f"{rid} {rid} {rid}"):
                        wrong.append((rid, "slow", early.status_code, early.text))
            else:
                if kind == 3:
                    response = await client.post(f"/load/{rid}?kind=upload", content=b"y" * 3000)
                else:
                    params = {"kind": "stream" if kind == 4 else "plain", "collect": n % 2}
                    response = await client.get(f"/load/{rid}", params=params)
                if response.status_code != 200 or set(response.text.split()) - {"3000"} != {rid}:
                    wrong.append((rid, response.status_code, response.text[:80]))


@pytest.mark.parametrize("server", SERVERS)
def test_fifty_clients_some_leaving_mid_body_each_see_only_their_own_values(server: str) -> None:
    """Each response holds only its own request's id; every read in the app (dependency
    and its teardown, after an upload, thread, chunks, background task) saw its own
    request's store, also after a disconnect; in the server process every scope closed
    and the variable was never found set where the server starts a request."""
    wrong: list[Any] = []
    with _serve(server) as (base, port):

        async def clients() -> None:
            await asyncio.gather(*(_one_client(base, port, n, wrong) for n in range(50)))

        asyncio.run(clients())
        report = _report(base)
    assert wrong == []
    assert report["wrong"] == []
    assert report["checks"] > 50 * 8 * 3
    assert report["live"] == 0
    assert report["left"] == []


# -- what held: memoized dependencies beside FastAPI's own caching ------------------------------


class _Repo:
    @request_memo
    def get(self, k: int = 1) -> int:
        _DEP_CALLS.append(f"repo {k}")
        return k


_DEP_CALLS: list[str] = []


@request_memo
async def _user(x_user: Annotated[str, Header()]) -> dict[str, str]:
    _DEP_CALLS.append(x_user)
    return {"name": x_user}


@request_memo
def _tenant(tenant: str = Query("t")) -> str:  # sync: FastAPI runs it in the thread pool
    _DEP_CALLS.append(f"tenant {tenant}")
    return tenant


_repo = _Repo()


def _memoized_dependencies_app() -> FastAPI:
    app = FastAPI()

    @app.get("/me")
    async def me(
        user: Annotated[dict[str, str], Depends(_user)],
        again: Annotated[dict[str, str], Depends(_user, use_cache=False)],
        tenant: Annotated[str, Depends(_tenant)],
        k: Annotated[int, Depends(_repo.get)],
    ) -> dict[str, Any]:
        return {"user": user["name"], "tenant": tenant, "k": k, "same": user is again}

    app.add_middleware(perrequest.asgi.RequestScopeMiddleware)
    return app


def test_memoized_functions_work_as_dependencies_and_memoize_past_use_cache_false() -> None:
    """FastAPI reads a dependency's parameters through ``__wrapped__`` (a header, a query
    parameter, a method's): they stay in the OpenAPI schema; async stays awaited, sync goes
    to the thread pool; ``use_cache=False`` re-runs the dependency, but the memo answers."""
    app = _memoized_dependencies_app()
    with TestClient(app) as client:
        for user in ("ann", "bob"):
            response = client.get("/me?tenant=a&k=2", headers={"x-user": user})
            assert response.json() == {"user": user, "tenant": "a", "k": 2, "same": True}
    assert _DEP_CALLS == ["ann", "tenant a", "repo 2", "bob", "tenant a", "repo 2"]
    parameters = app.openapi()["paths"]["/me"]["get"]["parameters"]
    assert {(p["name"], p["in"]) for p in parameters} == {
        ("x-user", "header"),
        ("tenant", "query"),
        ("k", "query"),
    }
    assert live_scopes() == 0


# -- what held: a long websocket stays bounded; leaving mid-message frees its store ------------


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "testclient"])
def test_a_long_websocket_with_a_memo_per_message_stays_within_max_entries(server: str) -> None:
    """scope_types=("http", "websocket"), max_entries=16: 300 messages, each defining a new
    memoized helper, keep the connection's store at 16 entries or fewer (function records
    included); a client that leaves while a message is handled closes the store."""
    sizes: list[int] = []
    if server == "testclient":
        with TestClient(apps.small) as client, client.websocket_connect("/ws/t") as ws:
            for n in range(300):
                ws.send_text(str(n))
                rid, size = ws.receive_text().split()
                assert rid == "t"
                sizes.append(int(size))
    else:
        serve = serve_uvicorn if server == "uvicorn" else serve_hypercorn
        with serve(apps.small) as base:
            url = f"{base.replace('http', 'ws')}/ws/{server}"
            with websockets.sync.client.connect(url) as ws:
                for n in range(300):
                    ws.send(str(n))
                    rid, size = str(ws.recv()).split()
                    assert rid == server
                    sizes.append(int(size))
                ws.send("slow")  # handled for 0.3 s: the client is gone before the answer
            deadline = time.monotonic() + 10
            while live_scopes() and time.monotonic() < deadline:
                time.sleep(0.02)
    assert max(sizes) <= 16 and sizes[-1] >= 2
    assert live_scopes() == 0


# -- what broke: a websocket or the lifespan told to add the middleware it runs under ------------


def test_no_scope_errors_in_a_websocket_left_out_and_in_the_lifespan_name_the_fix() -> None:
    """RequestScopeMiddleware registered with the default scope_types: a websocket endpoint's
    `perrequest.set` and `outside_scope="raise"` memo said "Add perrequest's
    RequestScopeMiddleware to the app", which the app had; the fix is scope_types (or a
    request_scope() per message). At start-up (the lifespan), request_scope() is the fix."""
    with TestClient(apps.http_only) as client, client.websocket_connect("/ws") as ws:
        in_websocket_set, in_websocket_memo, at_startup_set, at_startup_memo = ws.receive_json()
    for message in (in_websocket_set, in_websocket_memo):
        assert "websocket" in message and "Add perrequest's" not in message
        assert "scope_types=('http', 'websocket')" in message
        assert "request_scope()" in message
    for message in (at_startup_set, at_startup_memo):
        assert "lifespan" in message and "Add perrequest's" not in message
        assert "request_scope()" in message
    assert live_scopes() == 0


# -- what held: a WSGI app mounted with Starlette's WSGIMiddleware -------------------------------


def _flask_in_fastapi(calls: list[str]) -> FastAPI:
    import warnings

    from flask import Flask

    from perrequest.flask import PerRequest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StarletteDeprecationWarning: a2wsgi is not installed
        from starlette.middleware.wsgi import WSGIMiddleware

    @request_memo
    def lookup(rid: str) -> str:
        calls.append(rid)
        return rid

    flask = Flask(__name__)

    @flask.get("/page/<rid>")
    def page(rid: str) -> Any:
        outer = perrequest.get("outer")  # the FastAPI side's value: not in this store
        perrequest.set("inner", rid)

        def body() -> Iterator[str]:  # iterated by Starlette in a pool thread
            yield f"{rid} {outer} {perrequest.get('inner')} {lookup(rid)} {lookup(rid)}"

        return flask.response_class(body())

    PerRequest(flask)
    api = FastAPI()

    @api.middleware("http")
    async def outer(request: Any, call_next: Any) -> Any:  # inside ours: the request's store
        perrequest.set("outer", "fastapi")
        return await call_next(request)

    api.mount("/flask", WSGIMiddleware(flask))  # type: ignore[arg-type]
    api.add_middleware(perrequest.asgi.RequestScopeMiddleware)
    return api


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "testclient"])
def test_a_flask_app_mounted_with_its_own_perrequest_gets_a_store_of_its_own(server: str) -> None:
    """Starlette's WSGIMiddleware builds a WSGI environ afresh (no "perrequest.store"
    marker), so Flask's PerRequest opens a scope of its own, nested, as for any sub-request
    built afresh (semantics.md, Nested registration); it never calls the body's close(),
    and the scope still closes as the body is dropped. A mounted WSGI app without a
    perrequest middleware of its own sees the request's store (test above: "wsgi app")."""
    calls: list[str] = []
    app = _flask_in_fastapi(calls)
    answers = []
    if server == "testclient":
        with TestClient(app) as client:
            answers = [client.get(f"/flask/page/r{n}").text for n in range(3)]
    else:
        serve = serve_uvicorn if server == "uvicorn" else serve_hypercorn
        with serve(app) as base:
            answers = [httpx.get(f"{base}/flask/page/r{n}", timeout=10).text for n in range(3)]
            deadline = time.monotonic() + 10
            while live_scopes() and time.monotonic() < deadline:
                time.sleep(0.02)
    assert answers == [f"r{n} None r{n} r{n} r{n}" for n in range(3)]
    assert calls == ["r0", "r1", "r2"]
    assert live_scopes() == 0


def test_an_http_request_left_out_of_scope_types_is_told_to_list_http() -> None:
    """scope_types=("websocket",): an endpoint's error names "http", and suggests listing
    both types (it suggested scope_types=('http', 'http') while being written)."""
    app = FastAPI()

    @app.get("/")
    async def endpoint() -> str:
        with pytest.raises(perrequest.NoActiveScope) as raised:
            perrequest.set("rid", "x")
        return str(raised.value)

    app.add_middleware(perrequest.asgi.RequestScopeMiddleware, scope_types=("websocket",))
    with TestClient(app) as client:
        message = client.get("/").json()
    assert "'http' scope" in message and "scope_types=('http', 'websocket')" in message
    assert "'http', 'http'" not in message
