"""Coming from functools.lru_cache and functools.cache.

Run it: `python coming_from_lru_cache.py`
"""

import functools
import weakref
from dataclasses import dataclass

from perrequest import CacheInfo, request_memo, request_scope

rates = {"EUR": 1.08}  # a stub upstream service


# --8<-- [start:before]
@functools.lru_cache(maxsize=128)
def cached_rate(currency: str) -> float:
    return rates[currency]


class CachedCart:
    def __init__(self, prices: list[float]) -> None:
        self.prices = prices

    @functools.cache  # noqa: B019 keeps every cart alive for the process
    def total(self) -> float:
        return sum(self.prices)


# --8<-- [end:before]


# --8<-- [start:after]
@request_memo(max_entries=128)
def rate(currency: str) -> float:
    return rates[currency]


@dataclass  # unhashable, and fine: instances are keyed by identity
class Cart:
    prices: list[float]

    @request_memo
    def total(self) -> float:
        return sum(self.prices)


# --8<-- [end:after]

if __name__ == "__main__":
    # Before: entries outlive the request that made them.
    assert cached_rate("EUR") == 1.08
    rates["EUR"] = 1.10
    assert cached_rate("EUR") == 1.08  # stale, in every later request
    cached_cart = CachedCart([1.0, 2.0])
    assert cached_cart.total() == 3.0
    cached_cart_ref = weakref.ref(cached_cart)
    del cached_cart
    assert cached_cart_ref() is not None  # kept alive by the cache

    # After: the same call sites; entries go with the request.
    with request_scope():
        assert rate("EUR") == rate("EUR") == 1.10
        assert rate.cache_info() == CacheInfo(
            hits=1, misses=1, maxsize=128, currsize=1
        )
        cart = Cart([1.0, 2.0])
        assert cart.total() == cart.total() == 3.0
        cart_ref = weakref.ref(cart)
        del cart
        assert cart_ref() is not None  # alive while the request runs
    assert cart_ref() is None  # released with the request's store
    assert rate.cache_info() == CacheInfo(0, 0, 128, 0)  # zeros outside
