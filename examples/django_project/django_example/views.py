"""Views that check the same permissions again: with the memo, that costs no query."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpResponse, HttpResponseForbidden, JsonResponse
from django.template.loader import render_to_string

from . import catalog, permissions
from .permissions import queries_this_request, user_permissions

ORDERS = {
    "alice": [{"id": 1, "total": 42}],
    "bob": [{"id": 2, "total": 7}, {"id": 3, "total": 19}],
}


def dashboard(request: Any) -> HttpResponse:
    """Sync view: checks shop.edit, and its template lists the permissions again."""
    can_edit = "shop.edit" in user_permissions(request.username)
    html = render_to_string(
        "dashboard.html", {"user": request.username, "can_edit": can_edit}, request=request
    )
    response = HttpResponse(html)
    response["X-Permission-Queries"] = str(queries_this_request())
    return response


async def orders(request: Any) -> HttpResponse:
    """Async view: the lookup runs in a thread through sync_to_async, which shares the store."""
    if "orders.view" not in await sync_to_async(user_permissions)(request.username):
        return HttpResponseForbidden("no orders.view permission\n")
    response = JsonResponse({"user": request.username, "orders": ORDERS.get(request.username, [])})
    response["X-Permission-Queries"] = str(queries_this_request())
    return response


# --8<-- [start:order_lines]
def order_lines(request: Any) -> HttpResponse:
    """Sync view: every product on the page in one call, for the total; the
    template's tags then find each line's product and supplier stored."""
    lines = catalog.ORDER_LINES
    ids = [line["product_id"] for line in lines]
    products = catalog.load_products.load_many(ids)  # one query
    pairs = zip(products, lines, strict=True)
    total = sum(product.price * line["quantity"] for product, line in pairs)
    context = {"lines": lines, "total": total}
    html = render_to_string("order_lines.html", context, request=request)
    response = HttpResponse(html)
    response["X-SQL-Queries"] = str(catalog.queries_this_request())
    return response


# --8<-- [end:order_lines]


def stats(request: Any) -> JsonResponse:
    """How many permission queries ran in this process, for how many requests."""
    with permissions._lock:
        return JsonResponse({**permissions.TOTALS, "last_request": permissions.LAST_REQUEST})
