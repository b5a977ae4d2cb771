"""Guards of the HTTP integrations (asgi, wsgi, flask) that no other test needed: each test
here fails with its guard deleted (a block-deletion mutation pass, 6 December 2026)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import perrequest
from perrequest import request_scope
from perrequest._active import _current
from perrequest.asgi import RequestScopeMiddleware as ASGIMiddleware
from perrequest.wsgi import RequestScopeMiddleware


def _environ() -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"}


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    pass


def _in_a_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a new thread, which starts with nothing set: as a server's thread."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join(10)
    return result[0]


def test_a_body_iterated_in_another_context_leaves_no_closed_scope_where_closed() -> None:
    """wsgi.ScopedBody.close: ``if token is not None and _get() is not None: forget_closed()``.
    A server takes the iterator (``iter(body)``) in one context and pulls the chunks and
    closes the body in another (its thread's own). The body's generator holds a
    ``request_scope()`` across its yields, so that scope is set in the thread's context,
    and closing the body mid-stream closes it where it is not active: it cannot reset
    itself, and the ScopedBody's token (of the other context) cannot reset either.
    Unguarded, the thread is left with the closed scope set, which the next request on
    the thread would carry (and give back)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [])
        with request_scope():
            yield b"a"
            yield b"b"

    def serve() -> object:
        body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
        chunks = contextvars.copy_context().run(iter, body)
        assert next(chunks) == b"a"
        body.close()  # the client left mid-body
        return _current.get()

    assert _in_a_thread(serve) is None


class _Chunks:
    """A body of the app's own whose iterator is a generator apart from it (a class with
    ``__iter__``, without ``close``), recording what is active as that generator ends."""

    def __init__(self) -> None:
        self.active_at_cleanup: list[object] = []

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield b"a"
            yield b"b"
        finally:
            self.active_at_cleanup.append(_current.get())


def test_an_abandoned_chunk_iterator_is_freed_with_its_own_scope_active() -> None:
    """wsgi.ScopedBody.close: the body's iterator is dropped (``self._chunks = _DONE``)
    while the request's own scope is still set. The body is fetched where another scope is
    active (a request calling a wrapped app in-process), chunk by chunk. The body's
    iterator is referenced only by the ScopedBody, so it is freed as close() drops it: its
    cleanup must run in its own scope, not in the caller's. Unguarded (dropped before the
    store is set, or after the reset), it runs in the caller's scope."""
    chunks = _Chunks()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> _Chunks:
        start_response("200 OK", [])
        return chunks

    with request_scope() as outer:
        body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
        fetched = iter(body)
        assert next(fetched) == b"a"
        body.close()
        del fetched  # the caller drops the generator: its finally frees the iterator
        assert _current.get() is outer
    assert len(chunks.active_at_cleanup) == 1
    assert chunks.active_at_cleanup[0] is not outer


async def test_a_scope_let_through_does_not_name_itself_to_its_caller_once_returned() -> None:
    """asgi.RequestScopeMiddleware.__call__: ``passed_through.reset(passing)`` as a scope it
    lets through (a "lifespan", or a "websocket" not in scope_types) returns. The caller,
    which called the app in-process in the same task, is no longer in that scope: its own
    errors must give the plain hint, not the lifespan's. Unguarded, the mark stays set in
    the caller's context, and its errors say it runs in the ASGI lifespan. (The message
    alone depends on it.)"""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"

    await ASGIMiddleware(app)({"type": "lifespan"}, None, None)
    with pytest.raises(perrequest.NoActiveScope) as raised:
        perrequest.current_store()
    assert "lifespan" not in str(raised.value)
