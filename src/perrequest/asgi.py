"""ASGI middleware: one store per request, for Starlette, FastAPI and any ASGI app.

Pure ASGI on purpose: ``BaseHTTPMiddleware`` runs the app in another task,
where a store set is invisible outside it. Setting the ContextVar in the
task that runs the app shows the store to everything the app runs before it
returns (docs/frameworks/asgi.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from ._active import (
    REQUEST_KEY,
    OnClose,
    _current,
    check_options,
    close_request,
    forget_closed,
    open_request,
    opened_by_a_middleware,
    opened_outside,
)
from ._checks import (
    IN_MIDDLEWARE,
    KEYWORD_ONLY,
    binds,
    explains_options,
    is_wsgi_app,
    takes_a_request,
)
from .scope import passed_through
from .store import DEFAULT_MAX_ENTRIES

__all__ = ["RequestScopeMiddleware"]

# Typed loosely, as Starlette does, to accept apps typed with asgiref's TypedDicts.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

_get = _current.get
_SCOPE_TYPES = ("http", "websocket")


def _check_scope_types(scope_types: object) -> frozenset[str]:
    """Validate ``scope_types``: a collection of "http" and/or "websocket"."""
    if isinstance(scope_types, str) or not isinstance(scope_types, (tuple, list, set, frozenset)):
        raise TypeError(
            f"scope_types must be a tuple of scope type names such as ('http', 'websocket'), "
            f"not {type(scope_types).__name__} {scope_types!r}"
        )
    if not scope_types:
        raise ValueError(
            "scope_types is empty, so the middleware would never open a store; "
            "use ('http',) or ('http', 'websocket')"
        )
    for kind in scope_types:
        if not isinstance(kind, str):
            raise TypeError(
                f"scope_types must contain strings ('http', 'websocket'), "
                f"not {type(kind).__name__} {kind!r}"
            )
        if kind == "lifespan":
            raise ValueError(
                "scope_types cannot include 'lifespan': the lifespan scope lasts as long as "
                "the process, so a store opened for it would be the process-lifetime cache "
                "this library exists to prevent. Use 'http' and/or 'websocket'."
            )
        if kind not in _SCOPE_TYPES:
            raise ValueError(
                f"unknown scope type {kind!r} in scope_types; use 'http' and/or 'websocket'"
            )
    return frozenset(scope_types)


def _is_asgi2_app(app: object) -> bool:
    """ASGI 2's double callable, told as servers tell it: a class that is not awaitable (its
    instance, made from the scope, takes receive and send), or a sync function of one
    argument. Anything else may be ASGI 3, and is let through."""
    if inspect.isclass(app):
        return not hasattr(app, "__await__")
    if not inspect.isfunction(app) or inspect.iscoroutinefunction(app):
        return False
    # Taking three: a sync wrapper returning the coroutine, ASGI 3.
    return binds(app, 1) and not binds(app, 3)


class RequestScopeMiddleware:
    """Open a fresh store for each ASGI scope whose type is in ``scope_types``.

    The store closes when the app returns, also on errors, disconnects and
    cancellation; a ``websocket`` scope keeps its store for the connection's
    whole life. Other scopes (``lifespan``) pass straight through.

    Args:
        app: The ASGI 3 application to wrap.
        max_entries: The bound of each store; ``None``: unbounded.
        scope_types: The ASGI scope types that get a store: ``"http"``
            and/or ``"websocket"``.
        on_close: Called with each store's ``ScopeStats`` as it closes.

    Raises:
        TypeError: An unknown option (with ``add_middleware``, raised when
            Starlette builds the stack), an ``app`` that is not callable or
            is a WSGI app, or a bad value.
        ValueError: ``max_entries`` not positive, ``scope_types`` empty or
            listing ``"lifespan"`` or an unknown type.
    """

    __slots__ = ("_options", "_scope_types", "app")
    # Read by Django only: listed in MIDDLEWARE by mistake, it gets get_response unadapted,
    # so that it can tell (takes_a_request) and name the Django middleware.
    sync_capable = async_capable = True

    @explains_options(
        "RequestScopeMiddleware()",
        hint=" (Starlette and FastAPI pass the options of app.add_middleware("
        "RequestScopeMiddleware, ...) on when they build the middleware stack, at startup or "
        "on the first request: the typo is in that call.)",
        misused=KEYWORD_ONLY.format(
            where="RequestScopeMiddleware(app, ...)",
            options="max_entries=..., scope_types=..., on_close=...",
        )
        + " (Starlette and FastAPI: add it with app.add_middleware(RequestScopeMiddleware, "
        "...), not with app.middleware('http'), which takes a function of request and "
        "call_next)",
        missing="perrequest.asgi.RequestScopeMiddleware needs the ASGI app it wraps: "
        "RequestScopeMiddleware(app, max_entries=...); with Starlette and FastAPI, pass the "
        "class and its options, app.add_middleware(RequestScopeMiddleware, max_entries=...), "
        "not an instance: Starlette makes it, with the app",
    )
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        scope_types: tuple[str, ...] | list[str] | set[str] | frozenset[str] = ("http",),
        on_close: OnClose | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"RequestScopeMiddleware wraps an ASGI app (an async callable taking "
                f"scope, receive, send), not {type(app).__name__} {app!r}"
            )
        if takes_a_request(app):
            raise TypeError(
                f"perrequest.asgi.RequestScopeMiddleware wraps an ASGI app, not {app!r}: "
                f"{IN_MIDDLEWARE}"
            )
        if is_wsgi_app(app):
            raise TypeError(
                f"perrequest.asgi.RequestScopeMiddleware wraps an ASGI app, but {app!r} is a "
                "WSGI app (it takes environ and start_response): wrap it with "
                "perrequest.wsgi.RequestScopeMiddleware instead (Flask: "
                "perrequest.flask.PerRequest(app); Django: "
                "perrequest.django.RequestScopeMiddleware in MIDDLEWARE)"
            )
        if _is_asgi2_app(app):
            raise TypeError(
                f"RequestScopeMiddleware wraps an ASGI 3 app (an async callable taking scope, "
                f"receive, send), but {app!r} is an ASGI 2 app (called with the scope alone, "
                "it returns what takes receive and send): wrap it first, "
                "RequestScopeMiddleware(asgiref.compatibility.guarantee_single_callable(app))"
            )
        self.app: ASGIApp = app
        self._options = check_options(
            "perrequest.asgi.RequestScopeMiddleware", max_entries, on_close
        )
        self._scope_types = _check_scope_types(scope_types)

    # Any, as the app it wraps: code typed with Starlette's scope and with asgiref's
    # TypedDicts (hypercorn's serve(), asgiref.typing.ASGI3Application) both take it.
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if _get() is not None:  # a scope is active where this request starts
            if REQUEST_KEY not in scope:
                forget_closed()
                if opened_by_a_middleware():
                    # Another request's scope: one that calls this app in-process, or one
                    # whose context the server copied into this request's task (uvicorn;
                    # see docs/security.md). Hidden while this request runs, given back.
                    hidden = _current.set(None)
                    try:
                        await self(scope, receive, send)
                    finally:
                        _current.reset(hidden)
                    return
            elif opened_outside(scope[REQUEST_KEY]):  # an outer layer's, for this request
                await self.app(scope, receive, send)
                return
            else:  # a request_scope() on it (around an in-process call): a scope of its own,
                # in a copy, so that the request's own dict keeps its mark for later copies
                # (the caller's, which concurrent calls share: nothing to give back)
                await self({k: v for k, v in scope.items() if k != REQUEST_KEY}, receive, send)
                return
        if scope["type"] not in self._scope_types:  # no store: errors there say why
            passing = passed_through.set(scope["type"])
            try:
                await self.app(scope, receive, send)
            finally:
                passed_through.reset(passing)
            return
        cell, token = open_request(self._options)
        scope[REQUEST_KEY] = cell
        try:
            await self.app(scope, receive, send)
        finally:
            close_request(cell, token)
