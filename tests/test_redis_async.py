"""The Redis tier for async functions, on a redis.asyncio client and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import warnings
from typing import Any

import pytest
import redis
from redis_apps import SlowLink

from perrequest import CacheInfo, request_memo, request_scope
from perrequest.redis import RedisCache, RedisCacheInfo

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(redis_server: Any) -> Any:
    with redis_server.client() as client:
        yield client


def test_async_values_are_shared_and_concurrent_misses_compute_once(
    redis_server: Any, client: redis.Redis
) -> None:
    calls: list[int] = []

    async def main(expected: RedisCacheInfo) -> None:
        aclient = redis_server.aclient()
        # 50 connections opened at once: on a loaded machine (the suite in 4 workers on 2
        # cores) one took over the default op_timeout of 0.5 s, and the tier stood aside.
        cache = RedisCache(aclient, ttl=60, namespace="a", op_timeout=10)

        @request_memo(shared=cache)
        async def rate(n: int) -> dict[str, int]:
            calls.append(n)
            await asyncio.sleep(0.05)
            return {"n": n}

        async def request() -> dict[str, int]:
            async with request_scope():
                first = await rate(1)
                assert await rate(1) is first  # a request-store hit
                return first

        results = await asyncio.gather(*(request() for _ in range(50)))
        assert all(r == {"n": 1} for r in results)
        assert len({id(r) for r in results}) == 50  # a copy of its own for every request
        async with request_scope():
            assert await rate(1) == {"n": 1}
            assert rate.cache_info() == CacheInfo(0, 1, None, 1)
            assert rate.shared_info() == expected
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main(RedisCacheInfo(50, 1, 0, 0)))  # 49 waited
    assert calls == [1]
    # Another process (here: another cache, another loop) reads what this one wrote.
    asyncio.run(main(RedisCacheInfo(51, 0, 0, 0)))
    assert calls == [1]


def _values(client: redis.Redis) -> int:
    return sum(not key.endswith((b":lock", b":gen")) for key in client.scan_iter())


def test_async_cache_clear_and_delete_from_inside_the_loop(
    redis_server: Any, client: redis.Redis
) -> None:
    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="a")

        @request_memo(shared=cache)
        async def f(n: int) -> int:
            return n

        async with request_scope():
            assert [await f(n) for n in range(5)] == list(range(5))
            assert client.dbsize() == 5
            assert f.cache_delete(1) is True
            assert _values(client) == 4  # and a lock marked deleted, for lock_timeout
            f.cache_clear()
            assert _values(client) == 0
        helpers = [t for t in threading.enumerate() if t.name.startswith("perrequest-redis")]
        assert not helpers  # the helper thread has ended
        assert cache.stats().errors == 0
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())


def test_async_a_cancelled_computation_releases_its_lock_for_a_waiter(
    redis_server: Any, client: redis.Redis
) -> None:
    started = []

    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="a", lock_timeout=10)

        @request_memo(shared=cache)
        async def slow(n: int) -> int:
            started.append(n)
            await asyncio.sleep(0.3)
            return n

        async def request() -> int:
            async with request_scope():
                return await slow(1)

        first = asyncio.create_task(request())
        await asyncio.sleep(0.1)
        second = asyncio.create_task(request())  # waits on the first (this process)
        await asyncio.sleep(0.05)
        first.cancel()
        start = asyncio.get_running_loop().time()
        assert await second == 1
        assert asyncio.get_running_loop().time() - start < 1  # not lock_timeout
        with pytest.raises(asyncio.CancelledError):
            await first
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())
    assert started == [1, 1]
    assert client.dbsize() == 1  # the value, no lock left behind


def test_async_exceptions_reach_every_waiter_and_are_not_cached(
    redis_server: Any, client: redis.Redis
) -> None:
    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="a")
        calls = []

        @request_memo(shared=cache)
        async def boom(n: int) -> int:
            calls.append(n)
            await asyncio.sleep(0.05)
            raise LookupError(f"no {n}")

        async def request() -> BaseException:
            async with request_scope():
                try:
                    await boom(1)
                except LookupError as exc:
                    return exc
                raise AssertionError("no error")

        errors = await asyncio.gather(*(request() for _ in range(5)))
        assert all(str(e) == "no 1" for e in errors) and calls == [1]
        assert client.dbsize() == 0
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())


def test_async_a_pool_is_dropped_when_its_event_loop_has_closed(
    redis_server: Any, client: redis.Redis
) -> None:
    """A worker running each task under its own asyncio.run() keeps one pool, not one
    per loop it ever ran (each with its socket open to the server)."""
    # Other tests on this session's server (a Celery app's broker) may keep clients open.
    others = len(client.client_list())
    cache = RedisCache(redis_server.aclient(), ttl=60, namespace="a")

    @request_memo(shared=cache)
    async def rate(currency: str) -> float:
        return 1.0

    async def task() -> float:
        async with request_scope():
            return await rate("EUR")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # sockets the collector closes
        for _ in range(20):
            assert asyncio.run(task()) == 1.0
        gc.collect()
    deadline = time.monotonic() + 5
    while len(client.client_list()) > others + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(client.client_list()) <= others + 2  # the last loop's pool, maybe one more


def test_async_a_key_of_another_type_is_a_bad_value_overwritten(
    redis_server: Any, client: redis.Redis
) -> None:
    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="a")

        @request_memo(shared=cache)
        async def f(n: int) -> int:
            return n

        async with request_scope():
            await f(1)
        (key,) = client.scan_iter("a:*")
        client.delete(key)
        client.hset(key, "x", "y")
        for _ in range(2):
            async with request_scope():
                assert await f(1) == 1 and await f(2) == 2
        assert client.type(key) == b"string"
        stats = cache.stats()
        assert (stats.errors, stats.bad_values, stats.misses) == (0, 1, 3)
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())


def test_async_a_lock_key_of_another_type_is_taken_over(
    redis_server: Any, client: redis.Redis
) -> None:
    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="al", lock_timeout=3)

        @request_memo(shared=cache)
        async def f(n: int) -> int:
            return n

        async with request_scope():
            await f(1)
        (key,) = client.scan_iter("al:*")
        client.delete(key)
        client.sadd(key + b":lock", "junk")
        start = time.monotonic()
        async with request_scope():
            assert await f(1) == 1
        assert time.monotonic() - start < 1 and client.exists(key + b":lock") == 0
        stats = cache.stats()
        assert (stats.bad_values, stats.lock_waits) == (1, 0)
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())


def test_async_under_trio_computes_here_counts_and_says_why_once(
    redis_server: Any, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """redis.asyncio needs an asyncio loop: under trio the tier fails open, as when Redis
    is down, instead of failing the request with 'no running event loop'."""
    trio = pytest.importorskip("trio")
    cache = RedisCache(redis_server.aclient(), ttl=60, namespace="trio")
    calls: list[str] = []

    @request_memo(shared=cache)
    async def price(sku: str) -> dict[str, str]:
        calls.append(sku)
        return {"sku": sku}

    async def main() -> list[dict[str, str]]:
        got = []
        for _ in range(3):
            async with request_scope():
                got += [await price("a"), await price("a")]  # the second: a request hit
        return got

    with caplog.at_level("WARNING", logger="perrequest"):
        assert trio.run(main) == [{"sku": "a"}] * 6
    assert calls == ["a"] * 3 and client.dbsize() == 0
    stats = cache.stats()
    assert (stats.errors, stats.misses, stats.hits) == (3, 3, 0)
    warned = [r.getMessage() for r in caplog.records if "trio" in r.getMessage()]
    assert len(warned) == 1 and "asyncio event loop" in warned[0]
    assert "in-process tier" in warned[0] and "asyncio backend" in warned[0]


def test_async_a_holder_cancelled_again_and_again_still_releases_its_lock(
    redis_server: Any, client: redis.Redis
) -> None:
    """anyio's cancel scopes (Starlette's task groups, ``anyio.move_on_after``) cancel a
    task at every await until it leaves the scope: the release after a cancelled
    computation is cancelled too. The lock must not stay behind for the key's next
    miss, in any process, to wait out (``lock_timeout``)."""
    import anyio

    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="a", lock_timeout=5)

        @request_memo(shared=cache)
        async def slow(n: int) -> int:
            await asyncio.sleep(0.3)
            return n

        async def request() -> int:
            async with request_scope():
                return await slow(1)

        with anyio.move_on_after(0.1):
            await request()
        for _ in range(100):  # what the cancelled caller left running ends
            if not [k for k in client.scan_iter() if k.endswith(b":lock")]:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the cancelled holder left its lock behind")
        start = time.monotonic()
        assert await request() == 1
        assert time.monotonic() - start < 1  # not lock_timeout
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())


def test_async_cache_delete_invalidates_a_computation_in_flight(
    redis_server: Any, client: redis.Redis
) -> None:
    """Read your own writes, for async functions: after the delete, the next call
    computes afresh, a caller that waited for the old computation starts again, and the
    old computation's value (read from the old row) is not stored."""

    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="rw")
        row = {"price": 1}

        @request_memo(shared=cache)
        async def price(sku: str) -> int:
            value = row["price"]
            if value == 1:
                await asyncio.sleep(0.5)
            return value

        async def request(delay: float) -> int:
            await asyncio.sleep(delay)
            async with request_scope():
                return await price("a")

        stale, waiter = asyncio.create_task(request(0)), asyncio.create_task(request(0.05))
        await asyncio.sleep(0.1)
        async with request_scope():
            row["price"] = 2
            price.cache_delete("a")
            start = time.monotonic()
            assert await price("a") == 2
            assert time.monotonic() - start < 0.4  # it did not wait for the old one
        assert (await stale, await waiter) == (1, 2)
        assert await request(0) == 2  # not overwritten by the stale value
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())
    locks = [k for k in client.scan_iter() if k.endswith(b":lock")]
    assert locks == []  # no lock: the key's generation says a delete came


