"""A project middleware inside perrequest's: it calls the memoized lookup before the view."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.utils.decorators import sync_and_async_middleware, sync_only_middleware
from django.utils.deprecation import MiddlewareMixin

import perrequest

from .hooks import lookup


@sync_and_async_middleware
def lookup_middleware(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    if iscoroutinefunction(get_response):

        async def amiddleware(request: Any) -> Any:
            request.mw_lookup = lookup("alice")
            return await get_response(request)

        return amiddleware

    def middleware(request: Any) -> Any:
        request.mw_lookup = lookup("alice")
        return get_response(request)

    return middleware


@sync_only_middleware
def sync_only(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Not in MIDDLEWARE: the positive control that makes Django adapt the chain to sync."""
    return get_response


_naive: ContextVar[object] = ContextVar("naive", default=None)


class NaiveScopeMiddleware(MiddlewareMixin):
    """Not in MIDDLEWARE: the design perrequest avoids (set in one hook, reset in the other)."""

    def process_request(self, request: Any) -> None:
        request.naive_token = _naive.set(object())

    def process_response(self, request: Any, response: Any) -> Any:
        _naive.reset(request.naive_token)
        return response


hooks_seen: list[tuple[str, bool]] = []


class HooksAbove(MiddlewareMixin):
    """Listed above perrequest by a test: which of its hooks run in the request's store."""

    def process_request(self, request: Any) -> None:
        hooks_seen.append(("process_request", perrequest.in_request_scope()))

    def process_view(self, request: Any, *args: Any) -> None:
        hooks_seen.append(("process_view", perrequest.in_request_scope()))

    def process_response(self, request: Any, response: Any) -> Any:
        hooks_seen.append(("process_response", perrequest.in_request_scope()))
        return response
