"""The shared tier: @request_memo(shared=cache) with a bounded process-wide cache."""

from __future__ import annotations

import asyncio
import collections
import datetime
import enum
import gc
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cachetools
import pytest

from perrequest import (
    CacheInfo,
    PerRequestError,
    SharedCacheInfo,
    SharedComputationError,
    request_memo,
    request_scope,
)
from perrequest._shared_errors import NOTE


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "cache",
    [
        cachetools.LRUCache(maxsize=100),
        cachetools.TTLCache(maxsize=100, ttl=60),
        cachetools.LFUCache(maxsize=100),
    ],
    ids=["LRUCache", "TTLCache", "LFUCache"],
)
def test_hits_across_requests(cache: MutableMapping[Any, Any]) -> None:
    calls = []

    @request_memo(shared=cache)
    def price(sku: str) -> int:
        calls.append(sku)
        return len(sku)

    with request_scope():
        assert price("abc") == 3 and price("abc") == 3
    with request_scope():
        assert price("abc") == 3
        assert price.cache_info() == CacheInfo(0, 1, None, 1)  # a miss, served by shared
        assert price.shared_info() == SharedCacheInfo(1, 1, 100, 1)
    assert price.cache_info() == CacheInfo(0, 0, None, 0)  # outside a scope: zeros
    assert price.shared_info() == SharedCacheInfo(1, 1, 100, 1)  # the process's
    assert calls == ["abc"]


class Bounded(collections.UserDict[Any, Any]):
    """Any mapping with a maxsize is accepted; enforcing it is the mapping's job."""

    maxsize = 2


def test_any_mapping_with_a_maxsize() -> None:
    @request_memo(shared=Bounded())
    def f(x: int) -> int:
        return x

    with request_scope():
        assert f(1) == 1
        assert f.cache_info() == (0, 1, None, 1) and f.shared_info() == (0, 1, 2, 1)
    # Outside a scope cache_info() reports zeros (DESIGN.md); the shared cache is the process's.
    assert f.cache_info() == (0, 0, None, 0) and f.shared_info() == (0, 1, 2, 1)


class NoBound(MutableMapping[Any, Any]):
    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.data[key] = value

    def __delitem__(self, key: Any) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