def test_async_a_holder_cancelled_while_extending_its_lock_releases_it(
    redis_server: Any, client: redis.Redis
) -> None:
    """The holder is cancelled while its EXTEND is on the way (a slow link): the server
    runs it, and the lock would live lock_timeout with nobody to release it. The key's
    next miss, in any process, must not wait that out."""
    import hashlib

    from perrequest._redis_io import EXTEND

    # Held back 1.5 s: the cancel below comes while it is on the way even when a loaded
    # machine runs this loop late (0.5 s left 0.45 s to find the lock and cancel).
    link = SlowLink(redis_server.port, hashlib.sha1(EXTEND.encode()).hexdigest().encode(), 1.5)

    async def main() -> None:
        import redis.asyncio

        aclient = redis.asyncio.Redis(host="127.0.0.1", port=link.port)
        cache = RedisCache(
            aclient, ttl=60, namespace="ext", lock_timeout=5, op_timeout=4, retry_after=0
        )

        @request_memo(shared=cache)
        async def slow(n: int) -> int:
            return n

        async def request() -> int:
            async with request_scope():
                return await slow(1)

        async with request_scope():
            assert await slow(0) == 0  # the server has the scripts (the steady state)
        task = asyncio.create_task(request())
        for _ in range(200):  # the lock is taken: its EXTEND is on the way
            if any(k.endswith(b":lock") for k in client.scan_iter("ext:*")):
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.8)  # the EXTEND has run meanwhile
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())
    link.close()
    # Another process's miss: the lock is gone, not there for lock_timeout.
    locks = [k for k in client.scan_iter("ext:*") if k.endswith(b":lock")]
    assert not locks, [client.pttl(k) for k in locks]


