"""No leaks: 50_000 unique-key requests through each integration leave nothing behind.

Each request memoizes a ~500-byte value under a key no other request uses, and
stores it with ``perrequest.set`` too: exactly the pattern that makes a
module-level dict grow for ever. The requests are driven in-process (ASGI: the
app called with a minimal driver; WSGI and Flask: the app's ``__call__``, body
iterated and closed; Django: its WSGI handler, in a subprocess so that its
global settings stay out of this test process). Memory is measured with
``tracemalloc`` from after a warm-up to the end.

Next to each run, the same app with a module-level dict memo runs through the
same measurement and must grow by clearly more than the limit: the
measurement is shown able to fail.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

import perrequest
from perrequest import ScopeStats, request_memo
from perrequest.testing import live_scopes

pytestmark = [pytest.mark.timeout(110), pytest.mark.slow]

REQUESTS = 50_000
NAIVE_REQUESTS = 10_000  # enough to grow well past the limit, in a fraction of the time
LIMIT = 2 * 1024 * 1024  # bytes of traced growth allowed for 50_000 requests
BLOCK_LIMIT = 1000  # live small-object blocks allowed for 50_000 requests (Flask, Django)
PAYLOAD = 500

_keys = itertools.count()
NAIVE: dict[str, str] = {}  # the leak this library exists to prevent


def payload(key: str) -> str:
    return f"{key}:" + "x" * PAYLOAD


@request_memo
def load(key: str) -> str:
    return payload(key)


def load_naive(key: str) -> str:
    if key not in NAIVE:
        NAIVE[key] = payload(key)
    return NAIVE[key]


def handle(kind: str, key: str) -> str:
    """What every endpoint does: a miss, a hit, and a helper entry."""
    if kind == "naive":
        return load_naive(key) and load_naive(key)
    value = load(key)
    perrequest.set(("seen", key), value)
    return str(load(key))


class Closed:
    """Counts the scopes the middleware closed and the entries they held."""

    def __init__(self) -> None:
        self.scopes = 0
        self.entries = 0

    def __call__(self, stats: ScopeStats) -> None:
        self.scopes += 1
        self.entries += stats.entries


def traced_growth(run: Callable[[int], None], count: int) -> int:
    """Bytes still allocated (tracemalloc) after ``count`` requests, compared with before."""
    run(100)  # warm-up: imports, route compilation, lazily built caches
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(count)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def block_growth(run: Callable[[int], None], count: int) -> int:
    """Small-object blocks still allocated after ``count`` requests, compared with before.

    ``sys.getallocatedblocks()`` costs nothing per allocation, where tracemalloc
    makes Flask and Django 3.7 times slower; any object left behind by a request
    (a key, a tuple, a store, a context) is a block.
    """
    run(100)
    gc.collect()
    before = sys.getallocatedblocks()
    run(count)
    gc.collect()
    return sys.getallocatedblocks() - before


def measure(
    run: Callable[[str, int], None], closed: Closed, growth: Callable[..., int] = traced_growth
) -> dict[str, Any]:
    """The perrequest run and the naive run, as the tests and the subprocess report them."""
    started = time.perf_counter()
    ours = growth(lambda n: run("perrequest", n), REQUESTS)
    seconds = time.perf_counter() - started
    naive = growth(lambda n: run("naive", n), NAIVE_REQUESTS)
    NAIVE.clear()
    return {
        "unit": "bytes" if growth is traced_growth else "blocks",
        "growth": ours,
        "naive_growth": naive,
        "live": live_scopes(),
        "scopes": closed.scopes,
        "entries": closed.entries,
        "seconds": seconds,
    }


def check(result: dict[str, Any]) -> None:
    limit = LIMIT if result["unit"] == "bytes" else BLOCK_LIMIT
    assert result["live"] == 0
    assert result["scopes"] >= REQUESTS  # every request had its own scope, and it closed
    assert result["entries"] >= 2 * REQUESTS  # ... holding the memo entry and the helper entry
    assert result["growth"] < limit, f"{result} after {REQUESTS} requests"
    assert result["naive_growth"] > 2 * limit, f"the measurement would not see a leak: {result}"


# -- WSGI-style driving --------------------------------------------------------------


def environ(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": _EmptyInput(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }


class _EmptyInput:
    def read(self, size: int = -1) -> bytes:
        return b""

    def readline(self, size: int = -1) -> bytes:
        return b""


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    assert status.startswith("200"), status


def wsgi_runner(app: Callable[..., Iterable[bytes]]) -> Callable[[str, int], None]:
    def run(kind: str, count: int) -> None:
        for _ in range(count):
            body = app(environ(f"/{kind}/k{next(_keys)}"), _start_response)
            try:
                for _chunk in body:
                    pass
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()

    return run


def wsgi_view(env: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    _, kind, key = env["PATH_INFO"].split("/")
    body = handle(kind, key).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


def test_wsgi_middleware_50k_requests_leave_nothing_behind() -> None:
    from perrequest.wsgi import RequestScopeMiddleware

    closed = Closed()
    app = RequestScopeMiddleware(wsgi_view, on_close=closed)
    check(measure(wsgi_runner(app), closed))


def test_flask_extension_50k_requests_leave_nothing_behind() -> None:
    from flask import Flask

    from perrequest.flask import PerRequest

    closed = Closed()
    app = Flask("leaks")
    app.add_url_rule("/<kind>/<key>", "view", lambda kind, key: handle(kind, key))
    PerRequest(app, on_close=closed)
    check(measure(wsgi_runner(app), closed, block_growth))


# -- ASGI: a minimal driver ------------------------------------------------------------


def asgi_runner(app: Callable[..., Any]) -> Callable[[str, int], None]:
    async def one(path: str) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200, message

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        await app(scope, receive, send)

    async def many(kind: str, count: int) -> None:
        for _ in range(count):
            await one(f"/{kind}/k{next(_keys)}")

    def run(kind: str, count: int) -> None:
        asyncio.run(many(kind, count))

    return run


def test_asgi_middleware_50k_requests_leave_nothing_behind() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from perrequest.asgi import RequestScopeMiddleware

    async def view(request: Request) -> PlainTextResponse:
        return PlainTextResponse(handle(request.path_params["kind"], request.path_params["key"]))

    closed = Closed()
    app = Starlette(routes=[Route("/{kind}/{key}", view)])
    app.add_middleware(RequestScopeMiddleware, on_close=closed)
    check(measure(asgi_runner(app), closed))


# -- Django: its WSGI handler, in a subprocess of its own ------------------------------

DJANGO_CLOSED = Closed()


def django_main() -> None:
    """Configure Django with the perrequest middleware and measure; print JSON."""
    import django
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.http import HttpRequest, HttpResponse
    from django.urls import path

    def view(request: HttpRequest, kind: str, key: str) -> HttpResponse:
        return HttpResponse(handle(kind, key))

    globals()["urlpatterns"] = [path("<str:kind>/<str:key>", view)]
    settings.configure(
        DEBUG=False,
        SECRET_KEY="leak-test",
        ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF="__main__",
        MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],
        PERREQUEST={"ON_CLOSE": "__main__.DJANGO_CLOSED"},
        INSTALLED_APPS=[],
        DATABASES={},
        USE_TZ=True,
    )
    django.setup()
    print(json.dumps(measure(wsgi_runner(WSGIHandler()), DJANGO_CLOSED, block_growth)))


def test_django_middleware_50k_requests_leave_nothing_behind() -> None:
    tests = Path(__file__).resolve().parent
    proc = subprocess.run(
        [sys.executable, __file__, "django"],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tests.parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])},
    )
    assert proc.returncode == 0, proc.stderr
    check(json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__" and sys.argv[1:] == ["django"]:
    django_main()