@pytest.mark.parametrize(
    ("cache", "error", "message"),
    [
        ({}, TypeError, "dict: it has no maxsize"),
        (collections.OrderedDict(), TypeError, "OrderedDict"),
        (NoBound(), TypeError, "no maxsize"),
        ([], TypeError, "mutable mapping"),
        (cachetools.LRUCache(maxsize=float("inf")), ValueError, "finite"),
        (cachetools.LRUCache(maxsize=0.5), ValueError, "from 1"),  # refuses every value
    ],
)
def test_unbounded_caches_are_refused(cache: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        request_memo(shared=cache)(lambda x: x)
    assert "cachetools.LRUCache" in str(info.value) and "TTLCache" in str(info.value)


@pytest.mark.parametrize("kind", ["RedisCache", "LRUCache"])
def test_a_cache_class_instead_of_a_cache_is_refused_when_request_memo_is_called(
    kind: str,
) -> None:
    from perrequest.redis import RedisCache

    cls, make = {
        "RedisCache": (RedisCache, "RedisCache(client, ttl=300, namespace='shop')"),
        "LRUCache": (cachetools.LRUCache, "cachetools.LRUCache(maxsize=10_000)"),
    }[kind]
    with pytest.raises(TypeError) as info:
        request_memo(shared=cls)  # before decorating anything
    message = str(info.value)
    assert f"shared={kind}) got the class" in message and "needs an instance" in message
    assert make in message and "ABCMeta" not in message


def test_version_is_refused_with_an_in_process_cache() -> None:
    with pytest.raises(TypeError, match=r"LRUCache lives in one process.*Drop version="):
        request_memo(shared=cachetools.LRUCache(maxsize=10), version=2)


def test_repeatable_reads_within_a_request() -> None:
    clock = FakeClock()
    cache = cachetools.TTLCache(maxsize=10, ttl=10, timer=clock)
    version = [1]

    @request_memo(shared=cache)
    def config() -> int:
        return version[0]

    with request_scope():
        assert config() == 1
        version[0] = 2
        clock.now = 100  # the shared entry expires mid-request...
        assert config() == 1  # ...but this request keeps reading its own copy
        cache.clear()
        assert config() == 1
    with request_scope():
        assert config() == 2  # expired between requests: recomputed
    clock.now = 105
    with request_scope():
        assert config() == 2 and config.shared_info().hits >= 1  # type: ignore[union-attr]


def test_concurrent_misses_across_requests_compute_once_in_threads() -> None:
    calls = []
    start = threading.Barrier(8)

    @request_memo(shared=cachetools.LRUCache(maxsize=10))
    def slow(x: int) -> int:
        calls.append(x)
        time.sleep(0.05)
        return x * 3

    @request_scope()
    def request() -> int:
        start.wait()
        return slow(7)

    with ThreadPoolExecutor(8) as pool:
        assert [f.result() for f in [pool.submit(request) for _ in range(8)]] == [21] * 8
    assert calls == [7]


@pytest.mark.parametrize("tier", ["cachetools", "redis"])
def test_both_tiers_count_a_waiter_as_a_shared_hit(
    tier: str, request: pytest.FixtureRequest
) -> None:
    shared: Any = cachetools.LRUCache(maxsize=10)
    if tier == "redis":
        from perrequest.redis import RedisCache

        shared = RedisCache(request.getfixturevalue("redis_server").client(), ttl=60, namespace="t")
    start = threading.Barrier(8)

    @request_memo(shared=shared)
    def slow(x: int) -> int:
        time.sleep(0.1)
        return x * 3

    @request_scope()
    def one_request() -> int:
        start.wait()
        return slow(7)

    with ThreadPoolExecutor(8) as pool:
        assert [f.result() for f in [pool.submit(one_request) for _ in range(8)]] == [21] * 8
    assert slow.shared_info()[:2] == (7, 1)  # every call, counted once


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
@pytest.mark.parametrize("tier", ["cachetools", "redis"])
def test_a_process_forked_while_a_value_is_computed_does_not_wait_for_it(
    tier: str, request: pytest.FixtureRequest
) -> None:
    """multiprocessing's fork (the default on Linux before Python 3.14) copies the
    process with its shared tiers' bookkeeping, but not the thread computing a value:
    the child must not wait for a computation that never ends there."""
    import multiprocessing

    shared: Any = cachetools.LRUCache(maxsize=10)
    if tier == "redis":
        from perrequest.redis import RedisCache

        shared = RedisCache(request.getfixturevalue("redis_server").client(), ttl=60, namespace="f")
    started = threading.Event()

    @request_memo(shared=shared)
    def slow(x: int) -> int:
        if multiprocessing.parent_process() is None:  # the parent computes slowly
            started.set()
            time.sleep(1)
        return x * 3

    def child(out: Any) -> None:
        with request_scope():
            out.put(slow(7))

    thread = threading.Thread(target=request_scope()(slow), args=(7,))
    thread.start()
    assert started.wait(5)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    try:
        assert queue.get(timeout=5) == 21
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        thread.join(5)


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_process_forked_while_another_thread_stores_gets_the_cache_whole() -> None:
    """A fork copies a cache as it is at that instant: forked while another thread was
    halfway through a store (a TTLCache unlinking expired entries), the child got the
    cache halfway, and a fresh lock to use it with. The fork waits for the operation."""
    import multiprocessing

    cache = Stalling()

    @request_memo(shared=cache)
    def price(n: int) -> int:
        return n

    def child(out: Any) -> None:
        inside = cache.inside  # how many threads were using the cache at the fork
        with request_scope():
            out.put((inside, price(2)))

    with ThreadPoolExecutor(1) as pool:
        storing = pool.submit(request_scope()(price), 1)
        assert cache.entered.wait(5)
        threading.Timer(0.3, cache.release.set).start()  # the store ends after the fork starts
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        try:
            assert queue.get(timeout=10) == (0, 2)
        finally:
            cache.release.set()
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        assert storing.result(5) == 1


async def test_concurrent_misses_across_requests_compute_once_in_asyncio() -> None:
    calls = []

    @request_memo(shared=cachetools.TTLCache(maxsize=10, ttl=60))
    async def slow(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.02)
        return x * 3

    @request_scope()
    async def request() -> int:
        return await slow(5)

    assert await asyncio.gather(*(request() for _ in range(30))) == [15] * 30
    assert calls == [5]


def test_exceptions_are_not_cached_in_either_tier() -> None:
    attempts = []

    @request_memo(shared=cachetools.LRUCache(maxsize=10))
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise TimeoutError("upstream")
        return "ok"

    with request_scope():
        with pytest.raises(TimeoutError):
            flaky()
        assert flaky() == "ok"
    with request_scope():
        assert flaky() == "ok"
    assert len(attempts) == 2


def test_outside_a_scope_nothing_is_cached_anywhere() -> None:
    cache = cachetools.LRUCache(maxsize=10)
    calls = []

    @request_memo(shared=cache)
    def f(x: int) -> int:
        calls.append(x)
        return x

    assert f(1) == 1 and f(1) == 1
    assert calls == [1, 1] and len(cache) == 0


def test_cache_clear_drops_this_functions_shared_entries_only() -> None:
    cache = cachetools.LRUCache(maxsize=10)

    @request_memo(shared=cache)
    def a(x: int) -> str:
        return f"a{x}"

    @request_memo(shared=cache)
    def b(x: int) -> str:
        return f"b{x}"

    with request_scope():
        assert (a(1), b(1)) == ("a1", "b1")  # two functions, one cache, no sharing
        a.cache_clear()
        assert len(cache) == 1 and a.cache_info().currsize == 0
        assert a(2) == "a2" and len(cache) == 2
    a.cache_clear()  # outside a scope (a deploy hook): the shared cache outlives requests
    assert len(cache) == 1 and b(1) == "b1"


@pytest.mark.slow  # fills a cache of 300,000 entries
def test_clearing_a_big_cache_never_stalls_other_functions() -> None:
    """One lock guards every in-process shared cache, so it is held for single reads
    and writes only: a deploy hook's cache_clear() of a big cache must not hold every
    other shared memo of the process (and the event loops calling them) meanwhile."""
    big = cachetools.LRUCache(maxsize=300_000)

    @request_memo(shared=big)
    def price(n: int) -> int:
        return n

    @request_memo(shared=cachetools.LRUCache(maxsize=10))
    def flag(name: str) -> bool:
        return True

    with request_scope(max_entries=None):
        for n in range(300_000):
            price(n)
    waits: list[float] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            start = time.perf_counter()
            with request_scope():
                flag("beta")
            waits.append(time.perf_counter() - start)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    start = time.perf_counter()
    price.cache_clear()
    took = time.perf_counter() - start
    time.sleep(0.05)
    done.set()
    thread.join(10)
    assert len(big) == 0
    assert max(waits) < max(0.1, took / 3), (max(waits), took)


class Stalling(collections.UserDict[Any, Any]):
    """A cache whose stores can be held up, as a TTLCache's expiry of many entries does
    (its ``__setitem__`` removes every expired entry first), and which notes whether two
    threads were ever inside it at once."""

    maxsize = 10

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.inside, self.overlapped = 0, False

    def __getitem__(self, key: Any) -> Any:
        self.inside += 1
        self.overlapped |= self.inside > 1
        try:
            time.sleep(0.001)
            return super().__getitem__(key)
        finally:
            self.inside -= 1

    def __len__(self) -> int:
        self.inside += 1
        self.overlapped |= self.inside > 1
        try:
            return super().__len__()
        finally:
            self.inside -= 1

    def __setitem__(self, key: Any, value: Any) -> None:
        self.inside += 1
        self.overlapped |= self.inside > 1
        try:
            self.entered.set()
            assert self.release.wait(5)
            super().__setitem__(key, value)
        finally:
            self.inside -= 1


def test_a_slow_store_in_one_cache_never_stalls_functions_on_other_caches() -> None:
    """A TTLCache with 300,000 expired entries spent 0.26 s in one store, while every
    other shared memo of the process waited for the one lock they shared."""
    slow_cache = Stalling()

    @request_memo(shared=slow_cache)
    def price(n: int) -> int:
        return n

    @request_memo(shared=cachetools.LRUCache(maxsize=10))
    def flag(name: str) -> bool:
        return True

    with ThreadPoolExecutor(2) as pool:
        storing = pool.submit(request_scope()(price), 1)
        assert slow_cache.entered.wait(5)
        try:
            assert pool.submit(request_scope()(flag), "beta").result(timeout=2) is True
        finally:
            slow_cache.release.set()
        assert storing.result(5) == 1


def test_functions_sharing_a_cache_never_use_it_at_once() -> None:
    """cachetools caches are not thread-safe: functions that share one share its lock."""
    cache = Stalling()
    cache.release.set()

    @request_memo(shared=cache)
    def a(n: int) -> int:
        return n

    @request_memo(shared=cache)
    def b(n: int) -> int:
        return -n

    def calls(fn: Callable[[int], int]) -> None:
        for n in range(30):
            with request_scope():
                fn(n % 5)

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(calls, a), pool.submit(calls, b)]:
            done.result(10)
    assert not cache.overlapped and len(cache) == 10


