"""Django middleware: one store per request, for sync and async views alike.

Add ``"perrequest.django.RequestScopeMiddleware"`` to ``MIDDLEWARE`` (near
the top, so other middleware sees the store too). Options come from
``settings.PERREQUEST = {"MAX_ENTRIES": int | None, "ON_CLOSE": callable or
dotted path}``, read once when Django creates the middleware.

The store is opened and reset around ``get_response`` in ``__call__``, never
in ``process_request``/``process_response``: under ASGI those run in different
contexts, and a token set in one cannot be reset in the other. It is closed
when Django closes the response (``response.close()``), so a streaming body,
which runs after ``__call__`` has returned, still sees the view's store.
"""

from __future__ import annotations

import difflib
import functools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from ._lifecycle import (
    REQUEST_KEY,
    AsyncScopedBody,
    OnClose,
    ScopedBody,
    check_on_close,
    close_scope,
    end_scope,
    leave_scope,
    open_scope,
    opened_outside,
)
from .store import DEFAULT_MAX_ENTRIES, MemoStore, check_max_entries

__all__ = ["RequestScopeMiddleware"]

_KEYS = ("MAX_ENTRIES", "ON_CLOSE")


class RequestScopeMiddleware:
    """Open a fresh store for each request; close it when Django closes the response.

    Sync and async capable: Django hands it an async ``get_response`` under
    ASGI, and then it runs as a coroutine, so async views get no thread switch.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._max_entries, self._on_close = _read_settings()
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._is_async:
            return self._acall(request)
        if _opened_outside(request):
            return self.get_response(request)
        store = request.META[REQUEST_KEY] = open_scope(self._max_entries, self._on_close)
        try:
            response = self.get_response(request)
        except BaseException:
            end_scope(store)
            raise
        leave_scope(store)
        return _close_with_response(response, store)

    async def _acall(self, request: Any) -> Any:
        if _opened_outside(request):
            return await self.get_response(request)
        store = request.META[REQUEST_KEY] = open_scope(self._max_entries, self._on_close)
        try:
            response = await self.get_response(request)
        except BaseException:  # cancellation (client gone) closes the store too
            end_scope(store)
            raise
        leave_scope(store)
        return _close_with_response(response, store)


def _opened_outside(request: Any) -> bool:
    """An outer perrequest layer opened this request's scope: the same middleware
    listed twice, or the WSGI/ASGI application wrapped as well."""
    marker = request.META.get(REQUEST_KEY)
    if marker is None:
        scope = getattr(request, "scope", None)  # Django's ASGIRequest: the ASGI scope
        marker = scope.get(REQUEST_KEY) if isinstance(scope, dict) else None
    return marker is not None and opened_outside(marker)


def _close_with_response(response: Any, store: MemoStore) -> Any:
    """Tie the scope's end to the response's: its streaming body runs in the scope,
    and ``response.close()`` (or, if nobody calls it, garbage collection) closes it."""
    try:
        end: Callable[[], object] = functools.partial(close_scope, store)
        # A FileResponse only reads a file, and replacing its streaming_content
        # would disable the server's wsgi.file_wrapper (sendfile).
        if response.streaming and getattr(response, "file_to_stream", None) is None:
            end = _scope_streaming_content(response, store)
        # A response can be dropped unclosed (a middleware above replaces it; under
        # ASGI a sync chain's request task is cancelled): the finalizer then ends the
        # scope when it is collected. Called by close(), it runs once and detaches.
        response._resource_closers.append(weakref.finalize(response, end))
    except BaseException:
        close_scope(store)
        raise
    return response


def _scope_streaming_content(response: Any, store: MemoStore) -> Callable[[], object]:
    """Produce the body with the scope active, and close it within the scope; return
    what ends the scope (the wrapper's close).

    Wraps the raw iterator, not ``response.streaming_content``: that property
    maps the chunks through ``response.make_bytes``, a reference back to the
    response, and a wrapper holding it would put every response in a cycle
    that only the garbage collector frees. The closers registered so far (your
    generator's, and those of middleware below that re-wrapped the content,
    such as GZip's) are taken over and run by the wrapper, inside the scope.
    """
    raw = getattr(response, "_iterator", None)
    if raw is None:  # a streaming response class of its own: wrap what it offers
        raw = response.streaming_content
    closers = list(response._resource_closers)
    response._resource_closers.clear()
    if getattr(response, "is_async", False):
        body: ScopedBody[Any] | AsyncScopedBody[Any] = AsyncScopedBody(raw, store)
        response.streaming_content = body
        # An async body has no sync close of its own to take these over.
        response._resource_closers.extend(closers)
    else:
        close = getattr(raw, "close", None)
        if close is not None and close not in closers:
            closers.append(close)
        body = ScopedBody(raw, store, closers)
        response.streaming_content = body
    return body.close


def _read_settings() -> tuple[int | None, OnClose | None]:
    """``settings.PERREQUEST``, validated; ``ImproperlyConfigured`` names the bad key."""
    options = getattr(settings, "PERREQUEST", None)
    if options is None:
        return DEFAULT_MAX_ENTRIES, None
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            f"settings.PERREQUEST must be a dict with the keys {', '.join(_KEYS)}, "
            f"not {type(options).__name__} {options!r}"
        )
    for key in options:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key).upper(), _KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ImproperlyConfigured(
                f"settings.PERREQUEST has an unknown key {key!r}; the valid keys are "
                f"{', '.join(_KEYS)}.{hint}"
            )
    return _max_entries(options), _on_close(options)


def _max_entries(options: Mapping[str, Any]) -> int | None:
    if "MAX_ENTRIES" not in options:
        return DEFAULT_MAX_ENTRIES
    try:
        return check_max_entries(options["MAX_ENTRIES"], 'settings.PERREQUEST["MAX_ENTRIES"]')
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(
            f"{exc} (None means unbounded; leave the key out for the default, "
            f"{DEFAULT_MAX_ENTRIES})"
        ) from exc


def _on_close(options: Mapping[str, Any]) -> OnClose | None:
    value = options.get("ON_CLOSE")
    if isinstance(value, str):
        try:
            value = import_string(value)
        except Exception as exc:  # ImportError, or whatever the module raised on import
            raise ImproperlyConfigured(
                f'settings.PERREQUEST["ON_CLOSE"] is the dotted path {options["ON_CLOSE"]!r}, '
                f"which cannot be imported: {exc}"
            ) from exc
    try:
        return check_on_close(value)
    except TypeError as exc:
        raise ImproperlyConfigured(
            f'settings.PERREQUEST["ON_CLOSE"] must be a callable taking ScopeStats, a dotted '
            f"path to one, or None, not {type(value).__name__} {value!r}"
        ) from exc
