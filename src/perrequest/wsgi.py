"""WSGI middleware: one store per request, for Flask, Pyramid, Bottle or any WSGI app.

The store is active while the app is called and while each chunk of its body
is produced, so a lazy or streaming body (a generator, Flask's
``stream_with_context``) still sees it. It closes when the server calls
``close()`` on the response (PEP 3333: also when the client went away
mid-body), or when the app raises. A list, a tuple or the server's
``wsgi.file_wrapper`` runs none of the app's code later: the scope closes as
the app returns and the body is passed on untouched. The ContextVar is
reset before control returns to the server, so a pooled worker thread
(gunicorn ``gthread``) never carries a store into its next request.

Any WSGI app: ``app = RequestScopeMiddleware(app)``. Flask: ``perrequest.flask.PerRequest``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._checks import check_max_entries, check_on_close, unknown_option
from .scope import (
    REQUEST_KEY,
    OnClose,
    _current,
    close_scope,
    leave_scope,
    open_scope,
    opened_outside,
)
from .store import DEFAULT_MAX_ENTRIES, MemoStore

__all__ = ["RequestScopeMiddleware", "ScopedBody"]

# Typed loosely, as Werkzeug does, so that apps typed with _typeshed.wsgi or
# with plain dicts and callables are all accepted.
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
_OPTIONS = ("max_entries", "on_close")


class RequestScopeMiddleware:
    """Open a fresh store for each WSGI request; close it when the response is closed.

    Closing clears the store, logs its stats at DEBUG on the ``perrequest``
    logger and calls ``on_close(stats)`` (an exception there is logged, never
    raised into the server).

    Args:
        app: The WSGI application to wrap.
        max_entries: The bound of each store; ``None``: unbounded.
        on_close: Called with each store's ``ScopeStats`` as it closes.

    Raises:
        TypeError: An unknown option (naming the closest valid one), an
            ``app`` that is not callable, or a bad value.
        ValueError: ``max_entries`` zero or negative.
    """

    __slots__ = ("_max_entries", "_on_close", "app")

    def __init__(
        self,
        app: WSGIApp,
        *,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        on_close: OnClose | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise TypeError(
                unknown_option("RequestScopeMiddleware()", next(iter(unknown)), _OPTIONS)
            )
        if not callable(app):
            raise TypeError(
                f"RequestScopeMiddleware wraps a WSGI app (a callable taking environ and "
                f"start_response), not {type(app).__name__} {app!r}"
            )
        self.app = app
        self._max_entries = check_max_entries(max_entries)
        self._on_close = check_on_close(on_close)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if opened_outside(environ):
            return self.app(environ, start_response)  # an outer perrequest layer's scope
        store = environ[REQUEST_KEY] = open_scope(self._max_entries, self._on_close)
        try:
            body = self.app(environ, start_response)
        except BaseException:
            close_scope(store)
            raise
        leave_scope(store)  # the server's thread holds no store between the steps
        wrapper = environ.get("wsgi.file_wrapper")
        if type(body) in (list, tuple) or (isinstance(wrapper, type) and isinstance(body, wrapper)):
            # Nothing of the app's runs later: end the scope now, and hand the body
            # over as it is (the server still sees a list's len(), and its own file
            # wrapper, which it serves with sendfile).
            close_scope(store)
            return body
        return ScopedBody(body, store)


class ScopedBody:
    """A response body produced with its scope active; ``close()`` ends the scope.

    Each chunk is produced, and the body's own ``close`` run, with the store
    made active around it, in whatever thread the server does it; between
    them the server's thread holds no store. A body the server never closes
    (against PEP 3333) ends its scope when it is garbage collected, and only
    the scope: the app's own close hooks (Flask's ``call_on_close``, a
    generator's ``finally``) run as they would have without perrequest, which
    is not at all.

    Returned by ``RequestScopeMiddleware``; public so that code that drives a
    WSGI app by hand can recognise it.

    Args:
        body: The app's response iterable.
        store: The request's store, still open.
    """

    __slots__ = ("_body", "_chunks", "_store")

    def __init__(self, body: Iterable[bytes], store: MemoStore) -> None:
        self._body = body
        self._store: MemoStore | None = store
        self._chunks: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        store = self._store
        return iter(()) if store is None else _produce(self._body, store, self)

    def __next__(self) -> bytes:  # for callers that treat the body as an iterator
        if self._chunks is None:  # no reference to self: no cycle
            store = self._store
            self._chunks = iter(()) if store is None else _produce(self._body, store, None)
        return next(self._chunks)

    def close(self) -> None:
        """Close the body with the scope active, then end the scope."""
        store, self._store = self._store, None
        if store is None:
            return
        close = getattr(self._body, "close", None)
        try:
            if close is not None:
                token = _current.set(store)
                try:
                    close()
                finally:
                    _current.reset(token)
        finally:
            close_scope(store)

    def __del__(self) -> None:
        if self._store is not None:
            close_scope(self._store)


def _produce(body: Iterable[bytes], store: MemoStore, keep: ScopedBody | None) -> Iterator[bytes]:
    """The chunks of ``body``, each produced with ``store`` active.

    A generator, because resuming one costs less than a call to ``__next__``.
    It holds ``keep`` (the ``ScopedBody``), so that a server holding only the
    iterator keeps the scope open; the body does not hold the generator, so
    there is no reference cycle.
    """
    set_store, reset = _current.set, _current.reset
    iterator = None
    while True:
        token = set_store(store)
        try:
            if iterator is None:
                iterator = iter(body)
            chunk = next(iterator)
        except StopIteration:
            return
        finally:
            reset(token)
        yield chunk
