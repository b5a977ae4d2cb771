"""WSGI middleware: one store per request, for Flask, Pyramid, Bottle or any WSGI app.

The store stays open until the server calls the body's ``close()`` (PEP
3333), so a streaming body and the app's close hooks still see it; the
calling thread gets back what it had as the app returns (``ScopedBody``).
docs/frameworks/wsgi.md has the details.
"""

from __future__ import annotations

import weakref

# In asyncio.__all__ (for event loops): None at once where no loop runs, unlike the public
# get_running_loop, which raises there (a WSGI server's thread: every request).
from asyncio import _get_running_loop
from collections.abc import Callable, Iterable, Iterator
from contextvars import Token
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
    within_request,
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

_get, _set = _current.get, _current.set

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
        _current.reset(token)  # the thread as it was; iterating makes the store active
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


class ScopedBody:
    """A response body whose scope stays open until ``close()`` ends it.

    Iterated where nothing is active (a server's thread), it makes the store
    active there until ``close()``; anywhere else (where a scope is active,
    or on a running event loop, which may fetch the chunks in other threads,
    as Tornado's ``WSGIContainer`` does) each chunk, and the body's own
    ``close``, is produced with the store active around it. A body never
    closed (against PEP 3333) ends its scope, only, when it is collected.
    Public so that code that drives a WSGI app by hand can recognise it.

    Args:
        body: The app's response iterable.
        cell: The request's scope, as ``open_request`` opened it, still open.
    """

    __slots__ = ("_body", "_cell", "_chunks", "_token")

    def __init__(self, body: Iterable[bytes], cell: list[Any]) -> None:
        self._body = body
        self._cell: list[Any] | None = cell  # _active.open_request's
        self._token: Token[Any] | None = None  # while iteration keeps the store active
        self._chunks: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        if _get_running_loop() is not None:  # a loop that may fetch each chunk elsewhere
            return self._start(self)
        # Else decided at the first chunk, in the thread that pulls it: a layer may call
        # iter() in the thread that called the app and serve the chunks from another
        # (werkzeug's ClosingIterator calls iter() as it wraps the body).
        held: list[Any] = []  # a weak reference to the iterator: alive, unless finalized
        chunks = _first_chunk(self, held)
        held.append(weakref.ref(chunks))
        return chunks

    def __next__(self) -> bytes:  # for callers that treat the body as an iterator
        if self._chunks is None:
            self._chunks = self._start(None)  # no reference to self: no cycle
        try:
            return next(self._chunks)
        except StopIteration:
            raise
        except BaseException:
            if self._token is not None and self._cell is not None:  # a caller going on
                self._chunks = _produce(self._chunks, self._cell, None)  # gets chunk by chunk
            self._restore()
            raise

    def _restore(self) -> None:
        """A chunk failed: give the thread back now, not when the body is freed (the error,
        kept by a server or a reporter, holds this body in a traceback's frame a while);
        close(), if it comes, still closes the body in the scope, and ends the scope."""
        token, self._token = self._token, None
        if token is not None:
            try:
                _current.reset(token)
            except ValueError:  # set in another thread, which pulled the first chunk
                self._token = token

    def _start(self, keep: ScopedBody | None) -> Iterator[bytes]:
        cell = self._cell
        if cell is None:
            return iter(())
        # Nothing active here, and no loop that may fetch the chunks in other threads
        # (Tornado's WSGIContainer): the store stays active here until close() resets it.
        if self._token is None and _get() is None and _get_running_loop() is None:
            self._token = _set(cell)
            try:
                return iter(self._body)
            except BaseException:
                self._restore()
                raise
        return _produce(self._body, cell, keep)

    def close(self) -> None:
        """Close the body with the scope active, then end the scope."""
        cell, self._cell = self._cell, None
        if cell is None:
            return
        token, self._token = self._token, None
        active = _get()  # this request's; or a scope the body holds open: its own
        mine = active is cell or (len(cell) > 1 and active is cell[1]) or within_request(cell)
        if not mine:  # closed during a later request here (a layer's finalizer): its token
            token = None  # would unset that one's store
        try:
            close = getattr(self._body, "close", None)  # a property may raise: in the try
            if close is not None:
                if mine:
                    close()
                else:
                    active = _set(cell)
                    try:
                        close()
                    finally:
                        _current.reset(active)
        finally:
            close_request(cell, token)
            if _get() is not None:
                # A scope the body opened across its yields, just closed, that it could not
                # reset; an earlier request's, closed while this one ran (its token unused)
                forget_closed()

    def __del__(self) -> None:
        cell = self._cell
        if cell is None:
            return
        # Its token rewinds this thread only while the request's scope is what is active
        # here: freed by a layer during a later request, it would unset that one's store.
        close_request(cell, self._token if within_request(cell) else None)
        # Freed with its own closed scope active, the body's cleanup (a generator's
        # ``finally``) touches nobody's store, not what is active where it was dropped.
        active = _set(cell)
        try:
            del self._body
        finally:
            _current.reset(active)


def _first_chunk(body: ScopedBody, held: list[Any]) -> Iterator[bytes]:
    """``body._start`` where the first chunk is pulled. Not ``yield from``: closing this
    generator would close the body's iterator, outside close() and its scope."""
    try:
        for chunk in body._start(body):  # noqa: UP028
            yield chunk
    except GeneratorExit:  # not a failure: dropped, or closed by a layer above
        # Closed (its weak reference alive, as it is not when it is finalized, collected
        # or dropped) by a layer's ``yield from`` being closed: the response too, as a
        # generator body or werkzeug's ClosingIterator (whose iter() is itself) would be.
        if held[0]() is not None:
            body.close()
        raise
    except BaseException:
        body._restore()
        del body  # not held by the error's traceback (this frame): freed, it ends its scope
        raise


def _produce(body: Iterable[bytes], active: Any, keep: ScopedBody | None) -> Iterator[bytes]:
    """The chunks of ``body``, each produced with ``active`` (a scope's cell) active.

    A generator: resuming one costs less than a call to ``__next__``. It holds
    ``keep`` (the ``ScopedBody``) so that a server holding only the iterator
    keeps the scope open; nothing holds the generator back, so no cycle.
    """
    set_store, reset = _current.set, _current.reset
    iterator = None
    try:
        while True:
            token = set_store(active)
            try:
                if iterator is None:
                    iterator = iter(body)
                chunk = next(iterator)
            except StopIteration:
                return
            finally:
                active = _get()  # a request_scope() the body holds across its yields
                reset(token)
            yield chunk
    finally:
        token = set_store(active)
        try:
            del body, iterator, keep
        finally:
            reset(token)
