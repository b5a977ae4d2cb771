"""The WSGI and thread side, attacked as an adversarial user would, on real servers.

Bodies that fail in odd places, threads forked or pooled around a request's
store: after each, the server's thread holds no store and every scope is closed.
"""

from __future__ import annotations

import contextlib
import threading
import wsgiref.simple_server
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

import perrequest
from perrequest.scope import _current
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware

pytestmark = pytest.mark.timeout(60)

StartResponse = Callable[..., Any]


class _Quiet(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def log_exception(self, exc_info: Any) -> None:  # the server's own traceback print
        pass


class _QuietServer(wsgiref.simple_server.WSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def _raw(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    """No middleware: what perrequest's variable holds in the server's thread."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{perrequest.in_request_scope()} {perrequest.get('who')} {_current.get()!r}".encode()]


@contextmanager
def _wsgiref(app: Callable[..., Iterable[bytes]], requests: int) -> Iterator[str]:
    """wsgiref serving ``requests`` requests, one after the other in one thread (as a
    pooled thread would), ``/raw`` going to an app without the middleware."""

    def dispatch(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return (_raw if environ["PATH_INFO"] == "/raw" else app)(environ, start_response)

    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, dispatch, server_class=_QuietServer, handler_class=_Quiet
    )
    thread = threading.Thread(target=lambda: [server.handle_request() for _ in range(requests)])
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        thread.join(10)
        server.server_close()


class _CloseRaisesOnLookup:
    """A body whose ``close`` is a property that raises (a proxy over a gone resource)."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"alice's data"

    @property
    def close(self) -> Callable[[], None]:
        raise OSError("the resource behind this body is gone")


class _ClassRaises:
    """A body whose ``__class__`` raises: ``isinstance`` against the server's file
    wrapper looks it up."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"alice's data"

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise LookupError("no context for this proxy")


@pytest.mark.parametrize("body", [_CloseRaisesOnLookup, _ClassRaises], ids=["close", "class"])
def test_a_body_failing_on_attribute_lookup_leaves_nothing_in_the_server_thread(
    body: type,
) -> None:
    """The lookup of the body's ``close`` (or its class, for the file-wrapper check) raising
    left the request's scope open and active in the server's thread: the next request's
    code there, outside the middleware, ran in alice's scope and read her values."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Any:
        perrequest.set("who", "alice")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body()

    with _wsgiref(RequestScopeMiddleware(app), requests=2) as url:
        with contextlib.suppress(httpx.HTTPError):  # the server may cut the failed response
            httpx.get(f"{url}/alice", timeout=10)
        assert httpx.get(f"{url}/raw", timeout=10).text == "False None None"
    assert live_scopes() == 0