def test_cache_info_reads_the_cache_size_under_its_lock() -> None:
    """A TTLCache's ``len()`` removes the expired entries first: cache_info() called while
    another thread stored in the cache raised KeyError from inside cachetools, and left
    the cache corrupt (its length and its keys no longer agreed)."""
    cache = Stalling()

    @request_memo(shared=cache)
    def price(n: int) -> int:
        return n

    with ThreadPoolExecutor(2) as pool:
        storing = pool.submit(request_scope()(price), 1)
        assert cache.entered.wait(5)
        try:
            info = pool.submit(price.shared_info)
            time.sleep(0.2)  # time enough to read the size while price(1) is storing
        finally:
            cache.release.set()
        assert storing.result(5) == 1
        assert info.result(5).currsize in (0, 1)
    assert not cache.overlapped


@pytest.mark.parametrize("tier", ["cachetools", "redis"])
def test_cache_delete_says_whether_either_tier_had_the_entry(
    tier: str, request: pytest.FixtureRequest
) -> None:
    shared: Any = cachetools.LRUCache(maxsize=10)
    if tier == "redis":
        from perrequest.redis import RedisCache

        shared = RedisCache(request.getfixturevalue("redis_server").client(), ttl=60, namespace="t")

    @request_memo(shared=shared)
    def price(sku: str) -> int:
        return len(sku)

    with request_scope():
        price("a"), price("bb")
    with request_scope():  # a new request: the entries are in the shared tier only
        assert price.cache_delete("a") is True
        assert price.cache_delete("a") is False
    assert price.cache_delete("bb") is True  # outside a scope (a deploy hook)
    assert price.cache_delete("bb") is False


