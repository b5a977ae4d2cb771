"""Apps that tests/test_more_servers.py serves under waitress, cheroot, Tornado, Twisted and
daphne.

``python more_servers_apps.py SERVER PORT`` serves them. Every request stores its
id and memoizes ``ident()`` (the same key in every request); each read, in the
view, after a sleep, in another thread, in every chunk of a streamed body and
its ``finally``, is checked: its own id (or, where the docs allow it, none),
never another request's. ``/raw`` and ``/state`` go to an app that perrequest
does not wrap: what the server's thread holds between requests, and the tally.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import random
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, Response, request, send_file, stream_with_context

import perrequest
from perrequest._active import _current
from perrequest.flask import PerRequest
from perrequest.testing import live_scopes

HOST = "127.0.0.1"
WORKER_THREADS = 4

TALLY: dict[str, Any] = {"checks": {}, "bad": [], "chunk_threads": 0, "finally": {}}
_lock = threading.Lock()


@perrequest.request_memo(outside_scope="call")
def ident() -> Any:
    return perrequest.get("rid")


def check(place: str, rid: str, *, either: bool = False) -> None:
    """Its own ``rid`` seen (or none, if ``either``), through ``get`` and the memo."""
    seen = (perrequest.get("rid"), ident())
    allowed = [(rid, rid), (None, None)] if either else [(rid, rid)]
    with _lock:
        TALLY["checks"][place] = TALLY["checks"].get(place, 0) + 1
        if seen not in allowed and len(TALLY["bad"]) < 20:
            TALLY["bad"].append(f"{place} of {rid} saw {seen}")


def _finally(rid: str) -> None:
    """A body's cleanup: its own store, none, or (never) another's."""
    seen = perrequest.get("rid")
    what = "own" if seen == rid else "none" if seen is None else "other"
    with _lock:
        TALLY["finally"][what] = TALLY["finally"].get(what, 0) + 1


def state() -> dict[str, Any]:
    with _lock:
        return {**json.loads(json.dumps(TALLY)), "live": live_scopes()}


def here() -> dict[str, Any]:
    """What this thread (or task) holds, outside every perrequest layer."""
    return {
        "in_scope": perrequest.in_request_scope(),
        "var": repr(_current.get()),
        "thread": threading.get_ident(),
    }


# -- WSGI: Flask wrapped by PerRequest, beside an app that is not ---------------------------

flask_app = Flask(__name__)


@flask_app.get("/iso")
def iso() -> str:
    rid = request.args["rid"]
    perrequest.set("rid", rid)
    check("view", rid)
    time.sleep(random.random() * 0.01)  # other requests run meanwhile
    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(perrequest.get("rid")))
    thread.start()  # a plain thread: a fresh context, no store
    thread.join(5)
    check("view after sleep", rid)
    return f"{perrequest.get('rid')} {ident()} {seen}"


@flask_app.get("/stream")
def stream() -> Response:
    rid = request.args["rid"]
    perrequest.set("rid", rid)
    chunks, size = int(request.args.get("chunks", 20)), int(request.args.get("size", 16))

    def body() -> Iterator[bytes]:
        threads = set()
        try:
            for n in range(chunks):
                check("chunk", rid)
                threads.add(threading.get_ident())
                yield b"x" * size
                if n % 4 == 0:
                    time.sleep(0.001)
        finally:
            _finally(rid)
            with _lock:
                TALLY["chunk_threads"] = max(TALLY["chunk_threads"], len(threads))

    flask_ctx = "plain" not in request.args
    return Response(stream_with_context(body()) if flask_ctx else body())


@flask_app.get("/fails")
def fails() -> Response:
    """A body that raises after its first chunk (Twisted then never calls ``close()``)."""
    perrequest.set("rid", request.args["rid"])

    def body() -> Iterator[bytes]:
        yield b"first"
        raise RuntimeError("the body failed mid-iteration")

    return Response(body())


@flask_app.get("/file")
def file() -> Response:
    """Through the server's ``wsgi.file_wrapper`` where it has one (waitress)."""
    rid = request.args["rid"]
    perrequest.set("rid", rid)
    check("view", rid)
    return send_file(io.BytesIO(f"{rid} {ident()}".encode()), mimetype="text/plain")


PerRequest(flask_app)

StartResponse = Callable[..., Any]


