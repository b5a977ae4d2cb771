"""A bounded process-wide cache, for values right for everyone for a while.

Run it: `python process_cache.py`
"""

import threading
from decimal import Decimal

import cachetools

calls: list[str] = []  # a stub upstream service: it counts its calls


def upstream_rate(currency: str) -> Decimal:
    calls.append(currency)
    return Decimal("1.08")


# At most 1000 entries, 5 minutes each; cachetools is not thread-safe.
_rates: cachetools.TTLCache[str, Decimal] = cachetools.TTLCache(
    maxsize=1_000, ttl=300
)
_rates_lock = threading.Lock()


@cachetools.cached(_rates, lock=_rates_lock)
def exchange_rate(currency: str) -> Decimal:
    return upstream_rate(currency)


_templates: cachetools.LRUCache[str, str] = cachetools.LRUCache(maxsize=200)

if __name__ == "__main__":
    assert exchange_rate("EUR") == exchange_rate("EUR") == Decimal("1.08")
    assert calls == ["EUR"]  # kept between jobs and requests
    for n in range(1_000):
        _templates[f"template {n}"] = "..."
    assert len(_templates) == 200  # the most recently used 200
