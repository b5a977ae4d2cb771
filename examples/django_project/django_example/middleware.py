"""Who is asking, and may they see the shop at all? The first permission check of a request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpResponseForbidden
from django.utils.decorators import sync_and_async_middleware

from .permissions import user_permissions

PUBLIC = ("/stats/",)


def _username(request: Any) -> str:
    """A stand-in for authentication: the X-User header, or ?user=, or guest."""
    return str(request.headers.get("X-User") or request.GET.get("user") or "guest")


def _public(request: Any) -> bool:
    return bool(request.path.startswith(PUBLIC))


def _forbidden(request: Any) -> HttpResponseForbidden:
    return HttpResponseForbidden(f"{request.username} may not view the shop\n")


@sync_and_async_middleware
def current_user(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Set ``request.username`` and require the ``shop.view`` permission."""
    if iscoroutinefunction(get_response):

        async def amiddleware(request: Any) -> Any:
            request.username = _username(request)
            # sync_to_async copies the context: the thread sees this request's store.
            lookup = sync_to_async(user_permissions)
            if not _public(request) and "shop.view" not in await lookup(request.username):
                return _forbidden(request)
            return await get_response(request)

        return amiddleware

    def middleware(request: Any) -> Any:
        request.username = _username(request)
        if not _public(request) and "shop.view" not in user_permissions(request.username):
            return _forbidden(request)
        return get_response(request)

    return middleware
