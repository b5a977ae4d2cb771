"""The shared tier: a bounded process-wide cache behind the request store.

Run it: `python shared_price.py`
"""

from decimal import Decimal

import cachetools
from perrequest import request_memo, request_scope

calls: list[str] = []  # a stub upstream service: it counts its calls


def upstream_price(sku: str) -> Decimal:
    calls.append(sku)
    return Decimal("9.90")


prices: cachetools.TTLCache[object, object] = cachetools.TTLCache(
    maxsize=10_000, ttl=60
)


@request_memo(shared=prices)
def price(sku: str) -> Decimal:
    return upstream_price(sku)


if __name__ == "__main__":
    with request_scope():  # one request
        assert price("apple") == Decimal("9.90")
        prices.clear()  # even if the shared entry goes meanwhile...
        assert price("apple") == Decimal("9.90")  # ...reads are repeatable
    assert calls == ["apple"]
    with request_scope():  # the next request
        price("apple")
    with request_scope():  # and the one after: served by the shared cache
        price("apple")
        assert price.shared_info().hits == 1
    assert calls == ["apple", "apple"]