@pytest.mark.parametrize("entry", [True, False])
def test_the_shared_tier_says_whether_it_had_the_entry(entry: bool) -> None:
    from perrequest._shared import SharedTier

    cache = cachetools.LRUCache(maxsize=10)
    if entry:
        cache["k"] = 1
    assert SharedTier(cache).delete("k") is entry and "k" not in cache


def test_methods_need_a_key() -> None:
    with pytest.raises(TypeError, match="key="):

        class Repo:
            @request_memo(shared=cachetools.LRUCache(maxsize=10))
            def find(self, x: int) -> int:
                return x

    class Users:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

        @request_memo(
            shared=cachetools.LRUCache(maxsize=10), key=lambda self, uid: (self.tenant, uid)
        )
        def name(self, uid: int) -> str:
            return f"{self.tenant}:{uid}"

    with request_scope():
        assert Users("t1").name(1) == "t1:1"
    with request_scope():
        assert Users("t1").name(1) == "t1:1"
        assert Users.name.shared_info().hits == 1  # type: ignore[attr-defined]


def test_shared_tier_stays_within_its_bound() -> None:
    cache = cachetools.LRUCache(maxsize=1000)

    @request_memo(shared=cache)
    def ident(x: int) -> int:
        return x

    for batch in range(20):
        with request_scope(max_entries=500) as store:
            for i in range(batch * 5000, (batch + 1) * 5000):
                assert ident(i) == i
            assert len(store) == 500
        assert len(cache) == 1000
    with request_scope():
        assert ident.shared_info().misses == 100_000  # type: ignore[attr-defined]


def test_oversized_values_are_served_but_not_cached() -> None:
    cache = cachetools.LRUCache(maxsize=10, getsizeof=len)

    @request_memo(shared=cache)
    def blob(n: int) -> str:
        return "x" * n

    with request_scope():
        assert blob(100) == "x" * 100
    assert len(cache) == 0


class Failed(Exception):
    def __init__(self, who: str) -> None:
        super().__init__(who)
        self.who = who


def _computing_and_waiting(
    error: Callable[[], BaseException], shared: Any = None
) -> list[BaseException]:
    """Two requests call a shared memo that raises ``error()``, the second while the first
    computes: [the computing request's exception, the waiting request's]."""
    started, release = threading.Event(), threading.Event()

    @request_memo(shared=cachetools.LRUCache(maxsize=10) if shared is None else shared)
    def load(key: str) -> str:
        secret = "request one's token"  # noqa: F841 - a local an error page would show
        mine = Secret()  # noqa: F841 - an object only the computing request's frame holds
        started.set()
        assert release.wait(5)
        raise error()

    def request() -> BaseException:
        with request_scope():
            try:
                load("k")
            except Exception as exc:
                return exc
        raise AssertionError("load() should have raised")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(request)
        assert started.wait(5)
        second = pool.submit(request)
        if shared is None:  # the second request waits on the first's computation
            _until_waiting(load, 1)
        else:  # Redis: it waits for the first's lock, counted once it reads the value
            time.sleep(0.05)
        release.set()
        errors = [first.result(5), second.result(5)]
    waiting = next(e for e in errors if NOTE in vars(e).get("__notes__", ()))
    return [next(e for e in errors if e is not waiting), waiting]