def raw(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    """Not wrapped by perrequest."""
    start_response("200 OK", [("Content-Type", "application/json")])
    if environ["PATH_INFO"] == "/state":
        gc.collect()  # abandoned bodies in reference cycles: their cleanup runs now
    return [json.dumps(state() if environ["PATH_INFO"] == "/state" else here()).encode()]


def wsgi_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    outside = environ["PATH_INFO"] in ("/raw", "/state")
    return (raw if outside else flask_app)(environ, start_response)


# -- ASGI (daphne): Starlette with the middleware, beside an app without it -----------------

from starlette.applications import Starlette  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from perrequest.asgi import RequestScopeMiddleware  # noqa: E402


async def a_iso(req: Request) -> PlainTextResponse:
    rid = req.query_params["rid"]
    perrequest.set("rid", rid)
    check("view", rid)
    await asyncio.sleep(random.random() * 0.01)
    await run_in_threadpool(check, "view thread", rid)
    check("view after sleep", rid)
    return PlainTextResponse(f"{perrequest.get('rid')} {ident()}")


async def a_stream(req: Request) -> StreamingResponse:
    rid = req.query_params["rid"]
    perrequest.set("rid", rid)
    chunks, size = int(req.query_params.get("chunks", 20)), int(req.query_params.get("size", 16))

    def sync_body() -> Iterator[bytes]:  # Starlette runs it in threads, a chunk at a time
        try:
            for _ in range(chunks):
                check("chunk", rid)
                yield b"x" * size
        finally:
            _finally(rid)

    async def async_body() -> AsyncIterator[bytes]:
        try:
            for n in range(chunks):
                check("chunk", rid)
                yield b"x" * size
                await asyncio.sleep(0.001 if n % 4 == 0 else 0)
        finally:
            _finally(rid)

    return StreamingResponse(sync_body() if req.query_params["kind"] == "sync" else async_body())


starlette_app = Starlette(
    routes=[Route("/iso", a_iso), Route("/stream", a_stream)],
    middleware=[Middleware(RequestScopeMiddleware)],
)


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] in ("/raw", "/state"):
        if scope["path"] == "/state":
            gc.collect()  # abandoned bodies: their cleanup runs now (async: in a task soon)
            body = state()
        else:  # the loop's task, and the threads of Starlette's pool (run in copies)
            body = {**here(), "pool": await run_in_threadpool(here)}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        return
    await starlette_app(scope, receive, send)


# -- serving ---------------------------------------------------------------------------------


def _tornado(port: int, *, inline: bool = False) -> None:
    """Tornado's ``WSGIContainer``: with an executor of several threads, which calls the app
    in one thread and fetches each chunk with ``run_in_executor`` (so in any of them),
    iterating and closing the body on the loop; or, ``inline``, its default, which runs
    everything on the loop."""
    from tornado.ioloop import IOLoop
    from tornado.web import Application, FallbackHandler, RequestHandler
    from tornado.wsgi import WSGIContainer

    executor = ThreadPoolExecutor(WORKER_THREADS)

    class Pool(RequestHandler):
        """What every executor thread holds, in its own context (no copy)."""

        async def get(self) -> None:
            barrier = threading.Barrier(WORKER_THREADS, timeout=5)

            def probe() -> dict[str, Any]:
                barrier.wait()  # one probe per thread
                return here()

            loop = IOLoop.current()
            probes = [loop.run_in_executor(executor, probe) for _ in range(WORKER_THREADS)]
            self.write(json.dumps({"loop": here(), "pool": await asyncio.gather(*probes)}))

    container = WSGIContainer(wsgi_app) if inline else WSGIContainer(wsgi_app, executor=executor)
    app = Application([(r"/pool", Pool), (r".*", FallbackHandler, {"fallback": container})])

    async def main() -> None:
        app.listen(port, HOST)
        await asyncio.Event().wait()

    asyncio.run(main())


def _twisted(port: int) -> None:
    """Twisted's ``WSGIResource`` on a pool of ``WORKER_THREADS``, logging started (as
    ``twistd`` starts it: until then Twisted keeps every logged error, and its frames)."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner
    from twisted.python.threadpool import ThreadPool
    from twisted.web.server import Site
    from twisted.web.wsgi import WSGIResource

    globalLogBeginner.beginLoggingTo([lambda event: None])
    pool = ThreadPool(minthreads=WORKER_THREADS, maxthreads=WORKER_THREADS)
    pool.start()
    reactor.addSystemEventTrigger("after", "shutdown", pool.stop)  # type: ignore[attr-defined]
    site = Site(WSGIResource(reactor, pool, wsgi_app))
    reactor.listenTCP(port, site, interface=HOST)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main(server: str, port: int) -> None:
    if server == "waitress":
        import waitress

        waitress.serve(wsgi_app, host=HOST, port=port, threads=WORKER_THREADS, _quiet=True)
    elif server == "cheroot":
        from cheroot import wsgi

        wsgi.Server((HOST, port), wsgi_app, numthreads=WORKER_THREADS).safe_start()
    elif server in ("tornado", "tornado-inline"):
        _tornado(port, inline=server == "tornado-inline")
    elif server == "twisted":
        _twisted(port)
    else:
        raise SystemExit(f"unknown server {server!r}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
