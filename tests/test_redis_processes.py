"""Across processes, against a real redis-server: values computed in one process are
read by the others; a stampede of 4 processes x 20 threads or tasks on one expiring
key computes it once per expiry; a lock holder killed mid-computation is taken over
when its lock expires. Children are spawned (fresh interpreters, as separate servers)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
import redis
import redis_apps

from perrequest import request_memo, request_scope
from perrequest.redis import RedisCache

pytestmark = pytest.mark.timeout(120)

_spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def client(redis_server: Any) -> Any:
    with redis_server.client() as client:
        yield client


def test_values_computed_in_one_process_are_read_in_the_others(
    redis_server: Any, client: redis.Redis
) -> None:
    with ProcessPoolExecutor(2, mp_context=_spawn) as pool:
        first = pool.submit(redis_apps.compute, redis_server.port, 7).result(60)
        assert first != os.getpid()
        # Another process, the same function: a hit, with the first process's value.
        cache = RedisCache(client, ttl=60, namespace="shared")
        square = request_memo(shared=cache)(redis_apps._square)
        with request_scope():
            assert square(7) == {"square": 49, "pid": first}
        assert cache.stats().hits == 1 and cache.stats().misses == 0
        with request_scope():
            assert square(8) == {"square": 64, "pid": os.getpid()}  # computed here
        assert pool.submit(redis_apps.compute, redis_server.port, 8).result(60) == os.getpid()
    assert client.dbsize() == 2


@pytest.mark.slow  # seconds of waits: make check skips it
@pytest.mark.parametrize("kinds", [("sync",) * 4, ("sync", "sync", "async", "async")])
def test_a_stampede_of_4_processes_computes_once_per_expiry(
    redis_server: Any, client: redis.Redis, kinds: tuple[str, ...]
) -> None:
    ttl, compute_s, seconds = 0.5, 0.1, 2.5
    barrier, out = _spawn.Barrier(len(kinds)), _spawn.Queue()
    children = [
        _spawn.Process(
            target=redis_apps.stampede,
            args=(redis_server.port, kind, ttl, compute_s, seconds, barrier, out),
        )
        for kind in kinds
    ]
    for child in children:
        child.start()
    calls = [out.get(timeout=90) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    starts = sorted(float(item.split()[0]) for item in client.lrange("computations", 0, -1))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Each computation starts after the previous value expired (its end + ttl): a second
    # computation of the same expiry would start within compute_s of the first.
    assert gaps and min(gaps) >= ttl, (starts, calls)
    assert 3 <= len(starts) <= seconds / (ttl + compute_s) + 2
    assert sum(calls) > 20 * len(starts)  # thousands of calls, a handful of computations
    computed_by = {item.split()[1] for item in client.lrange("computations", 0, -1)}
    assert len(computed_by) >= 1


def test_a_lock_holder_killed_mid_computation_is_taken_over_when_its_lock_expires(
    redis_server: Any, client: redis.Redis
) -> None:
    lock_timeout = 1.0
    holder = _spawn.Process(target=redis_apps.hold_the_lock, args=(redis_server.port, lock_timeout))
    holder.start()
    deadline = time.monotonic() + 60
    while not client.exists("holding"):
        assert holder.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    taken_at = time.monotonic()
    cache = RedisCache(client, ttl=60, namespace="held", lock_timeout=lock_timeout)
    held = request_memo(shared=cache)(redis_apps.held)
    result: list[Any] = []

    def waiter() -> None:
        with request_scope():
            result.append(held(1))

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    holder.kill()  # SIGKILL mid-computation: it never releases its lock
    holder.join(10)
    thread.join(10)
    elapsed = time.monotonic() - taken_at
    assert result == [f"computed by {os.getpid()}"]
    assert elapsed < lock_timeout + 0.5  # it took over as the lock expired
    stats = cache.stats()
    assert (stats.lock_waits, stats.lock_timeouts, stats.misses) == (1, 0, 1)
    with request_scope():
        assert held(1) == f"computed by {os.getpid()}"  # and stored it for the others
    assert cache.stats().hits == 1


MANY = 100_000  # over twenty times the keys 2 MB holds (a million took 3 minutes of CI)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ten_times_more_distinct_keys_than_fit_stay_within_redis_maxmemory(own_redis: Any) -> None:
    """Every entry has a TTL, so the server's eviction policy bounds what TTLs alone
    would not (a million keys an hour): Redis memory stays under maxmemory, and the
    tier never fails while keys (values and locks) are evicted under it."""
    maxmemory = 2 * 1024 * 1024
    server = own_redis("--maxmemory", str(maxmemory), "--maxmemory-policy", "allkeys-lru")
    processes, out = 4, _spawn.Queue()
    children = [
        _spawn.Process(
            target=redis_apps.many_keys,
            args=(server.port, i * MANY // processes, MANY // processes, out),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    peak = 0
    with server.client() as client:
        while any(child.is_alive() for child in children) and out.qsize() < processes:
            peak = max(peak, client.info("memory")["used_memory"])
            time.sleep(0.05)
        stats = [out.get(timeout=60) for _ in children]
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        evicted, size = client.info("stats")["evicted_keys"], client.dbsize()
    assert sum(s["misses"] for s in stats) == MANY  # every key computed and offered to Redis
    assert sum(s["errors"] for s in stats) == 0
    assert peak <= maxmemory * 1.02, peak
    assert size < MANY and evicted + size >= MANY, (evicted, size)  # the rest was evicted


def _computing_from_the_old_row(
    pool: ProcessPoolExecutor, port: int, client: redis.Redis, lock_timeout: float
) -> Any:
    """Another process computing ``priced("a")`` under its lock, from the old row (1),
    until the key "release" is set: the future of its result."""
    slow = pool.submit(redis_apps.price_slowly, port, lock_timeout)
    deadline = time.monotonic() + 60
    while not client.exists("computing"):
        assert not slow.done() and time.monotonic() < deadline
        time.sleep(0.01)
    return slow


@pytest.mark.parametrize("how", ["its lock expired", "cache_delete"])
def test_a_computation_that_lost_its_lock_never_overwrites_a_fresher_value(
    redis_server: Any, client: redis.Redis, how: str
) -> None:
    """A process computes from the old row and is still at it when its lock expires, or
    when another process updates the row and deletes the entry (read your own writes).
    The other process computes from the new row and stores it; the first one, ending
    later, must not write its stale value over the fresh one, for a whole ttl."""
    lock_timeout = 0.3
    client.set("row", 1)
    with ProcessPoolExecutor(1, mp_context=_spawn) as pool:
        slow = _computing_from_the_old_row(pool, redis_server.port, client, lock_timeout)
        cache = RedisCache(client, ttl=60, namespace="stale", lock_timeout=lock_timeout)
        priced = request_memo(shared=cache, key=lambda port, sku: sku)(redis_apps._priced)
        client.set("row", 2)
        if how == "cache_delete":
            assert not priced.cache_delete(redis_server.port, "a")  # nothing stored yet
        else:
            time.sleep(lock_timeout + 0.1)
        with request_scope():
            assert priced(redis_server.port, "a") == 2
        client.set("release", 1)
        assert slow.result(30) == 1  # the stale computation ends, after ours
    with request_scope():
        assert priced(redis_server.port, "a") == 2
    assert cache.stats().misses == 1 and cache.stats().hits == 1


def test_of_two_computations_that_outlive_their_locks_the_later_ones_value_is_kept(
    redis_server: Any, client: redis.Redis
) -> None:
    """Both slower than ``lock_timeout`` (if the function is slow for one process, it is
    for the next): the first process's lock expires, ours takes it over from the new row
    and outlives its lock too; the first ends and offers its old value while ours still
    computes. Ours, the later one, is what stays for the ttl (docs/redis.md)."""
    lock_timeout = 0.3
    client.set("row", 1)
    with ProcessPoolExecutor(1, mp_context=_spawn) as pool:
        slow = _computing_from_the_old_row(pool, redis_server.port, client, lock_timeout)
        client.set("row", 2)
        time.sleep(lock_timeout + 0.1)  # the first process's lock expires

        def priced(port: int, sku: str) -> int:
            price = redis_apps._priced(port, sku)  # the new row
            time.sleep(lock_timeout + 0.1)  # our lock expires too
            client.set("release", 1)
            assert slow.result(30) == 1  # the first ends and offers its value, before us
            return price

        priced.__module__, priced.__qualname__ = "redis_apps", "priced"  # the same key
        cache = RedisCache(client, ttl=60, namespace="stale", lock_timeout=lock_timeout)
        memo = request_memo(shared=cache, key=lambda port, sku: sku)(priced)
        with request_scope():
            assert memo(redis_server.port, "a") == 2
    with request_scope():
        assert memo(redis_server.port, "a") == 2
    assert cache.stats().misses == 1 and cache.stats().hits == 1