def test_async_a_holder_cancelled_as_asyncio_run_ends_still_releases_its_lock(
    redis_server: Any, client: redis.Redis
) -> None:
    """A script or a Celery task (``asyncio.run`` per call) gives up on a computation
    (an anyio cancel scope: the release goes to a task of its own) and returns;
    ``asyncio.run`` then cancels every task left, the release of the lock too. The lock
    must not stay behind for the next run, or another process, to wait out
    (``lock_timeout``)."""
    client.script_flush()  # the release then takes a few round trips (it loads STORE)
    aclient = redis_server.aclient()
    cache = RedisCache(aclient, ttl=60, namespace="run", lock_timeout=5)

    @request_memo(shared=cache)
    async def slow(n: int) -> int:
        await asyncio.sleep(0.3)
        return n

    async def request() -> int:
        async with request_scope():
            return await slow(1)

    async def gives_up() -> None:
        import anyio

        with anyio.move_on_after(0.1):  # cancels every await, the release's too
            await request()

    asyncio.run(gives_up())
    assert not [k for k in client.scan_iter("run:*") if k.endswith(b":lock")]
    start = time.monotonic()
    assert asyncio.run(request()) == 1
    assert time.monotonic() - start < 1  # not lock_timeout


def test_async_callers_cancelled_at_random_points_leave_no_lock(
    redis_server: Any, client: redis.Redis
) -> None:
    """anyio cancel scopes with random deadlines around calls of three keys that expire
    fast, some raising: a caller is cancelled at every await of a miss (GET, CLAIM,
    EXTEND, the computation, STORE). Once they are done, no lock is left in Redis for
    the keys' next misses, in any process, to wait out."""
    import random

    import anyio

    rng = random.Random(7)

    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=0.05, namespace="storm", lock_timeout=5)

        @request_memo(shared=cache)
        async def f(n: int) -> int:
            await asyncio.sleep(rng.random() * 0.01)
            if rng.random() < 0.1:
                raise ValueError(n)
            return n

        async def caller() -> None:
            for _ in range(100):
                with anyio.move_on_after(rng.random() * 0.012):
                    async with request_scope():
                        with contextlib.suppress(ValueError):
                            await f(rng.randrange(3))

        await asyncio.gather(*(caller() for _ in range(10)))
        for _ in range(40):  # the releases left to tasks of their own end; a CLAIM the
            locks = [k for k in client.scan_iter("storm:*") if k.endswith(b":lock")]
            if not locks:  # server ran after its caller's release holds op_timeout at most
                break
            await asyncio.sleep(0.025)
        else:
            raise AssertionError([client.pttl(k) for k in locks])
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())
