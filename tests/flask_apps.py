"""Flask apps for the tests, importable by gunicorn (``flask_apps:dispatch``).

gunicorn forks, so the app reports its own state: ``/_live`` gives the
worker's open scopes (not counting its own), aborted streams and what each
``teardown_request`` saw. ``dispatch`` mounts, next to the wrapped Flask app,
two plain WSGI apps WITHOUT the middleware: ``/raw`` reports whether it sees
a store (it must not, whatever ran before on its thread) and ``/leaky`` sets
a ContextVar and never resets it, the bug the middleware must not have, so
the tests can show a pooled thread really does carry context over.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    g,
    has_app_context,
    request,
    send_file,
    stream_with_context,
)
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import perrequest
from perrequest import request_batch, request_memo
from perrequest.flask import PerRequest
from perrequest.scope import _current
from perrequest.testing import live_scopes

StartResponse = Callable[..., Any]


class Boom(Exception):
    """Raised by /boom."""


EVENTS = {"aborted": 0}
"""Streams whose generator was closed before it finished (a client went away)."""

TEARDOWNS: deque[dict[str, Any]] = deque(maxlen=200)
"""What each teardown_request saw, most recent last (bounded: a test app must not leak)."""

LEAK: contextvars.ContextVar[str | None] = contextvars.ContextVar("flask_apps.leak", default=None)


@request_memo
def lookup() -> str:
    """The expensive per-request computation: runs once per request, wherever it is called."""
    perrequest.set("lookups", perrequest.get("lookups", 0) + 1)
    return uuid.uuid4().hex


@request_memo
def echo(value: str) -> str:
    return value


@request_memo
async def profile(user_id: int) -> str:
    """An async memo, run by Flask's async views in an event loop of their own."""
    perrequest.set("profiles", perrequest.get("profiles", 0) + 1)
    await asyncio.sleep(0.001)
    return f"{request.args['rid']}:{user_id}:{uuid.uuid4().hex}"


@request_batch
async def names(keys: list[int]) -> list[str]:
    perrequest.set("batches", perrequest.get("batches", 0) + 1)
    await asyncio.sleep(0.001)
    return [f"{request.args['rid']}:{key}" for key in keys]


def async_views() -> Blueprint:
    """``async def`` hooks and views (``flask[async]``): Flask runs each in a new event
    loop (asgiref's ``async_to_sync``), so one request's memo and loader values cross
    two loops, the hook's and the view's."""
    views = Blueprint("async_views", __name__, url_prefix="/async")

    @views.before_request
    async def _early() -> None:
        g.early = (await profile(1), await names.load(1), id(perrequest.current_store()))

    @views.get("/echo")
    async def echo() -> dict[str, Any]:
        rid = request.args["rid"]
        before = perrequest.get("v")
        perrequest.set("v", rid)
        again = await asyncio.gather(profile(1), profile(1))  # the hook's: hits
        new = await asyncio.gather(profile(2), profile(2))  # one computation
        loaded = await asyncio.gather(names.load(1), names.load(2), names.load(3))
        return {
            "before": before,
            "seen": perrequest.get("v"),
            "early": list(g.early[:2]),
            "same_store": g.early[2] == id(perrequest.current_store()),
            "again": again,
            "new": new,
            "loaded": loaded,
            "profiles": perrequest.get("profiles"),
            "batches": perrequest.get("batches"),
        }

    return views


def helper() -> str:
    """A helper far from the view, with no request argument."""
    return lookup()


def _line(**fields: Any) -> str:
    return json.dumps(fields) + "\n"


def _chunk_state(n: int) -> str:
    return _line(
        n=n,
        in_scope=perrequest.in_request_scope(),
        marker=perrequest.get("marker"),
        lookup=lookup(),
        lookups=perrequest.get("lookups"),
        has_app_context=has_app_context(),
    )


