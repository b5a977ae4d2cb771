"""A user module that type-checks cleanly with mypy --strict and basedpyright."""

from __future__ import annotations

import perrequest
from perrequest import CacheInfo, SharedCacheInfo, request_memo
from perrequest.redis import RedisCache, RedisCacheInfo


@request_memo
def price(item: str, quantity: int = 1) -> float:
    return 1.5 * quantity


@request_memo(max_entries=100)
async def user_name(user_id: int) -> str:
    return f"user {user_id}"


class Repository:
    @request_memo
    def row(self, row_id: int) -> dict[str, int]:
        return {"id": row_id}

    @staticmethod
    @request_memo
    def normalise(text: str) -> str:
        return text.lower()


def shared_cache() -> SharedCacheInfo:
    import cachetools

    @request_memo(shared=cachetools.LRUCache(maxsize=100))
    def rate(currency: str) -> float:
        return 1.0

    with perrequest.request_scope():
        assert rate("EUR") == 1.0
        return rate.cache_info()


def redis_tier() -> RedisCacheInfo:
    import redis

    cache = RedisCache(redis.Redis(), ttl=60, namespace="shop")

    @request_memo(shared=cache, version=2)
    def stock(sku: str) -> int:
        return 3

    with perrequest.request_scope():
        count: int = stock("apple")
        info = stock.cache_info()
        errors: int = info.shared_errors + info.shared_lock_waits + count
        print(errors, cache.stats().lock_timeouts)
        return info


async def main() -> None:
    with perrequest.request_scope():
        total: float = price("apple", quantity=2) + price("pear")
        info: CacheInfo = price.cache_info()
        hits: int = info.hits + info.misses + info.currsize
        price.cache_clear()
        deleted: bool = price.cache_delete("apple", quantity=2)
        name: str = await user_name(1)
        user_name.cache_clear()
        repository = Repository()
        row: dict[str, int] = repository.row(7)
        repository.row.cache_delete(7)
        Repository.row.cache_info()
        text: str = Repository.normalise("A")
        plain: float = price.__wrapped__("apple")
        print(total, hits, deleted, name, row, text, plain, shared_cache().shared_hits)
