"""Middleware of the attack project: a probe outside every scope, one that raises, one
with ``process_exception``; and the ``request_started``/``request_finished`` receivers."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.core.signals import request_finished, request_started
from django.http import HttpResponse, JsonResponse
from django.utils.decorators import sync_and_async_middleware, sync_only_middleware
from django.utils.deprecation import MiddlewareMixin

import perrequest
from perrequest.scope import _current

from .state import EVENTS, who


def _leftover(where: str) -> None:
    """Whatever a request finds in the ContextVar before any scope opened: nothing, ever."""
    found = _current.get()
    if found is not None:
        EVENTS["leaked"].append(f"{where}: {found!r}")


@sync_and_async_middleware
def probe(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Outermost: the thread (WSGI) or task (ASGI) holds no store before, nor after."""
    if iscoroutinefunction(get_response):

        async def amiddleware(request: Any) -> Any:
            _leftover("probe before (async)")
            response = await get_response(request)
            _leftover("probe after (async)")
            return response

        return amiddleware

    def middleware(request: Any) -> Any:
        _leftover("probe before (sync)")
        response = get_response(request)
        _leftover("probe after (sync)")
        return response

    return middleware


@sync_only_middleware
def sync_only(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Sync only: below it, Django adapts the chain to sync; above it, perrequest runs sync."""

    def middleware(request: Any) -> Any:
        return get_response(request)

    return middleware


class RaisingAbove(MiddlewareMixin):
    """Listed above perrequest: fails after it returned the response (``?raise_above=1``),
    so that Django drops that response unclosed and answers with handler500."""

    def process_response(self, request: Any, response: Any) -> Any:
        if request.GET.get("raise_above"):
            raise RuntimeError("a middleware above perrequest failed")
        return response


class Raising(MiddlewareMixin):
    """``/raise-mw/`` fails in ``process_request``, before the view."""

    def process_request(self, request: Any) -> None:
        if request.path == "/raise-mw/":
            perrequest.set("marker", request.GET.get("v"))
            raise RuntimeError("a middleware failed")


class Recovering(MiddlewareMixin):
    """``process_exception`` turns a view's ``LookupError`` into a response."""

    def process_exception(self, request: Any, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, LookupError):
            return JsonResponse(
                {
                    "in_scope": perrequest.in_request_scope(),
                    "marker": perrequest.get("marker"),
                    "memo": who(),
                },
                status=409,
            )
        return None


class Retaining(MiddlewareMixin):
    """Keeps the last few responses (as a debugging page might): each is freed later,
    while another request runs."""

    kept: deque[Any] = deque(maxlen=2)

    def process_response(self, request: Any, response: Any) -> Any:
        # Not one that a middleware above drops unclosed: kept, its scope would stay open.
        if request.path.startswith("/stream/") and not request.GET.get("raise_above"):
            self.kept.append(response)
        return response


def _started(sender: Any, **kwargs: Any) -> None:
    _leftover("request_started")


def _finished(sender: Any, **kwargs: Any) -> None:
    EVENTS["finished"].append(
        {
            "in_scope": perrequest.in_request_scope(),
            "marker": perrequest.get("marker"),
            "memo": who(),
        }
    )
    del EVENTS["finished"][:-200]


request_started.connect(_started, dispatch_uid="attack-started")
request_finished.connect(_finished, dispatch_uid="attack-finished")
