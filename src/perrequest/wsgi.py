"""WSGI middleware: one store per request, for Flask, Pyramid, Bottle or any WSGI app.

The store is active while the app is called and, through ``ScopedBody``, while
each chunk of its body is produced, so a lazy or streaming body (a generator,
Flask's ``stream_with_context``) still sees it. It closes when the server
calls ``close()`` on the response (PEP 3333: also when the client went away
mid-body), or when the app raises. A body that is a list or tuple, or the
server's ``wsgi.file_wrapper``, runs none of the app's code later: the scope
closes as the app returns, and the body is passed on untouched. The
ContextVar is reset before control returns to the server, so a pooled
worker thread (gunicorn ``gthread``) never carries a store into its next
request.

Any WSGI app: ``app = RequestScopeMiddleware(app)``. Flask: ``perrequest.flask.PerRequest``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._lifecycle import (
    REQUEST_KEY,
    OnClose,
    ScopedBody,
    check_on_close,
    close_in_scope,
    close_scope,
    end_scope,
    leave_scope,
    open_scope,
    opened_outside,
)
from .store import DEFAULT_MAX_ENTRIES, check_max_entries

__all__ = ["RequestScopeMiddleware"]

# Typed loosely, as Werkzeug does, so that apps typed with _typeshed.wsgi or
# with plain dicts and callables are all accepted.
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class RequestScopeMiddleware:
    """Open a fresh store for each WSGI request; close it when the response is closed.

    Closing clears the store, logs its stats at DEBUG on the ``perrequest``
    logger and calls ``on_close(stats)`` (an exception there is logged, never
    raised into the server).
    """

    __slots__ = ("_max_entries", "_on_close", "app")

    def __init__(
        self,
        app: WSGIApp,
        *,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        on_close: OnClose | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"RequestScopeMiddleware wraps a WSGI app (a callable taking environ and "
                f"start_response), not {type(app).__name__} {app!r}"
            )
        self.app = app
        self._max_entries = check_max_entries(max_entries)
        self._on_close = check_on_close(on_close)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if (outer := environ.get(REQUEST_KEY)) is not None and opened_outside(outer):
            return self.app(environ, start_response)  # an outer perrequest layer's scope
        store = environ[REQUEST_KEY] = open_scope(self._max_entries, self._on_close)
        try:
            body = self.app(environ, start_response)
        except BaseException:
            end_scope(store)
            raise
        leave_scope(store)
        if type(body) in (list, tuple):
            # Nothing of the app's runs after it returned a list: end the scope now,
            # and hand the list over, so that the server still sees its len().
            close_scope(store)
            return body
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(body, wrapper) and close_in_scope(body, store):
            return body  # the server keeps its file wrapper, and sendfile
        return ScopedBody(body, store)