def _until_waiting(fn: Any, waiters: int) -> None:
    """Until ``waiters`` calls of ``fn`` wait on its computation (each counts as a shared
    hit as it starts waiting): a fixed sleep was too short on a loaded machine."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with request_scope():
            if fn.shared_info().hits >= waiters:
                return
        time.sleep(0.001)
    raise AssertionError(f"{waiters} calls never waited")


class Secret:
    """What the computing request's frame holds: never reachable from a waiter's error."""


def _reachable(error: BaseException) -> list[object]:
    """Every object reachable from ``error`` (its traceback's frames and their callers
    too), short of code and module-level things (types, functions, modules' globals),
    which every request shares."""
    shared = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
    globals_ = {id(vars(m)) for m in list(sys.modules.values()) if m is not None}
    seen, todo, found = {id(error)}, [error], []
    while todo:
        obj = todo.pop()
        found.append(obj)
        assert len(found) < 200_000, "the walk left the waiter's own objects"
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, shared) and id(ref) not in globals_:
                seen.add(id(ref))
                todo.append(ref)
    return found


class MultiError(Exception):
    """A common pattern: an error carrying the errors it collected, in a list."""

    def __init__(self, errors: list[Exception]) -> None:
        super().__init__(errors)
        self.errors = errors
        self.by_part = {"parts": [(errors[-1],)]}  # and deeper


def _collected() -> MultiError:
    errors: list[Exception] = []
    for part in (1, 2):
        try:
            raise ValueError(f"part {part} failed")
        except ValueError as exc:
            errors.append(exc)
    return MultiError(errors)


@pytest.mark.parametrize("tier", ["cachetools", "redis"])
@pytest.mark.parametrize("make", [_collected, lambda: Failed("db down")], ids=["nested", "plain"])
def test_nothing_of_the_computing_request_is_reachable_from_a_waiters_error(
    tier: str, make: Callable[[], Exception], request: pytest.FixtureRequest
) -> None:
    """Errors inside lists, tuples and dicts of an error's arguments and attributes are
    copied too; and no frame of the waiter's traceback (perrequest's own included)
    holds the original."""
    shared = None
    if tier == "redis":
        from perrequest.redis import RedisCache

        client = request.getfixturevalue("redis_server").client()
        shared = RedisCache(client, ttl=60, namespace="t")
    computing, waiting = _computing_and_waiting(make, shared)
    assert type(waiting) is type(computing) and waiting is not computing
    if isinstance(waiting, MultiError):
        assert [str(e) for e in waiting.errors] == ["part 1 failed", "part 2 failed"]
        assert waiting.args[0] == waiting.errors
        assert waiting.by_part["parts"][0][0] is waiting.errors[1]
    theirs = [computing, *getattr(computing, "errors", ())]
    assert all(e.__traceback__ is not None for e in theirs)  # their frames...
    reached = _reachable(waiting)
    assert not [o for o in reached if any(o is e for e in theirs)]  # ...are not the waiter's
    assert not [o for o in reached if isinstance(o, Secret)]
    frames = [o for o in reached if isinstance(o, types.FrameType)]
    assert frames and not [f for f in frames if "mine" in f.f_code.co_varnames]


def test_another_requests_waiter_gets_a_copy_of_the_error_without_its_frames() -> None:
    """A waiter in another request must not receive the computing request's traceback
    (its frames hold that request's locals: an error page would show them)."""
    computing, waiting = _computing_and_waiting(lambda: Failed("db down"))
    assert type(waiting) is Failed and waiting.args == ("db down",) and waiting.who == "db down"
    assert waiting is not computing

    def locals_in(error: BaseException) -> list[str]:
        names, tb = [], error.__traceback__
        while tb is not None:
            names += list(tb.tb_frame.f_locals)
            tb = tb.tb_next
        return names

    assert "secret" in locals_in(computing)  # the computing request's frame...
    assert "secret" not in locals_in(waiting)  # ...is not in the waiter's copy
    assert "another request" in waiting.__notes__[-1]


class Upstream:
    """An object an error keeps (a response, a client): what it refers to is anyone's guess."""


class WithResponse(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.response = Upstream()


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "make",
    [
        lambda: WithResponse("502 from upstream"),
        lambda: Wrapped("502 from upstream", list(range(5000))),
        lambda: Wrapped("502 from upstream", _nested(50)),
    ],
    ids=["an object of any other type", "too many values", "nested too deep"],
)
def test_an_error_carrying_more_than_plain_values_reaches_a_waiter_by_name_only(
    make: Callable[[], Exception],
) -> None:
    computing, waiting = _computing_and_waiting(make)
    assert type(waiting) is SharedComputationError and isinstance(waiting, PerRequestError)
    assert f"{type(computing).__qualname__}: {str(computing)[:500]}" in str(waiting)
    assert len(str(waiting)) < 2_200  # quoted up to 2,000 characters
    assert waiting.__cause__ is None and waiting.__context__ is None
    assert not [o for o in _reachable(waiting) if o is computing or isinstance(o, Upstream)]
    # What an except clause can tell it by (a 502 page for the original type): the type's
    # name, not only in the message (an audit of 5 December 2026).
    assert waiting.original_type == f"{__name__}.{type(computing).__qualname__}"


@pytest.mark.parametrize("kind", [Failed, WithResponse], ids=["a copy", "by name"])
def test_a_waiters_error_keeps_the_errors_own_notes(kind: type[Exception]) -> None:
    def make() -> Exception:
        error = kind("db down")
        error.add_note("while fetching price of sku-42")
        return error

    computing, waiting = _computing_and_waiting(make)
    assert waiting.__notes__ == ["while fetching price of sku-42", NOTE]
    assert computing.__notes__ == ["while fetching price of sku-42"]  # left as it was


def test_a_waiters_copy_is_rebuilt_as_copy_does_oserrors_filename_included() -> None:
    computing, waiting = _computing_and_waiting(
        lambda: FileNotFoundError(2, "No such file or directory", "/srv/prices.csv")
    )
    assert type(waiting) is FileNotFoundError and str(waiting) == str(computing)
    assert (waiting.errno, waiting.filename) == (2, "/srv/prices.csv")


def _inner_error() -> ValueError:
    secret = "request one's token"  # noqa: F841 - a local an error page would show
    try:
        raise ValueError("inner")
    except ValueError as exc:
        return exc


def _carried_errors(error: BaseException) -> list[BaseException]:
    """The exceptions an error carries: a group's, in its arguments and attributes."""
    found = [error]
    if isinstance(error, BaseExceptionGroup):
        found += [e for sub in error.exceptions for e in _carried_errors(sub)]
    for value in (*error.args, *vars(error).values()):
        if isinstance(value, BaseException):
            found += _carried_errors(value)
    return found


class Wrapped(Exception):
    pass


@pytest.mark.parametrize(
    "make",
    [
        lambda: ExceptionGroup("many", [_inner_error()]),
        lambda: Wrapped(_inner_error()),
        lambda: setattr(error := Wrapped("outer"), "original", _inner_error()) or error,
    ],
    ids=["exception group", "in the arguments", "in an attribute"],
)
def test_the_errors_an_error_carries_reach_a_waiter_as_copies_too(
    make: Callable[[], BaseException],
) -> None:
    computing, waiting = _computing_and_waiting(make)
    theirs, ours = _carried_errors(computing), _carried_errors(waiting)
    assert len(ours) == len(theirs) == 2
    assert theirs[1].__traceback__ is not None  # the computing request's inner error...
    assert not {id(e) for e in ours} & {id(e) for e in theirs}  # ...is not the waiter's
    assert ours[1].__traceback__ is None  # (ours[0]'s is the waiter's own, raised there)
    assert [type(e) for e in ours] == [type(e) for e in theirs]
    assert ours[1].args == ("inner",)


def test_a_cache_without_weak_references_works_and_is_not_kept() -> None:
    class SlotsCache(MutableMapping[Any, Any]):
        __slots__ = ("data", "maxsize")

        def __init__(self) -> None:
            self.data: dict[Any, Any] = {}
            self.maxsize = 10

        def __getitem__(self, key: Any) -> Any:
            return self.data[key]

        def __setitem__(self, key: Any, value: Any) -> None:
            self.data[key] = value

        def __delitem__(self, key: Any) -> None:
            del self.data[key]

        def __iter__(self) -> Iterator[Any]:
            return iter(self.data)

        def __len__(self) -> int:
            return len(self.data)

    for _ in range(50):

        @request_memo(shared=SlotsCache())
        def f(x: int) -> int:
            return x

        with request_scope():
            assert f(1) == 1
    gc.collect()
    assert sum(type(o) is SlotsCache for o in gc.get_objects()) <= 1  # f's own, at most


# -- what a waiter's error may not carry (second audit) ------------------------------------


class Message(str):
    """A str subclass: it may carry attributes of its own."""


class Tz(datetime.tzinfo):
    """A tzinfo of the app's own: any object, which a datetime keeps by reference."""

    def utcoffset(self, dt: Any) -> datetime.timedelta:
        return datetime.timedelta(0)


class Colour(enum.Enum):
    RED = [1]  # a mutable value


class Interned(Exception):
    """A type that hands out one instance per message: rebuilding it gives the original."""

    made: dict[str, Interned] = {}

    def __new__(cls, message: str) -> Interned:
        return cls.made.setdefault(message, super().__new__(cls, message))


class Renumbered(Exception):
    """A ``__reduce__`` whose arguments rebuild another error than the one raised: a copy
    made from them would say something else."""

    def __reduce__(self) -> tuple[type[Renumbered], tuple[object, ...]]:
        return type(self), (f"{self.args[0]} (renumbered)",)


class Reduced(Exception):
    """A ``__reduce__`` that rebuilds it as another type."""

    def __reduce__(self) -> tuple[type[Exception], tuple[object, ...]]:
        return ValueError, self.args


class Disguised(Exception):
    """One instance for all, in a class that says it is built in (pytest's own outcome
    exceptions set ``__module__`` so): the copy must still be a new object."""

    __module__ = "builtins"
    __slots__ = ()
    one: Disguised | None = None

    def __new__(cls, *args: object) -> Disguised:
        if cls.one is None:
            cls.one = super().__new__(cls, *args)
        return cls.one


class MyGroup(ExceptionGroup):  # type: ignore[type-arg]
    """A group subclass: its derive() and fields are its own."""


class Lookups(Exception):
    """An error answering any attribute from a dict (__notes__ included: KeyError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.fields: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return self.fields[name]


def _local_error() -> type[Exception]:
    class Local(Exception):
        pass

    return Local


@pytest.mark.parametrize(
    "make",
    [
        lambda: Wrapped("late", datetime.datetime(2026, 12, 4, tzinfo=Tz())),
        lambda: Wrapped("colour", Colour.RED),
        lambda: Interned("one per message"),
        lambda: Disguised("one for all"),
        lambda: MyGroup("several", [ValueError("a")]),
        lambda: ExceptionGroup(Message("several"), [ValueError("a")]),
        lambda: _local_error()("made in the call"),
        lambda: Renumbered("order 7"),
        lambda: Reduced("order 7"),
    ],
    ids=["datetime with own tzinfo", "enum with mutable value", "interned",
         "disguised as built in", "group subclass", "group with str-subclass message",
         "class defined in the call", "rebuilt with other arguments", "reduced to another type"],
)  # fmt: skip
def test_what_cannot_be_copied_safely_reaches_a_waiter_by_name(
    make: Callable[[], BaseException],
) -> None:
    computing, waiting = _computing_and_waiting(make)
    assert type(waiting) is SharedComputationError and waiting is not computing
    assert not [o for o in _reachable(waiting) if o is computing or isinstance(o, (Secret, Tz))]
    assert waiting.__notes__[-1] == NOTE


def test_an_error_with_a_getattr_of_its_own_is_copied_without_calling_it() -> None:
    computing, waiting = _computing_and_waiting(lambda: Lookups("404"))
    assert type(waiting) is Lookups and waiting is not computing and waiting.args == ("404",)
    assert not [o for o in _reachable(waiting) if o is computing or isinstance(o, Secret)]


def test_plain_timezones_and_groups_are_still_copied() -> None:
    when = datetime.datetime(2026, 12, 4, tzinfo=datetime.UTC)
    computing, waiting = _computing_and_waiting(lambda: Wrapped("late", when))
    assert type(waiting) is Wrapped and waiting.args == ("late", when)
    computing, waiting = _computing_and_waiting(
        lambda: ExceptionGroup("several", [ValueError("a"), KeyError("b")])
    )
    assert type(waiting) is ExceptionGroup and waiting.message == "several"
    assert [type(e) for e in waiting.exceptions] == [ValueError, KeyError]
    assert not [o for o in _reachable(waiting) if o is computing or isinstance(o, Secret)]


def test_a_cache_that_fails_to_store_never_hands_waiters_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A getsizeof that raises on the value: the error would carry the computing request's
    frames to every waiter. The value is returned uncached instead, and that is logged."""
    cache = cachetools.LRUCache(maxsize=10_000, getsizeof=len)  # sized for strings
    started, release = threading.Event(), threading.Event()

    @request_memo(shared=cache)
    def price(item: str) -> int:
        started.set()
        assert release.wait(5)
        return 42  # len(42) raises TypeError in cache[key] = 42

    def request() -> int:
        with request_scope():
            return price("x")

    with caplog.at_level(logging.ERROR, logger="perrequest"), ThreadPoolExecutor(3) as pool:
        first = pool.submit(request)
        assert started.wait(5)
        others = [pool.submit(request) for _ in range(2)]
        _until_waiting(price, 2)
        release.set()
        assert [f.result(5) for f in (first, *others)] == [42, 42, 42]
    assert len(cache) == 0
    assert [r.getMessage() for r in caplog.records if "could not store" in r.getMessage()]


def test_a_huge_message_is_quoted_once_and_short() -> None:
    _, waiting = _computing_and_waiting(lambda: Wrapped("big", list(range(200_000))))
    assert type(waiting) is SharedComputationError and len(str(waiting)) < 2_200


async def test_what_the_computing_request_adds_to_its_error_later_never_reaches_a_waiter() -> None:
    """The waiter's copy is taken as the error is raised, not as the waiter wakes: by
    then the computing request's own handler may have annotated the original with its
    data. Before: the other request's error carried "while serving alice"."""

    release = asyncio.Event()

    @request_memo(shared=cachetools.TTLCache(maxsize=10, ttl=60))
    async def price(sku: str) -> int:
        await release.wait()
        raise ValueError(f"upstream 503 for {sku}")

    async def view(user: str) -> list[str]:
        async with request_scope():
            try:
                await price("sku-1")
            except ValueError as exc:
                exc.add_note(f"while serving {user}")  # the request's own error handling
                return list(exc.__notes__)
        raise AssertionError("price() should have raised")

    alice = asyncio.create_task(view("alice"))
    await asyncio.sleep(0.01)  # alice computes
    bob = asyncio.create_task(view("bob"))
    for _ in range(5000):  # until bob waits for her computation (a shared hit as it starts)
        await asyncio.sleep(0.001)
        with request_scope():
            if price.shared_info().hits:
                break
    release.set()
    notes = await asyncio.wait_for(asyncio.gather(alice, bob), 5)
    assert notes == [["while serving alice"], [NOTE, "while serving bob"]]


class _SecondCopyFails(Exception):
    made = 0

    def __new__(cls, *args: object) -> _SecondCopyFails:  # of its own: copied through its
        return super().__new__(cls, *args)  # constructor, which runs the __init__ below

    def __init__(self, *args: object) -> None:
        type(self).made += 1
        # The original, the copy taken as raised, then a waiter's, which fails (each time:
        # a failure that does not come again is a signal handler's, which goes on).
        if type(self).made >= 3:
            raise RuntimeError("this copy fails")
        super().__init__(*args)


def test_a_waiters_copy_that_fails_names_the_error_with_one_note_of_ours() -> None:
    """The waiter's copy is made from the copy taken as the error was raised: if that
    second copy fails, the SharedComputationError standing for it says "another request"
    once (a review of the change saw the note twice)."""
    _SecondCopyFails.made = 0
    _, waiting = _computing_and_waiting(lambda: _SecondCopyFails("m"))
    assert type(waiting) is SharedComputationError
    assert waiting.__notes__ == [NOTE]
    assert waiting.original_type == f"{__name__}._SecondCopyFails"


def test_a_key_whose_hash_changed_after_it_was_stored_is_named_as_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model stored as a key, then saved as a copy (pk = None: its hash raises). The
    cache cannot find the entry again, so cache_clear() cannot drop it (it raised
    TypeError before), and cachetools' eviction stumbles on it from then on: the logged
    error names the likely cause and key= as the fix (docs/shared.md)."""
    from keys import Model

    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(maxsize=1)

    @request_memo(shared=cache)
    def price(item: Model) -> int:
        return 1

    model = Model(5)
    with request_scope():
        price(model)
    model.pk = None  # "save as copy"
    price.cache_clear()  # before: TypeError from the cache's lookup
    with request_scope(), caplog.at_level(logging.ERROR, logger="perrequest"):
        price(Model(6))  # evicting the changed key fails inside cachetools
    assert "key=lambda obj: obj.pk" in caplog.text


class Rejected(Exception):
    """An error whose ``__init__`` takes keywords only: its ``args`` cannot rebuild it."""

    def __init__(self, *, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


def _http_404() -> BaseException:
    from fastapi import HTTPException

    return HTTPException(status_code=404, detail="no such product")


def _starlette_404() -> BaseException:
    from starlette.exceptions import HTTPException

    return HTTPException(status_code=404, detail="no such product", headers={"X-Why": "gone"})


@pytest.mark.parametrize(
    "make", [_http_404, _starlette_404, lambda: Rejected(code=409, reason="taken")],
    ids=["fastapi HTTPException", "starlette HTTPException", "keyword-only __init__"],
)  # fmt: skip
def test_an_error_made_with_keywords_reaches_a_waiter_as_its_own_type(
    make: Callable[[], BaseException],
) -> None:
    """FastAPI teaches ``raise HTTPException(status_code=404, detail=...)``: keywords, so its
    ``args`` are empty, and rebuilding it from them (as copy and pickle do) raised. Every
    request waiting for the computation got a SharedComputationError (a 500, not the 404).
    An error whose class keeps nothing but its args and attributes is copied without its
    ``__init__``: the same type, args and attributes (copies), none of the original."""
    computing, waiting = _computing_and_waiting(make)
    assert type(waiting) is type(computing) and waiting is not computing
    assert waiting.args == computing.args
    own = {k: v for k, v in vars(waiting).items() if k != "__notes__"}
    assert own == vars(computing) and own  # status_code, detail, headers; code, reason
    assert waiting.__notes__ == [NOTE]
    assert waiting.__traceback__ is not computing.__traceback__
    assert not [o for o in _reachable(waiting) if o is computing]