def create_app(ext: PerRequest | None = None) -> Flask:
    """The test app; ``ext`` is registered with ``init_app`` (default: ``PerRequest(app)``)."""
    app = Flask(__name__)
    if ext is None:
        PerRequest(app)
    else:
        ext.init_app(app)

    @app.before_request
    def _before() -> None:
        g.before = perrequest.get("marker")  # None unless a store leaked in
        perrequest.set("marker", uuid.uuid4().hex)
        g.before_lookup = lookup()
        g.thread = threading.get_ident()

    @app.after_request
    def _after(response: Response) -> Response:
        response.headers["X-After-Lookup"] = lookup()
        return response

    @app.teardown_request
    def _teardown(exc: BaseException | None) -> None:
        TEARDOWNS.append(
            {
                "path": request.path,
                "in_scope": perrequest.in_request_scope(),
                "marker": perrequest.get("marker"),
                "lookup": lookup() if perrequest.in_request_scope() else None,
                "lookups": perrequest.get("lookups"),
                "exc": type(exc).__name__ if exc else None,
            }
        )

    @app.errorhandler(500)
    def _error(error: Exception) -> tuple[str, int]:
        marker_set = bool(perrequest.get("marker"))
        return f"500 in_scope={perrequest.in_request_scope()} marker_set={marker_set}", 500

    @app.get("/shared")
    def shared() -> dict[str, Any]:
        return {
            "before": g.before,
            "marker": perrequest.get("marker"),
            "before_lookup": g.before_lookup,
            "view_lookup": lookup(),
            "helper_lookup": helper(),
            "lookups": perrequest.get("lookups"),
            "max_entries": perrequest.current_store().max_entries,
            "thread": g.thread,
        }

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Iterator[str]:
            for n in range(3):
                yield _chunk_state(n)
            yield _line(g_before_lookup=g.before_lookup, arg=request.args.get("x"))

        response = Response(stream_with_context(body()), mimetype="application/x-ndjson")
        response.headers["X-Marker"] = perrequest.get("marker")
        response.headers["X-Lookup"] = lookup()
        return response

    @app.get("/stream-bare")
    def stream_bare() -> Response:
        def body() -> Iterator[str]:
            for n in range(3):
                yield _chunk_state(n)

        response = Response(body(), mimetype="application/x-ndjson")
        response.headers["X-Marker"] = perrequest.get("marker")
        response.headers["X-Lookup"] = lookup()
        return response

    @app.get("/slow")
    def slow() -> Response:
        def body() -> Iterator[bytes]:
            finished = False
            try:
                for _ in range(2000):  # bounded: at most about 10 s
                    assert perrequest.in_request_scope()
                    yield b"x" * 65536
                    time.sleep(0.005)
                finished = True
            finally:
                if not finished:
                    EVENTS["aborted"] += 1

        return Response(body(), mimetype="application/octet-stream")

    @app.get("/file")
    def file() -> Response:
        """send_file: Werkzeug hands the server's wsgi.file_wrapper through, if it has one."""
        return send_file(__file__, mimetype="text/plain")

    @app.get("/boom")
    def boom() -> str:
        raise Boom("the view failed")

    @app.get("/echo")
    def echo_view() -> dict[str, Any]:
        value = request.args["v"]
        before = perrequest.get("v")
        perrequest.set("v", value)
        time.sleep(0.002)
        return {"before": before, "seen": perrequest.get("v"), "memo": echo(value)}

    app.register_blueprint(async_views())

    @app.get("/_live")
    def live() -> dict[str, Any]:
        return {
            "live": live_scopes() - 1,  # this request's own scope is open
            "aborted": EVENTS["aborted"],
            "pid": os.getpid(),
            "teardowns": list(TEARDOWNS)[-20:],
        }

    return app


def _json(start_response: StartResponse, data: object) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(data).encode()]


def raw_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """No middleware: must never see a store, whatever ran before on this thread."""
    return _json(
        start_response,
        {
            "in_scope": perrequest.in_request_scope(),
            # Stricter than in_scope, which ignores a closed store: nothing is set at all.
            "var_set": _current.get() is not None,
            "leak": LEAK.get(),
            "thread": threading.get_ident(),
        },
    )


def leaky_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The trap, on purpose: ``ContextVar.set`` with no reset."""
    LEAK.set(uuid.uuid4().hex)
    return _json(start_response, {"thread": threading.get_ident()})


app = create_app()
dispatch = DispatcherMiddleware(app, {"/raw": raw_app, "/leaky": leaky_app})
