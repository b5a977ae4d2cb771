"""Views for the toolbar tests: memoized lookups, a crowded store, a thread without a scope."""

from __future__ import annotations

import threading
import time
from typing import Any

from django.http import HttpResponse

from perrequest import request_memo

PAGE = (
    "<!DOCTYPE html><html><head><title>{title}</title></head>"
    "<body><h1>{title}</h1>{body}</body></html>"
)


def show_toolbar(request: Any) -> bool:
    return True


@request_memo
def product(pid: int) -> dict[str, Any]:
    time.sleep(0.003)  # a database round trip
    return {"id": pid, "name": f"Product {pid}"}


@request_memo
def price(pid: int) -> float:
    time.sleep(0.001)
    return 9.5 + pid


@request_memo(outside_scope="warn")
def exchange_rate(currency: str) -> float:
    return 1.1


def catalog(request: Any) -> HttpResponse:
    rows = []
    for pid in (1, 2, 3, 1, 2, 3, 1, 2, 1):
        rows.append(f"<li>{product(pid)['name']}: {price(pid)}</li>")
    return HttpResponse(PAGE.format(title="Catalog", body=f"<ul>{''.join(rows)}</ul>"))


def crowded(request: Any) -> HttpResponse:
    """Fills the store (bound 20) past its bound."""
    total = sum(price(pid) for pid in range(25))
    return HttpResponse(PAGE.format(title="Crowded", body=f"<p>{total}</p>"))


def threaded(request: Any) -> HttpResponse:
    """A plain thread does not inherit the request's context: its call is uncached."""
    thread = threading.Thread(target=exchange_rate, args=("EUR",))
    thread.start()
    thread.join()
    return HttpResponse(PAGE.format(title="Threaded", body=f"<p>{product(1)['name']}</p>"))
