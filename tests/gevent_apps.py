"""A Flask app and a Django app for gunicorn's gevent worker (tests/test_gevent.py).

gunicorn imports this module in its worker, after gevent's monkey-patching; with
``--preload``, in the master before it (perrequest then binds the unpatched
``threading.get_ident``). Every view yields to other greenlets (``gevent.sleep``,
socket I/O) between storing a request's own value and reading it back, and reports
what it saw; ``/raw`` (no middleware) reports what the greenlet holds of perrequest's
variable; ``/live`` the scopes open in the worker.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import gevent.monkey
from flask import Flask, Response, request, stream_with_context

import perrequest
from perrequest import bind_scope, request_memo
from perrequest.flask import PerRequest
from perrequest.scope import _current
from perrequest.testing import live_scopes

StartResponse = Callable[..., Any]
EVENTS = {"aborted": 0, "computed": 0}
"""Streams closed before their end (a client went away); computations of ``shared``."""


def _value() -> str:
    """This request's value, stored and then read back across greenlet switches."""
    return str(perrequest.get("value"))


@request_memo
def memo() -> str:
    """Request-specific through the store, not its arguments: a leak would show."""
    gevent.sleep(0.001)
    return _value()


@request_memo
def shared(key: str) -> str:
    """Asked for by several greenlets of a request at once; slow, so that they overlap."""
    EVENTS["computed"] += 1
    perrequest.set("computed", perrequest.get("computed", 0) + 1)
    gevent.sleep(0.05)
    return f"{key}:{_value()}"


def _socket_io() -> None:
    """Block on a socket that another greenlet writes to later: the hub switches away."""
    left, right = socket.socketpair()
    try:
        gevent.spawn_later(0.002, right.sendall, b"x")
        assert left.recv(1) == b"x"
    finally:
        left.close()
        right.close()


def echo(value: str, sleep: str = "0.001") -> dict[str, Any]:
    before = perrequest.get("value")
    perrequest.set("value", value)
    gevent.sleep(float(sleep))
    _socket_io()
    time.sleep(0.001)  # patched: a switch too
    return {"before": before, "seen": _value(), "memo": memo(), "pid": os.getpid()}


def fanout(value: str, n: int) -> dict[str, Any]:
    """``n`` greenlets, bound to this request's scope, ask for one key at once."""
    perrequest.set("value", value)
    greenlets = [gevent.spawn(bind_scope(shared), "k") for _ in range(n)]
    done = gevent.joinall(greenlets, timeout=10)
    return {
        "done": len(done),
        "values": [g.value for g in greenlets],
        "computed": perrequest.get("computed"),
    }


def _stream(value: str, chunks: int) -> Iterator[str]:
    done = False
    try:
        for i in range(chunks):
            gevent.sleep(0.001)
            yield json.dumps({"i": i, "seen": _value(), "memo": memo()}) + "\n" + " " * 4096
        done = True
    finally:
        EVENTS["aborted"] += not done


def live() -> dict[str, Any]:
    own = 1 if perrequest.in_request_scope() else 0
    return {"live": live_scopes() - own, "pid": os.getpid(), **EVENTS}


def raw_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """No middleware: what perrequest's variable holds in this greenlet."""
    start_response("200 OK", [("Content-Type", "application/json")])
    held = _current.get()
    body = {"in_scope": perrequest.in_request_scope(), "held": None if held is None else "set"}
    return [json.dumps(body).encode()]


def _dispatch(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def dispatch(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return (raw_app if environ["PATH_INFO"] == "/raw" else app)(environ, start_response)

    return dispatch


# -- Flask --------------------------------------------------------------------------------

flask_app = Flask(__name__)
PerRequest(flask_app)


@flask_app.get("/echo")
def _flask_echo() -> dict[str, Any]:
    return echo(request.args["v"], request.args.get("s", "0.001"))


@flask_app.get("/fanout")
def _flask_fanout() -> dict[str, Any]:
    return fanout(request.args["v"], int(request.args.get("n", "5")))


@flask_app.get("/stream")
def _flask_stream() -> Response:
    perrequest.set("value", request.args["v"])
    body = _stream(request.args["v"], int(request.args.get("chunks", "5")))
    return Response(stream_with_context(body), mimetype="application/x-ndjson")


@flask_app.get("/block")
def _flask_block() -> dict[str, Any]:
    """Block the worker's only thread (the unpatched sleep): gunicorn's ``--timeout`` kills it."""
    perrequest.set("value", "blocked")
    gevent.monkey.get_original("time", "sleep")(float(request.args["s"]))
    return {"seen": _value()}


@flask_app.get("/live")
def _flask_live() -> dict[str, Any]:
    return live()


flask_application = _dispatch(flask_app.wsgi_app)


# -- Django (configured only when gunicorn asks for it) ------------------------------------

urlpatterns: list[Any] = []


def _django() -> Callable[..., Iterable[bytes]]:
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application
    from django.http import JsonResponse, StreamingHttpResponse
    from django.urls import path

    settings.configure(
        DEBUG=False,
        SECRET_KEY="test",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],
        INSTALLED_APPS=[],
        USE_TZ=True,
    )

    def stream(req: Any) -> StreamingHttpResponse:
        perrequest.set("value", req.GET["v"])
        body = _stream(req.GET["v"], int(req.GET.get("chunks", "5")))
        return StreamingHttpResponse(body, content_type="application/x-ndjson")

    urlpatterns[:] = [
        path("echo", lambda req: JsonResponse(echo(req.GET["v"], req.GET.get("s", "0.001")))),
        path("fanout", lambda req: JsonResponse(fanout(req.GET["v"], int(req.GET["n"])))),
        path("stream", stream),
        path("live", lambda req: JsonResponse(live())),
    ]
    return _dispatch(get_wsgi_application())


def __getattr__(name: str) -> Any:
    if name == "django_application":
        app = globals()["django_application"] = _django()
        return app
    raise AttributeError(name)
