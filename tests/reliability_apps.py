"""Apps for the reliability tests: every request checks it sees only its own values.

Each request stores its own id (``perrequest.set("rid", rid)``) and memoizes
``tag()``, a function with *no arguments* whose result is derived from the
request's id. The key of ``tag()`` is the same in every request, so a store
shared between two requests, or a store left active on a worker thread, shows
up as a value from another request. Every read is counted in ``TALLY``; the
apps expose it at ``/tally`` so a test can read it from another process
(gunicorn) too.

- ``asgi_app``: Starlette + the ASGI middleware (async and sync endpoints,
  streaming body, BackgroundTask).
- ``wsgi_app``: a plain WSGI app + the WSGI middleware (lazy body and close()).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import perrequest
import perrequest.asgi
import perrequest.wsgi
from perrequest import request_memo
from perrequest._active import _current
from perrequest.testing import live_scopes

CHUNKS = 3


class Tally:
    """Thread-safe counters of checks made and values that belonged to another request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.checks = 0
        self.mismatches = 0
        self.tag_calls = 0
        self.where: dict[str, int] = {}
        self.examples: list[str] = []

    def count_tag_call(self) -> None:
        with self._lock:
            self.tag_calls += 1

    def check(self, where: str, expected: object, *seen: object) -> None:
        with self._lock:
            self.where[where] = self.where.get(where, 0) + len(seen)
            for value in seen:
                self.checks += 1
                if value != expected:
                    self.mismatches += 1
                    if len(self.examples) < 10:
                        self.examples.append(f"{where}: expected {expected!r}, saw {value!r}")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "checks": self.checks,
                "mismatches": self.mismatches,
                "tag_calls": self.tag_calls,
                "where": dict(self.where),
                "examples": list(self.examples),
            }

    def reset(self) -> None:
        with self._lock:
            self.checks = self.mismatches = self.tag_calls = 0
            self.where.clear()
            self.examples.clear()


TALLY = Tally()


def expected_tag(rid: str) -> str:
    return f"tag-{rid}"


def expected_body(rid: str) -> bytes:
    return "".join(f"{rid};" for _ in range(CHUNKS)).encode()


@request_memo
def tag() -> str:
    """Same key in every request; the value is derived from this request's id."""
    TALLY.count_tag_call()
    return expected_tag(perrequest.get("rid"))


@request_memo
async def tag_async() -> str:
    await asyncio.sleep(0)
    return expected_tag(perrequest.get("rid"))


def read_back_sync(where: str, rid: str) -> None:
    """Yield to other threads, then read every value back."""
    time.sleep(0)
    TALLY.check(where, rid, perrequest.get("rid"))
    TALLY.check(where + ".memo", expected_tag(rid), tag())


async def read_back(where: str, rid: str) -> None:
    """Yield to other tasks, then read every value back (sync and async memo)."""
    await asyncio.sleep(0)
    TALLY.check(where, rid, perrequest.get("rid"))
    TALLY.check(where + ".memo", expected_tag(rid), tag(), await tag_async())


def start_request(rid: str) -> None:
    """A fresh store: nothing from an earlier request on this thread or task."""
    TALLY.check("fresh", None, perrequest.get("rid"))
    perrequest.set("rid", rid)


# -- ASGI: Starlette -----------------------------------------------------------


async def _stream(rid: str) -> AsyncIterator[bytes]:
    for _ in range(CHUNKS):
        await read_back("stream", rid)
        yield f"{perrequest.get('rid')};".encode()


async def _after(rid: str) -> None:
    await read_back("background", rid)


def _after_sync(rid: str) -> None:
    read_back_sync("background_sync", rid)


async def asgi_isolation(request: Request) -> Response:
    rid = request.path_params["rid"]
    start_request(rid)
    await tag_async()
    await read_back("handler", rid)
    return StreamingResponse(_stream(rid), background=BackgroundTask(_after, rid))


def asgi_isolation_sync(request: Request) -> Response:
    """A sync endpoint: Starlette runs it in its thread pool with a copied context."""
    rid = request.path_params["rid"]
    start_request(rid)
    read_back_sync("handler_sync", rid)
    body = "".join(f"{perrequest.get('rid')};" for _ in range(CHUNKS))
    return Response(body, background=BackgroundTask(_after_sync, rid))


async def asgi_tally(request: Request) -> Response:
    return JSONResponse(TALLY.snapshot())


asgi_app = Starlette(
    routes=[
        Route("/iso/{rid}", asgi_isolation),
        Route("/iso-sync/{rid}", asgi_isolation_sync),
        Route("/tally", asgi_tally),
    ]
)
asgi_app.add_middleware(perrequest.asgi.RequestScopeMiddleware)


# -- WSGI: plain app, served by gunicorn gthread --------------------------------

StartResponse = Callable[..., Any]


class _Body:
    """A lazy body whose chunks and close() read the store back."""

    def __init__(self, rid: str) -> None:
        self.rid = rid

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(CHUNKS):
            read_back_sync("stream", self.rid)
            yield f"{perrequest.get('rid')};".encode()

    def close(self) -> None:
        read_back_sync("close", self.rid)


class Boom(Exception):
    """The error the fault endpoints raise."""


@request_memo
def failing_memo(n: int) -> str:
    raise Boom(f"memo failed for {n}")


@request_memo(key=lambda n: 1 // n)
def failing_key(n: int) -> str:
    return f"never {n}"


def _raise_during() -> Iterator[bytes]:
    yield b"first;"
    raise Boom("during the body")


def _endless() -> Iterator[bytes]:
    """A body the client walks away from; bounded so nothing can hang forever."""
    for _ in range(2000):
        yield b"x" * 65536
        time.sleep(0.01)


def _json(start_response: StartResponse, data: object) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(data).encode()]


def wsgi_isolation(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path: str = environ.get("PATH_INFO", "")
    if path == "/tally":
        return _json(start_response, TALLY.snapshot())
    if path == "/live":  # this request's own scope is open: 1 when nothing leaked
        return _json(start_response, {"live": live_scopes(), "pid": os.getpid()})
    if path == "/raise-before":
        perrequest.set("rid", "doomed")
        raise Boom("before the response")
    if path == "/memo-raise":
        return [failing_memo(1).encode()]
    if path == "/key-raise":
        return [failing_key(0).encode()]
    if path == "/raise-during":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _raise_during()
    if path == "/endless":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _endless()
    rid = path.rsplit("/", 1)[-1]
    start_request(rid)
    read_back_sync("handler", rid)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return _Body(rid)


def _thread_checked(app: Any) -> Any:
    """Outside perrequest's middleware: what a pooled thread has active as a request
    starts. Nothing, ever: a store an earlier request left there shows here, where no
    middleware has set this request's yet ("fresh", inside, could not see it)."""

    def checked(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") not in ("/tally", "/live"):
            TALLY.check("thread", None, _current.get())
        return app(environ, start_response)  # type: ignore[no-any-return]

    return checked


wsgi_app = _thread_checked(perrequest.wsgi.RequestScopeMiddleware(wsgi_isolation))
