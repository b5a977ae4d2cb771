"""WSGI middleware: one store per request, for Flask, Pyramid, Bottle or any WSGI app.

The store stays open until the server calls the body's ``close()`` (PEP
3333), and is active while the app runs, while each chunk is produced and
while the body closes (``ScopedBody``), never between: a streaming body and
the app's close hooks see it, the server's code and other requests' do not.
docs/frameworks/wsgi.md has the details.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._active import (
    REQUEST_KEY,
    OnClose,
    _current,
    check_options,
    close_request,
    forget_closed,
    open_request,
    opened_outside,
)
from ._checks import (
    IN_MIDDLEWARE,
    KEYWORD_ONLY,
    explains_options,
    is_async_callable,
    takes_a_request,
)
from .store import DEFAULT_MAX_ENTRIES

__all__ = ["RequestScopeMiddleware", "ScopedBody"]

_get, _set, _reset = _current.get, _current.set, _current.reset

# Typed loosely, as Werkzeug does, to accept apps typed with _typeshed.wsgi.
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class RequestScopeMiddleware:
    """Open a fresh store for each WSGI request; close it when the response is closed.

    Args:
        app: The WSGI application to wrap.
        max_entries: The bound of each store; ``None``: unbounded.
        on_close: Called with each store's ``ScopeStats`` as it closes.

    Raises:
        TypeError: An unknown option, an ``app`` that is not callable or is an
            ASGI app, or a bad value.
        ValueError: ``max_entries`` zero or negative.
    """

    __slots__ = ("_options", "app")
    sync_capable = async_capable = True  # read by Django only: see asgi.py

    @explains_options(
        "RequestScopeMiddleware()",
        misused=KEYWORD_ONLY.format(
            where="RequestScopeMiddleware(app, ...)", options="max_entries=..., on_close=..."
        ),
        missing="perrequest.wsgi.RequestScopeMiddleware needs the WSGI app it wraps: "
        "app = RequestScopeMiddleware(app, max_entries=...) (Flask: "
        "perrequest.flask.PerRequest(app, max_entries=...); Django: "
        "perrequest.django.RequestScopeMiddleware in MIDDLEWARE)",
    )
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
        calls = isinstance(app, type) and any("__call__" in vars(k) for k in app.__mro__)
        if calls and not hasattr(app, "__iter__"):  # (PEP 3333's iterable app classes run)
            raise TypeError(
                f"perrequest.wsgi.RequestScopeMiddleware wraps a WSGI app, not the class "
                f"{app.__qualname__}: its instances are the app. Pass one "
                f"({app.__qualname__}(__name__), for Flask)."
            )
        if takes_a_request(app):
            raise TypeError(
                f"perrequest.wsgi.RequestScopeMiddleware wraps a WSGI app, not {app!r}: "
                f"{IN_MIDDLEWARE}"
            )
        if is_async_callable(app):
            raise TypeError(
                f"perrequest.wsgi.RequestScopeMiddleware wraps a WSGI app, but {app!r} is an "
                "ASGI app (it is async): wrap it with perrequest.asgi.RequestScopeMiddleware "
                "instead (Starlette, FastAPI: app.add_middleware(RequestScopeMiddleware))"
            )
        self.app: WSGIApp = app
        self._options = check_options(
            "perrequest.wsgi.RequestScopeMiddleware", max_entries, on_close
        )

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if _get() is not None:
            if opened_outside(environ.get(REQUEST_KEY)):
                return self.app(environ, start_response)  # an outer perrequest layer's scope
            forget_closed()
        cell, token = open_request(self._options)
        environ[REQUEST_KEY] = cell
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None and not isinstance(wrapper, type):  # a function (uWSGI, meinheld)
            wrapper = environ["wsgi.file_wrapper"] = _FileWrapper(wrapper)
        try:
            body = self.app(environ, start_response)
            kind = type(body)  # the server's file wrapper is its own class: no isinstance
            if (
                kind is list
                or kind is tuple
                or kind is wrapper
                or (type(wrapper) is _FileWrapper and body is wrapper.made)
            ):
                # No app code runs later: end the scope now, and hand the body over as it
                # is (the server still sees a list's len(), and its sendfile wrapper).
                close_request(cell, token)
                return body
        except BaseException:
            close_request(cell, token)
            raise
        _reset(token)  # the thread as it was: the body makes the store active for each chunk
        return ScopedBody(body, cell)


class _FileWrapper:
    """A server's ``wsgi.file_wrapper`` that is a function, not a class (uWSGI's returns
    the file itself): what it made is handed back untouched, so the server sends the file
    its own way (sendfile) instead of reading it through a wrapped body."""

    __slots__ = ("made", "wrap")

    def __init__(self, wrap: Callable[..., Any]) -> None:
        self.wrap, self.made = wrap, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.made = self.wrap(*args, **kwargs)
        return self.made


_DONE: Iterator[bytes] = iter(())  # exhausted, and stays so: shared by every closed body


class ScopedBody:
    """A response body whose chunks, and ``close()``, are produced with its request's store
    active; its scope stays open until ``close()`` ends it (PEP 3333).

    Between chunks the thread holds what it held before, wherever the chunks are pulled: a
    server that interleaves requests in one thread (bjoern) or fetches chunks in pool
    threads (Tornado's ``WSGIContainer``) gives each chunk its own request's store and leaves
    none behind. It is its own iterator, so a layer's ``yield from`` that is closed closes
    it (PEP 380). A body never closed (against PEP 3333) ends its scope, only, when freed.
    Public so that code that drives a WSGI app by hand can recognise it.

    Args:
        body: The app's response iterable.
        cell: The request's scope, as ``open_request`` opened it, still open.
    """

    __slots__ = ("_active", "_body", "_cell", "_chunks")

    def __init__(self, body: Iterable[bytes], cell: list[Any]) -> None:
        self._body = body
        self._cell: list[Any] | None = cell
        self._active: Any = cell  # or a request_scope() the body holds open across its yields
        self._chunks: Iterator[bytes] | None = None

    def __iter__(self) -> ScopedBody:
        return self

    def __next__(self) -> bytes:
        token = _set(self._active)
        try:
            if self._chunks is None:
                self._chunks = iter(self._body)
            return next(self._chunks)
        finally:
            self._active = _get()
            _reset(token)
            del self  # not held by an error's traceback (this frame): freed, it ends its scope

    def close(self) -> None:
        """Close the body with the scope active, then end the scope."""
        cell, self._cell = self._cell, None
        if cell is None:
            return
        token = _set(self._active)
        try:
            close = getattr(self._body, "close", None)  # a property may raise: in the try
            if close is not None:
                close()
        finally:
            # Nothing more to produce: the body (and its iterator, which may be itself) is
            # freed in its scope.
            self._chunks = self._body = _DONE
            _reset(token)
            close_request(cell, None)

    def __del__(self) -> None:
        cell, self._cell = self._cell, None
        if cell is None:
            return
        # The scope only: the app's close hooks never ran, as without perrequest. With its
        # own scope set (closed first), the body's cleanup (a generator's ``finally``)
        # touches nobody's store, not what is active where it was dropped.
        token = _set(cell)
        try:
            close_request(cell, None)
            del self._body, self._chunks, self._active
        finally:
            _reset(token)
