"""A user module that type-checks cleanly with mypy --strict and basedpyright."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import perrequest
from perrequest import (
    AsyncBatchLoader,
    BatchLoader,
    CacheInfo,
    SharedCacheInfo,
    request_batch,
    request_memo,
)
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

    @classmethod
    @request_memo
    def default(cls, row_id: int) -> int:
        return row_id


def default_row() -> int:
    # Both checkers take a memoized classmethod for one that needs cls (docs/semantics.md).
    return Repository.default(1)  # type: ignore[call-arg, arg-type]  # pyright: ignore[reportCallIssue]


def shared_cache() -> SharedCacheInfo:
    import cachetools

    @request_memo(shared=cachetools.LRUCache(maxsize=100))
    def rate(currency: str) -> float:
        return 1.0

    with perrequest.request_scope():
        assert rate("EUR") == 1.0
        return rate.shared_info()


def shared_method() -> SharedCacheInfo:
    import cachetools

    class Rates:
        @request_memo(shared=cachetools.LRUCache(maxsize=100), key=lambda self, c: c)
        def rate(self, currency: str) -> float:
            return 1.0

    rates = Rates()
    with perrequest.request_scope():
        assert rates.rate("EUR") == 1.0
        return rates.rate.shared_info()


def redis_tier() -> RedisCacheInfo:
    import redis

    cache = RedisCache(redis.Redis(), ttl=60, namespace="shop")

    @request_memo(shared=cache, version=2)
    def stock(sku: str) -> int:
        return 3

    with perrequest.request_scope():
        count: int = stock("apple")
        info = stock.shared_info()
        errors: int = info.errors + info.lock_waits + count
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
        repository.row.cache_delete(repository, 7)
        Repository.row.cache_info()
        text: str = Repository.normalise("A")
        text = repository.normalise("A")  # type: ignore[call-arg]  # (mypy: docs/semantics.md)
        plain: float = price.__wrapped__("apple")
        label: str = price.__name__ + price.__qualname__  # as on functools' wrappers
        method: str = repository.row.__name__ + repository.row.__qualname__
        unbound: dict[str, int] = repository.row.__wrapped__(repository, 7)
        print(total, hits, deleted, name, row, text, plain, label, shared_cache().hits)
        print(method, unbound, shared_method().hits)


@request_batch
async def load_users(ids: Sequence[int]) -> list[str | Exception]:
    return [f"user {i}" for i in ids]


@request_batch(max_batch_size=100, key=str.lower)
async def by_name(names: list[str]) -> dict[str, int]:
    return {name: len(name) for name in names}


@request_batch
def rows(ids: list[int]) -> dict[int, str]:
    return {i: str(i) for i in ids}


@request_batch
def untyped_rows(ids: list[int]) -> Any:  # an untyped ORM's: a sync loader (pyright: async)
    return [{"id": i} for i in ids]


async def batching() -> None:
    async with perrequest.request_scope():
        user: str = await load_users.load(1)  # an Exception in the list fails its key
        users: list[str] = await load_users.load_many([1, 2])
        again = await load_users([3])
        length: int = await by_name.load("Ann")
        row: str = rows.load(3)
        untyped: int = untyped_rows.load(3)["id"]
        many: list[str] = rows.load_many(range(3))
        rows.prime(4, "four")
        cleared: bool = rows.clear(4)
        rows.cache_clear()
        loader: AsyncBatchLoader[int, str] = load_users
        sync_loader: BatchLoader[int, str] = rows
        info: CacheInfo = by_name.cache_info()
        print(user, users, again, length, row, many, cleared, loader, sync_loader, info, untyped)


def middlewares() -> None:
    """The registrations the docs show, options included: add_middleware checks them."""
    from asgiref.typing import ASGI3Application
    from fastapi import FastAPI
    from flask import Flask
    from starlette.applications import Starlette

    from perrequest.asgi import RequestScopeMiddleware
    from perrequest.flask import PerRequest
    from perrequest.wsgi import RequestScopeMiddleware as WSGIMiddleware

    Starlette().add_middleware(RequestScopeMiddleware)
    typed: ASGI3Application = RequestScopeMiddleware(Starlette())  # hypercorn's serve() takes
    print(typed)
    FastAPI().add_middleware(RequestScopeMiddleware, max_entries=500, scope_types=("http",))
    flask_app = Flask(__name__)
    PerRequest(flask_app, max_entries=100)
    flask_app.wsgi_app = WSGIMiddleware(flask_app.wsgi_app, max_entries=None)  # type: ignore[method-assign]
