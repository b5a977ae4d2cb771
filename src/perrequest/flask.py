"""Flask extension: one store per request, through the WSGI middleware.

It wraps ``app.wsgi_app``, not ``before_request``/``teardown_request`` hooks,
so that everything Flask runs for a request, the streamed body included, sees
one store (docs/frameworks/flask.md).
"""

from __future__ import annotations

from typing import Never

try:
    from flask import Blueprint, Flask
except ImportError as exc:  # name the extra to install
    from ._extras import missing_extra

    missing_extra(exc, __name__, "flask", "flask")

from ._active import OnClose, check_options
from ._checks import (
    IN_MIDDLEWARE,
    KEYWORD_ONLY,
    explains_options,
    is_async_callable,
    takes_a_request,
)
from .store import DEFAULT_MAX_ENTRIES
from .wsgi import RequestScopeMiddleware

__all__ = ["EXTENSION_KEY", "PerRequest"]

EXTENSION_KEY = "perrequest"
"""Where the extension registers itself: ``app.extensions["perrequest"]``."""


class PerRequest:
    """Give every request of a Flask app its own perrequest store.

    The options are ``RequestScopeMiddleware``'s, validated here so that a
    typo fails at import time, not on the first request.

    Args:
        app: A Flask app to register on now; or call ``init_app`` later, in an
            application factory (one extension can serve several apps).
        max_entries: The bound of each request's store; ``None``: unbounded.
        on_close: Called with each store's ``ScopeStats`` as it closes.

    Raises:
        TypeError: An unknown option or a bad value.
        ValueError: ``max_entries`` zero or negative.
    """

    __slots__ = ("_max_entries", "_on_close")
    # Read by Django only: listed in MIDDLEWARE by mistake, it gets get_response unadapted
    # (under ASGI too), so that init_app can tell and name the Django middleware.
    sync_capable = async_capable = True

    @explains_options(
        "PerRequest()",
        misused=KEYWORD_ONLY.format(
            where="PerRequest(app, ...)", options="max_entries=..., on_close=..."
        ),
    )
    def __init__(
        self,
        app: Flask | None = None,
        *,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        on_close: OnClose | None = None,
    ) -> None:
        self._max_entries, self._on_close = check_options("PerRequest", max_entries, on_close)
        if app is not None:
            self.init_app(app)

    @property
    def max_entries(self) -> int | None:
        """The bound of each request's store."""
        return self._max_entries

    def init_app(self, app: Flask, **options: Never) -> None:
        """Wrap ``app.wsgi_app`` with the middleware; register as ``app.extensions["perrequest"]``.

        Refuses an app that has the extension: wrapping twice would hide a store.

        Args:
            app: The Flask app.
            options: None: the options are the extension's, ``PerRequest(max_entries=...)``
                (a habit of other extensions' ``init_app``, refused with that fix).

        Raises:
            TypeError: ``app`` is not a Flask app (wrap other WSGI apps with
                ``perrequest.wsgi.RequestScopeMiddleware``), or an option is given.
            RuntimeError: The app already has the extension.
        """
        if options:
            raise TypeError(
                f"PerRequest.init_app() takes the app alone, not {next(iter(options))}=...: "
                "the options are the extension's, given when it is made: "
                "PerRequest(max_entries=..., on_close=...), then init_app(app)"
            )
        if not isinstance(app, Flask):
            if takes_a_request(app):  # in Django's MIDDLEWARE: get_response
                fix = IN_MIDDLEWARE
            elif is_async_callable(app):
                fix = (
                    "for an ASGI app (FastAPI, Starlette) use perrequest.asgi."
                    "RequestScopeMiddleware: app.add_middleware(RequestScopeMiddleware)"
                )
            elif isinstance(app, Blueprint):  # its requests are the app's: one scope
                fix = "register it on the Flask app the blueprint is registered on"
            elif isinstance(app, type) and issubclass(app, Flask):
                fix = f"pass one: PerRequest({app.__name__}(__name__))"
            else:
                fix = "for another WSGI app use perrequest.wsgi.RequestScopeMiddleware"
            raise TypeError(
                f"PerRequest.init_app() takes a Flask app, not {type(app).__name__} {app!r}; {fix}"
            )
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"perrequest is already registered on Flask app {app.name!r} "
                f"(app.extensions[{EXTENSION_KEY!r}]); call PerRequest(app) or init_app(app) "
                "once per app"
            )
        app.wsgi_app = RequestScopeMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, max_entries=self._max_entries, on_close=self._on_close
        )
        app.extensions[EXTENSION_KEY] = self
