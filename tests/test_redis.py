"""The Redis tier against a real redis-server: hits across requests, keys, values,
repeatable reads, TTL, bounds, cache_clear and cache_delete, and bad options."""

from __future__ import annotations

import collections
import functools
import gc
import hashlib
import importlib
import json
import logging
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from perrequest import CacheInfo, UnhashableArguments, request_memo, request_scope
from perrequest.redis import RedisCache, RedisCacheInfo

pytestmark = pytest.mark.timeout(60)

SECRET = "0123456789abcdef0123456789abcdef"


def _key(namespace: str, fn: Any, call_key: Any, version: object = 1) -> str:
    """The documented key format, computed independently of the library."""
    text = json.dumps(call_key, separators=(",", ":"), ensure_ascii=True)
    name = f"{fn.__module__}.{fn.__qualname__}"
    return f"{namespace}:{name}:{version}:{hashlib.sha256(text.encode()).hexdigest()}"


@pytest.fixture
def client(redis_server: Any) -> Any:
    with redis_server.client() as client:
        yield client


@pytest.fixture
def cache(client: redis.Redis) -> Any:
    cache = RedisCache(client, ttl=60, namespace="t")
    yield cache
    cache.close()


def test_values_are_shared_across_requests_and_read_repeatably(
    cache: RedisCache, client: redis.Redis
) -> None:
    calls: list[str] = []

    @request_memo(shared=cache)
    def price(sku: str) -> dict[str, Any]:
        calls.append(sku)
        return {"sku": sku, "cents": 100 * len(sku)}

    with request_scope():
        assert price("abc") == {"sku": "abc", "cents": 300}
        assert price("abc") == {"sku": "abc", "cents": 300}  # a request-store hit
        assert price.cache_info() == CacheInfo(1, 1, None, 1)
        assert price.shared_info() == RedisCacheInfo(0, 1, 0, 0)
    key = _key("t", price, "abc")
    assert json.loads(client.get(key)) == {"sku": "abc", "cents": 300}
    assert 59_000 < client.pttl(key) <= 60_000  # every entry has the TTL
    with request_scope():
        assert price("abc") == {"sku": "abc", "cents": 300}  # read from Redis
        client.set(key, json.dumps({"sku": "abc", "cents": 1}))  # another process updates it
        client.delete(key)
        assert price("abc") == {"sku": "abc", "cents": 300}  # repeatable within the request
        assert price.shared_info() == RedisCacheInfo(1, 1, 0, 0)
    assert calls == ["abc"]
    # Outside a scope: zeros, and the call is not cached; the tier's counts are the process's.
    assert price.cache_info() == CacheInfo(0, 0, None, 0)
    assert price.shared_info() == RedisCacheInfo(1, 1, 0, 0)
    assert cache.stats().hits == 1 and cache.stats().misses == 1


def test_keys_hold_namespace_name_version_and_the_arguments_json_digest(
    client: redis.Redis,
) -> None:
    cache = RedisCache(client, ttl=60, namespace="shop", version="v7")

    @request_memo(shared=cache)
    def total(a: int, b: float, *, label: str = "x") -> float:
        return a + b

    @request_memo(shared=cache, version=3)
    def tagged(value: Any) -> str:
        return str(value)

    with request_scope():
        total(1, 2.5, label="y")
        tagged((1, "a", None, True))
    assert client.exists(_key("shop", total, [1, 2.5, "y"], "v7"))
    assert client.exists(_key("shop", tagged, [1, "a", None, True], 3))
    # Equal-looking but different arguments never share a Redis key (no repr, no str).
    for value, text in (("1", "1"), (1, "1"), (1.0, "1.0"), (True, "True")):
        with request_scope():
            assert tagged(value) == text
    assert client.dbsize() == 6
    cache.close()


def test_typed_keyword_only_and_star_args_calls_have_keys_of_their_own(
    cache: RedisCache, client: redis.Redis
) -> None:
    @request_memo(shared=cache, typed=True)
    def typed(x: Any) -> str:
        return repr(x)

    @request_memo(shared=cache)
    def star(*args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    with request_scope():
        assert (typed(1), typed(1.0), typed(True)) == ("1", "1.0", "True")
        assert star(1, b=2) == [[1], {"b": 2}] and star(1, 2) == [[1, 2], {}]
    with request_scope():
        assert (typed(1), typed(1.0), typed(True)) == ("1", "1.0", "True")
        assert star(1, b=2) == [[1], {"b": 2}] and star(1, 2) == [[1, 2], {}]
        assert typed.shared_info().hits == 3 and star.shared_info().hits == 2
    assert client.dbsize() == 5


def test_a_client_decoding_responses_still_gets_bytes_for_signed_pickles(
    redis_server: Any,
) -> None:
    client = redis_server.client(decode_responses=True)
    cache = RedisCache(client, ttl=60, namespace="d", serializer="pickle", secret=SECRET)

    @request_memo(shared=cache)
    def f(n: int) -> set[int]:
        return {n}

    for _ in range(2):
        with request_scope():
            assert f(1) == {1}
    assert cache.stats().hits == 1 and cache.stats().bad_values == 0
    cache.close()
    client.close()


def test_a_new_version_never_reads_what_the_old_code_wrote(
    cache: RedisCache, client: redis.Redis
) -> None:
    calls = []

    def shape(n: int) -> Any:
        calls.append(n)
        return [n] if len(calls) == 1 else {"n": n}

    old = request_memo(shared=cache)(shape)  # the cache's version, 1
    new = request_memo(shared=cache, version="2")(shape)  # the same function, new code
    with request_scope():
        assert old(5) == [5]
    with request_scope():
        assert new(5) == {"n": 5}  # computed: never the old shape
    with request_scope():
        assert old(5) == [5] and new(5) == {"n": 5}
    assert calls == [5, 5]
    assert client.exists(_key("t", shape, 5, 1), _key("t", shape, 5, "2")) == 2


def test_a_key_function_returning_what_json_cannot_encode_is_named_as_the_cause(
    cache: RedisCache,
) -> None:
    """The arguments are fine and key= is there: the message blames key='s value."""

    @request_memo(shared=cache, key=lambda tags: frozenset(tags))
    def by_tags(tags: tuple[str, ...]) -> int:
        return 1

    with request_scope(), pytest.raises(UnhashableArguments) as info:
        by_tags(("a", "b"))
    message = str(info.value)
    assert "by_tags" in message and "its key= function returned" in message
    assert "frozenset" in message and "Give the decorator key=" not in message


def test_arguments_json_cannot_encode_need_key(cache: RedisCache) -> None:
    @dataclass(frozen=True)
    class Day:
        iso: str

    @request_memo(shared=cache)
    def sales(day: Day, region: str) -> int:
        return 1

    with request_scope(), pytest.raises(UnhashableArguments) as info:
        sales(Day("2026-01-01"), "north")
    message = str(info.value)
    assert "sales" in message and "'day'" in message and "key=" in message

    @request_memo(shared=cache)
    def sales_in(region: str, day: Day) -> int:  # the argument at fault comes second
        return 1

    with request_scope(), pytest.raises(UnhashableArguments, match=r"argument 'day' \("):
        sales_in("north", Day("2026-01-01"))
    # Outside a scope too, as semantics.md promises for every key: a unit test without a
    # scope fails as production would (it called the function; a probe, 7 December).
    with pytest.raises(UnhashableArguments, match=r"argument 'day' \("):
        sales_in("north", Day("2026-01-01"))

    @request_memo(shared=cache, key=lambda day, region: (day.iso, region))
    def sales_by_key(day: Day, region: str) -> int:
        return 2

    with request_scope():
        assert sales_by_key(Day("2026-01-01"), "north") == 2
    with request_scope():
        assert sales_by_key(Day("2026-01-01"), "north") == 2
        assert sales_by_key.shared_info().hits == 1


def test_methods_need_key_and_then_share_across_instances(cache: RedisCache) -> None:
    with pytest.raises(TypeError, match="needs key="):

        class Bad:
            @request_memo(shared=cache)
            def get(self, x: int) -> int:
                return x

    class Repo:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

        @request_memo(shared=cache, key=lambda self, uid: (self.tenant, uid))
        def user(self, uid: int) -> dict[str, Any]:
            return {"tenant": self.tenant, "uid": uid}

    with request_scope():
        assert Repo("a").user(1) == {"tenant": "a", "uid": 1}
    with request_scope():
        assert Repo("a").user(1) == {"tenant": "a", "uid": 1}
        assert Repo.user.shared_info().hits == 1  # type: ignore[attr-defined]


def test_a_function_whose_name_is_not_its_own_is_refused(cache: RedisCache) -> None:
    """Keys hold module.qualname: two live functions of one name would share values."""

    def price(sku: str) -> str:
        return sku

    class Quote:
        def __call__(self, sku: str) -> str:
            return sku

    for fn, why in (
        (functools.partial(price), "partial object has no __qualname__"),
        (lambda sku: sku, "every lambda is named <lambda>"),
        (Quote(), "Quote object has no __qualname__"),
    ):
        with pytest.raises(TypeError, match=why):
            request_memo(shared=cache)(fn)

    def make(factor: int, name: str | None = None) -> Any:
        def scaled(x: int) -> int:
            return x * factor

        if name is not None:
            scaled.__qualname__ = name
        return request_memo(shared=cache)(scaled)

    double = make(2)
    with pytest.raises(TypeError, match=r"another live function is named .*scaled.*__qualname__"):
        make(3)
    triple = make(3, "scaled_by_3")
    again = request_memo(shared=cache, version=2)(double.__wrapped__)  # the same function
    with request_scope():
        assert (double(5), triple(5), again(5)) == (10, 15, 10)
    del double, again  # a function gone frees its name (and its keys: a name is an identity)
    with request_scope():
        assert make(4)(6) == 24

    def model() -> type:
        class Model:
            pass

        return Model

    @request_memo(shared=cache)
    def table_of(cls: type) -> str:
        return cls.__qualname__

    with (
        request_scope(),
        pytest.raises(UnhashableArguments, match="made in a function or at run time"),
    ):
        table_of(model())


Point = collections.namedtuple("Point", "x y")  # found by its name: a key may hold it


def test_classes_made_at_run_time_and_bound_methods_are_refused(cache: RedisCache) -> None:
    """A probe (7 December) read one class's value for another: classes made by type() or
    namedtuple() in a factory are named alike though not defined in a function's body, and
    a bound method's instance was not in the key (one tenant's rows for another's). A class
    must be found by its module.qualname, as pickle finds one; a bound method needs key=."""

    def model(table: str) -> type:
        return type("Model", (), {"table": table})

    @request_memo(shared=cache)
    def table_of(cls: type) -> str:
        return str(cls.table)  # type: ignore[attr-defined]

    @request_memo(shared=cache, typed=True)
    def fields_of(row: tuple[Any, ...]) -> list[str]:
        return list(getattr(row, "_fields", ()))

    row = collections.namedtuple("Row", "a b")
    with request_scope():
        with pytest.raises(UnhashableArguments, match="made in a function or at run time"):
            table_of(model("users"))
        with pytest.raises(UnhashableArguments, match="made in a function or at run time"):
            fields_of(row(1, 2))
        assert fields_of(Point(1, 2)) == ["x", "y"]  # module level: its own name
        assert fields_of((None, 1)) == []  # builtins' own types: NoneType, found or not
        assert fields_of((sys.flags,)) == []  # sys.flags' type: one of a kind, not found

    class Repo:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant

        def row(self, i: int) -> str:
            return f"{self.tenant}:{i}"

    a = Repo("tenant_a")
    with pytest.raises(TypeError, match="a bound method's instance is not in its Redis keys"):
        request_memo(shared=cache)(a.row)
    row_of = request_memo(shared=cache, key=lambda i: (a.tenant, i))(a.row)
    with request_scope():
        assert row_of(7) == "tenant_a:7"


def test_a_function_defined_again_replaces_the_old_one_without_a_gc(
    redis_server: Any, cache: RedisCache, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """importlib.reload and a notebook cell run twice redefine a function while the old one
    is still bound to its global: a new code is a redefinition, not another live function
    (and needs no gc.collect()); the same code twice (closures, a wrapper without
    functools.wraps) is still refused."""
    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)
    (tmp_path / "memo_caches.py").write_text(
        "import redis\nfrom perrequest.redis import RedisCache\n"
        f"shop = RedisCache(redis.Redis(port={redis_server.port}), ttl=60, namespace='r')\n"
    )
    (tmp_path / "memo_reloaded.py").write_text(
        "from perrequest import request_memo\nfrom memo_caches import shop\n"
        "@request_memo(shared=shop)\ndef price(sku):\n    return sku\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("memo_reloaded")
    importlib.reload(module)  # the cache (another module) stays: price is defined again
    cell = "@request_memo(shared=cache)\ndef quote(x):\n    return x\n"
    namespace = {"cache": cache, "request_memo": request_memo, "__name__": "notebook"}

    def logged(fn: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            return fn(*args)

        return wrapper

    namespace["named"] = lambda fn: functools.wraps(fn)(logged(fn))
    exec(cell, namespace)
    first = namespace["quote"]
    exec(cell, namespace)  # run again: replaces the first
    wrapped = "@request_memo(shared=cache)\n@named\ndef total(x):\n    return x\n"
    exec(wrapped, namespace)
    exec(wrapped, namespace)  # the code under functools.wraps is new too
    with request_scope():
        assert module.price("a") == "a" and namespace["quote"](1) == first(1) == 1
    assert collected == []
    keep = request_memo(shared=cache)(logged(len))
    with pytest.raises(TypeError, match=r"same code.*functools\.wraps"):
        request_memo(shared=cache)(logged(abs))
    del keep
    module.shop.close()
    del sys.modules["memo_reloaded"], sys.modules["memo_caches"]


def test_a_function_decorated_per_request_needs_no_gc(
    cache: RedisCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A def decorated inside a view: the one before it is freed as its request returns,
    so the name check finds no live function of that code and collects nothing."""
    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)

    def view(n: int) -> int:
        @request_memo(shared=cache)
        def doubled(x: int) -> int:
            return 2 * x

        with request_scope():
            return doubled(n) + doubled(n)

    assert [view(n) for n in (1, 2, 1)] == [4, 8, 4]
    assert collected == []
    assert cache.stats().hits == 1  # the third request read the first one's value


def test_every_caller_gets_what_the_serializer_gives_back(cache: RedisCache) -> None:
    @request_memo(shared=cache)
    def pair(n: int) -> Any:
        return (n, {1: "one"})

    @request_memo(shared=cache)
    def file_name(n: int) -> str:
        return os.fsdecode(b"report-\xff.csv")  # a str with a lone surrogate

    for _ in range(2):
        with request_scope():
            assert pair(1) == [1, {"1": "one"}]  # JSON's view, for the computing caller too
            assert file_name(1) == "report-\udcff.csv"
    assert cache.stats().hits == 2


def test_concurrent_requests_in_one_process_get_copies_of_their_own(cache: RedisCache) -> None:
    """A request waiting for another's computation in this process gets its own copy:
    a change in one request never shows in the other."""
    started, release = threading.Event(), threading.Event()

    @request_memo(shared=cache)
    def settings(tenant: str) -> dict[str, Any]:
        started.set()
        release.wait(5)
        return {"theme": "light"}

    seen: dict[str, Any] = {}

    def request(name: str) -> None:
        with request_scope():
            seen[name] = settings("t1")
            seen[name]["theme"] = name  # this request personalises its copy
            seen[name + " again"] = settings("t1")

    threads = [threading.Thread(target=request, args=(name,)) for name in "ab"]
    threads[0].start()
    assert started.wait(5)
    threads[1].start()
    time.sleep(0.2)  # b waits for a's computation
    release.set()
    for thread in threads:
        thread.join()
    assert seen["a"] is not seen["b"]
    assert seen["a again"] == {"theme": "a"} and seen["b again"] == {"theme": "b"}
    stats = cache.stats()
    assert (stats.misses, stats.hits, stats.lock_waits) == (1, 1, 0)  # b joined a's flight


def test_a_value_the_serializer_cannot_store_raises_a_clear_error(cache: RedisCache) -> None:
    @request_memo(shared=cache)
    def when(n: int) -> Any:
        return {"at": time}

    with request_scope(), pytest.raises(TypeError, match=r"when returned a dict.*'json'.*pickle"):
        when(1)


def test_a_value_or_argument_nested_too_deep_for_json_raises_a_clear_error(
    cache: RedisCache,
) -> None:
    """The JSON encoder's RecursionError is a value (or key) JSON cannot encode too."""

    def nested(depth: int) -> Any:
        value: Any = ()
        for _ in range(depth):
            value = (value,)
        return value

    @request_memo(shared=cache)
    def tree(depth: int) -> Any:
        return nested(depth)

    @request_memo(shared=cache)
    def size(value: Any) -> int:
        return 1

    # Deeper than any encoder's limit: 3.13 encodes 5,000 levels (its C recursion limit
    # is 10,000), 3.11 and 3.12 do not.
    with request_scope(), pytest.raises(TypeError, match=r"tree returned a tuple.*'json'"):
        tree(20_000)
    with request_scope(), pytest.raises(UnhashableArguments, match=r"argument 'value'.*recursion"):
        size(nested(20_000))


def test_exceptions_are_not_cached_and_release_the_lock(
    cache: RedisCache, client: redis.Redis
) -> None:
    calls = []

    @request_memo(shared=cache)
    def flaky(n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            raise ValueError("upstream down")
        return n

    with request_scope(), pytest.raises(ValueError, match="upstream down"):
        flaky(1)
    assert client.dbsize() == 0  # no value, and the lock is gone
    start = time.monotonic()
    with request_scope():
        assert flaky(1) == 1
    assert time.monotonic() - start < 1 and flaky.shared_info().lock_waits == 0


def test_ttl_expiry_between_two_requests(client: redis.Redis) -> None:
    cache = RedisCache(client, ttl=0.3, namespace="t")
    calls = []

    @request_memo(shared=cache)
    def rate(currency: str) -> float:
        calls.append(currency)
        return 1.0 + len(calls)

    with request_scope():
        assert rate("EUR") == 2.0
    with request_scope():
        assert rate("EUR") == 2.0
        time.sleep(0.4)
        assert rate("EUR") == 2.0  # expired in Redis, repeatable in the request
    with request_scope():
        assert rate("EUR") == 3.0
    assert calls == ["EUR", "EUR"]
    cache.close()


def test_pickle_values_are_signed_and_a_tampered_one_is_a_logged_miss(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCache(client, ttl=60, namespace="p", serializer="pickle", secret=SECRET)
    calls = []

    @request_memo(shared=cache)
    def shape(n: int) -> Any:
        calls.append(n)
        return {"set": {n}, "tuple": (n,)}

    with request_scope():
        assert shape(1) == {"set": {1}, "tuple": (1,)}  # pickle keeps Python's types
    with request_scope():
        assert shape(1) == {"set": {1}, "tuple": (1,)}
    assert calls == [1]
    key = _key("p", shape, 1)
    raw = client.get(key)
    assert isinstance(raw, bytes)

    class Exploit:
        def __reduce__(self) -> Any:
            return (exec, ("import builtins; builtins.PERREQUEST_PWNED = True",))

    flipped = raw[:-2] + bytes([raw[-2] ^ 1]) + raw[-1:]  # one bit of the data changed
    for forged in (raw[:32] + pickle.dumps(Exploit()), pickle.dumps(Exploit()), flipped):
        client.set(key, forged)
        with caplog.at_level(logging.WARNING, logger="perrequest"), request_scope():
            assert shape(1) == {"set": {1}, "tuple": (1,)}
        import builtins

        assert not hasattr(builtins, "PERREQUEST_PWNED")
    assert calls == [1, 1, 1, 1]  # each forged value was a miss, computed again
    assert cache.stats().bad_values == 3
    warnings = [r for r in caplog.records if "signature" in r.getMessage()]
    assert len(warnings) == 1  # logged once per interval
    # A valid value moved to another key does not verify there either.
    with request_scope():
        shape(2)
    client.set(_key("p", shape, 2), client.get(key))
    with request_scope():
        assert shape(2) == {"set": {2}, "tuple": (2,)}
    assert cache.stats().bad_values == 4
    cache.close()


def test_json_with_a_secret_is_signed_too(client: redis.Redis) -> None:
    cache = RedisCache(client, ttl=60, namespace="j", secret=SECRET)

    @request_memo(shared=cache)
    def role(user: str) -> str:
        return "reader"

    with request_scope():
        role("bob")
    client.set(_key("j", role, "bob"), json.dumps("admin"))
    with request_scope():
        assert role("bob") == "reader"
    assert cache.stats().bad_values == 1
    cache.close()


def test_a_key_of_another_type_is_a_bad_value_overwritten_not_redis_down(
    cache: RedisCache, client: redis.Redis
) -> None:
    calls = []

    @request_memo(shared=cache)
    def price(sku: str) -> dict[str, str]:
        calls.append(sku)
        return {"sku": sku}

    with request_scope():
        price("a"), price("b")
    key = _key("t", price, "a")
    client.delete(key)
    client.rpush(key, "junk")  # a list where a value belongs: WRONGTYPE for GET
    for _ in range(2):
        with request_scope():
            assert price("a") == {"sku": "a"} and price("b") == {"sku": "b"}
    assert calls == ["a", "b", "a"]  # "b" still read from Redis; "a" computed once
    assert client.type(key) == b"string"  # overwritten
    stats = cache.stats()
    assert (stats.errors, stats.bad_values, stats.hits) == (0, 1, 3)


def test_a_key_of_another_type_is_computed_once_under_the_lock_also_after_a_cache_clear(
    client: redis.Redis,
) -> None:
    """A list at a value's key goes through the CLAIM like any miss (the script removes
    it): two processes missing it compute it once, and its value replaces the list.
    Before, each process computed it without the lock, and once the function had had a
    cache_clear it was never overwritten (every call computed)."""
    started, release, calls = threading.Event(), threading.Event(), []

    def worker() -> tuple[RedisCache, Any]:
        cache = RedisCache(client, ttl=60, namespace="wt")

        def price(sku: str) -> str:
            calls.append(sku)
            started.set()
            release.wait(10)
            return sku

        return cache, request_memo(shared=cache)(price)

    (cache_a, price_a), (cache_b, price_b) = worker(), worker()
    price_a.cache_clear()  # the function's generation, for good
    key = _key("wt", price_a, "a")
    client.rpush(key, "junk")
    thread = threading.Thread(target=request_scope()(price_a), args=("a",))
    thread.start()
    assert started.wait(10)
    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        with request_scope():
            assert price_b("a") == "a"  # waited for A's lock, then read A's value
    finally:
        release.set()
        thread.join(10)
        timer.cancel()
    assert calls == ["a"] and client.get(key) == b'"a"'
    assert (cache_a.stats().bad_values, cache_b.stats().lock_waits) == (1, 1)
    for price in (price_a, price_b):
        with request_scope():
            assert price("a") == "a"
    assert calls == ["a"]
    cache_a.close()
    cache_b.close()


def test_a_lock_key_of_another_type_or_without_expiry_is_taken_over(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock no miss could get past (a list, a string without expiry) is overwritten
    and logged as a bad value, not waited for lock_timeout on every miss."""
    cache = RedisCache(client, ttl=60, namespace="t", lock_timeout=3, log_interval=0)

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    for n, plant in enumerate(
        (lambda lock: client.rpush(lock, "junk"), lambda lock: client.set(lock, "forever"))
    ):
        lock = _key("t", price, str(n)) + ":lock"
        plant(lock)
        with caplog.at_level(logging.WARNING, logger="perrequest"):
            start = time.monotonic()
            with request_scope():
                assert price(str(n)) == str(n)
            assert time.monotonic() - start < 1
        assert client.exists(lock) == 0 and lock in caplog.text  # released, the lock named
    stats = cache.stats()
    assert (stats.bad_values, stats.lock_waits, stats.errors) == (2, 0, 0)
    cache.close()


@pytest.mark.parametrize("whose", ["the value's", "the function's"])
def test_a_generation_key_of_another_type_leaves_the_tier_on(
    client: redis.Redis, whose: str
) -> None:
    """A generation key (written by a delete or a clear) of another type, planted by
    others: a generation all the same. It turned the function's tier off until a
    cache_clear (every call computed, stored nothing, and was logged as the value's bad
    value)."""
    cache = RedisCache(client, ttl=60, namespace="t")
    calls = []

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        calls.append(sku)
        return sku

    value = _key("t", price, "a")
    gen = value + ":gen" if whose == "the value's" else value.rsplit(":", 2)[0] + "::gen"
    client.hset(gen, "junk", 1)
    for _ in range(3):
        with request_scope():
            assert price("a") == "a"
    assert calls == ["a"] and client.get(value) == b'"a"'
    stats = cache.stats()
    assert (stats.errors, stats.bad_values, stats.hits) == (0, 0, 2)
    cache.close()


def test_a_value_over_max_value_bytes_is_computed_and_not_stored(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCache(client, ttl=60, namespace="t", max_value_bytes=100)

    @request_memo(shared=cache)
    def blob(n: int) -> str:
        return "x" * n

    with caplog.at_level(logging.WARNING, logger="perrequest"), request_scope():
        assert blob(500) == "x" * 500
        assert blob(50) == "x" * 50
    assert not client.exists(_key("t", blob, 500)) and client.exists(_key("t", blob, 50))
    assert cache.stats().too_large == 1
    assert any("max_value_bytes=100" in r.getMessage() for r in caplog.records)
    cache.close()


def test_cache_clear_scans_the_function_keys_only(client: redis.Redis) -> None:
    cache = RedisCache(client, ttl=60, namespace="ns")

    @request_memo(shared=cache)
    def f(n: int) -> int:
        return n

    @request_memo(shared=cache, version=2)
    def g(n: int) -> int:
        return n

    f_v2 = request_memo(shared=cache, version=2)(f.__wrapped__)  # f's keys, another version
    # Keys of another namespace that starts like f's keys must survive.
    other = RedisCache(client, ttl=60, namespace=f"ns:{f.__module__}.{f.__qualname__}")
    h = request_memo(shared=other)(g.__wrapped__)
    with request_scope():
        for n in range(1500):  # more than one SCAN page
            f(n)
        f_v2(1), g(1), h(1)
        client.set(_key("ns", f, 99999) + ":lock", "someone")  # its holder will store nothing
    assert client.dbsize() == 1504
    with request_scope():
        f.cache_clear()
        assert f.cache_info().currsize == 0
    # g's and h's values (KEYS is disabled on this server), and the lock marked deleted
    # for lock_timeout: its holder, maybe computing from old data, stores nothing.
    assert client.dbsize() == 3
    lock = _key("ns", f, 99999) + ":lock"
    assert client.exists(lock) == 0  # deleted: the function's generation (the third key)
    assert client.exists(lock.removesuffix(":lock").rsplit(":", 2)[0] + "::gen") == 1
    assert cache.stats().errors == 0
    with request_scope():
        assert f.cache_delete(5) is False
        g(2)
        assert g.cache_delete(2) is True
    assert not client.exists(_key("ns", g, 2, 2)) and client.exists(_key("ns", g, 1, 2))


def test_counters_lose_no_update_under_threads(client: redis.Redis) -> None:
    """cache_info()'s shared counters are exact: threads counting at once (here made to
    switch as often as the interpreter allows) lose no increment."""
    cache = RedisCache(client, ttl=60, namespace="n")

    @request_memo(shared=cache)
    def flag(name: str) -> bool:
        return True

    with request_scope():
        flag("x")  # stored in Redis: every later request reads it there

    def requests() -> None:
        for _ in range(1000):
            with request_scope():
                flag("x")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=requests) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        sys.setswitchinterval(interval)
    assert flag.shared_info()[:2] == (6000, 1)
    assert cache.stats().hits == 6000
    cache.close()


def test_a_function_slower_than_lock_timeout_is_still_stored(client: redis.Redis) -> None:
    """Its lock expires while it computes; nobody else wanted the key meanwhile, so its
    value must still be stored, or such a function would never be cached at all."""
    cache = RedisCache(client, ttl=60, namespace="slow", lock_timeout=0.1)
    calls = []

    @request_memo(shared=cache)
    def report(n: int) -> int:
        calls.append(n)
        time.sleep(0.3)
        return n

    for _ in range(2):
        with request_scope():
            assert report(1) == 1
    assert calls == [1]
    cache.close()


@pytest.mark.parametrize("how", ["cache_delete", "cache_clear"])
def test_a_delete_invalidates_a_computation_in_flight(client: redis.Redis, how: str) -> None:
    """Read your own writes: a request that updates a row, deletes its entry and reads
    it again gets the new value, not that of a computation that read the old row and
    is still running (in this process: it would be joined; anywhere: it holds the
    key's lock, which the reader would wait for), and the stale value is not stored."""
    cache = RedisCache(client, ttl=60, namespace="rw")
    row = {"price": 1}
    started, release, stale = threading.Event(), threading.Event(), []

    @request_memo(shared=cache)
    def price(sku: str) -> int:
        value = row["price"]
        if value == 1:
            started.set()
            release.wait(10)
        return value

    def reader() -> None:
        with request_scope():
            stale.append(price("a"))

    thread = threading.Thread(target=reader)
    thread.start()
    assert started.wait(10)
    timer = threading.Timer(1, release.set)  # the old computation ends later
    timer.start()
    try:
        with request_scope():
            row["price"] = 2
            price.cache_delete("a") if how == "cache_delete" else price.cache_clear()
            start = time.monotonic()
            assert price("a") == 2
            assert time.monotonic() - start < 0.8  # it did not wait for the old one
    finally:
        release.set()
        thread.join(10)
        timer.cancel()
    assert stale == [1]  # its own caller gets it
    with request_scope():
        assert price("a") == 2  # not overwritten by the stale value
    # No lock left: the delete's mark only, for the rest of lock_timeout (the new value's
    # computation took it over, and left it when it ended).
    locks = [k for k in client.scan_iter() if k.endswith(b":lock")]
    assert locks == []
    cache.close()


@pytest.mark.parametrize("how", ["cache_delete", "cache_clear"])
def test_a_miss_waiting_for_another_process_lock_through_a_delete_stores_its_value(
    client: redis.Redis, how: str
) -> None:
    """A request waiting for another process's lock when its own process deletes the
    key takes the lock the delete freed and computes from the new data: its value is
    stored. Before, it stored nothing (the delete had taken its record in this
    process's single-flight), and the next miss computed the key once more."""
    cache = RedisCache(client, ttl=60, namespace="rw3")
    calls = []

    @request_memo(shared=cache)
    def price(sku: str) -> int:
        calls.append(sku)
        return 2

    key = _key("rw3", price, "a")
    client.set(key + ":lock", "another process", px=10_000)
    thread = threading.Thread(target=request_scope()(price), args=("a",))
    thread.start()
    deadline = time.monotonic() + 5
    while cache.stats().lock_waits == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    price.cache_delete("a") if how == "cache_delete" else price.cache_clear()
    thread.join(10)
    assert calls == ["a"] and client.get(key) == b"2"
    with request_scope():
        assert price("a") == 2  # read from Redis
    assert calls == ["a"] and price.shared_info().hits == 1
    cache.close()


def test_outside_a_scope_nothing_touches_redis(cache: RedisCache, client: redis.Redis) -> None:
    @request_memo(shared=cache, outside_scope="call")
    def f(n: int) -> int:
        return n

    assert f(1) == 1 and client.dbsize() == 0


def test_cache_clear_and_cache_delete_act_on_redis_outside_a_scope_too(
    cache: RedisCache, client: redis.Redis
) -> None:
    """A management command or deploy hook invalidates without a request. Before:
    cache_delete did, cache_clear silently did nothing."""

    @request_memo(shared=cache)
    def price(sku: str) -> int:
        return len(sku)

    with request_scope():
        price("a"), price("bb"), price("ccc")
    assert client.dbsize() == 3
    price.cache_delete("a")
    values = [k for k in client.scan_iter() if not k.endswith((b":lock", b":gen"))]
    assert len(values) == 2  # and the key's generation, for lock_timeout
    price.cache_clear()
    assert [k for k in client.scan_iter() if not k.endswith((b":lock", b":gen"))] == []


def test_bad_options_are_refused_with_the_reason(client: redis.Redis) -> None:
    for ttl in (None, 0):
        with pytest.raises(ValueError, match="leak perrequest exists to prevent"):
            RedisCache(client, ttl=ttl, namespace="t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        RedisCache(client, ttl=-1, namespace="t")
    with pytest.raises(TypeError, match="number"):
        RedisCache(client, ttl=True, namespace="t")
    with pytest.raises(TypeError, match="namespace"):
        RedisCache(client, ttl=1, namespace="")
    with pytest.raises(ValueError, match=r"needs secret=.*runs code"):
        RedisCache(client, ttl=1, namespace="t", serializer="pickle")
    with pytest.raises(ValueError, match="16 bytes"):
        RedisCache(client, ttl=1, namespace="t", serializer="pickle", secret="short")
    with pytest.raises(ValueError, match="'json' or 'pickle'"):
        RedisCache(client, ttl=1, namespace="t", serializer="yaml")
    with pytest.raises(TypeError, match="Did you mean lock_timeout="):
        RedisCache(client, ttl=1, namespace="t", lock_timout=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="Did you mean ttl="):  # a required one misspelt
        RedisCache(client, tll=1, namespace="t")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="op_timeout"):
        RedisCache(client, ttl=1, namespace="t", op_timeout=0)
    with pytest.raises(ValueError, match=r"op_timeout is in seconds.*silently off"):
        RedisCache(client, ttl=1, namespace="t", op_timeout=1e-9)  # every read would fail
    with pytest.raises(ValueError, match="':'"):
        RedisCache(client, ttl=1, namespace="t", version="a:b")
    # Values Redis or the socket would refuse on every command at run time.
    for option, value, most in (
        ("ttl", 1e16, 31536000),
        ("lock_timeout", 1e16, 3600),
        ("op_timeout", 1e300, 60),
        ("max_value_bytes", 2**40, 536870912),
    ):
        with pytest.raises(ValueError, match=rf"{option}=\.\.\.\) must be at most {most} "):
            RedisCache(client, **{"ttl": 1, "namespace": "t", option: value})
    with pytest.raises(TypeError, match=r"redis\.Redis"):
        RedisCache({}, ttl=1, namespace="t")
    cache = RedisCache(client, ttl=1, namespace="t")
    with pytest.raises(TypeError, match=r"needs a RedisCache on a redis\.asyncio\.Redis"):

        @request_memo(shared=cache)
        async def f() -> int:
            return 1

    with pytest.raises(TypeError, match=r"version=.*shared="):
        request_memo(version=2)
    with pytest.raises(TypeError, match="non-empty str or an int"):
        request_memo(shared=cache, version=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Did you mean version="):
        request_memo(shared=cache, versoin=2)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="RedisCache"):
        request_memo(shared=object())  # type: ignore[call-overload]


def test_a_function_returning_a_generator_is_refused_by_its_name(cache: RedisCache) -> None:
    @request_memo(shared=cache)
    def rows(n: int) -> Any:
        return (i for i in range(n))

    with request_scope(), pytest.raises(TypeError, match=r"'.*rows' returned a generator"):
        rows(3)


@pytest.mark.parametrize("how", ["cache_delete", "cache_clear"])
@pytest.mark.parametrize("read_between", [True, False])
def test_a_delete_invalidates_another_process_computation_in_flight(
    redis_server: Any, how: str, read_between: bool
) -> None:
    """Read your own writes across processes (two caches with clients of their own, as
    two worker processes have): worker A computes from the old row and is still running
    when worker B updates the row and deletes the entry. Before: A's value went into
    Redis when it ended (no value was there any more), stale for a whole ttl."""
    row = {"price": 1}
    started, release = threading.Event(), threading.Event()

    def worker(namespace: str) -> tuple[RedisCache, Any]:
        cache = RedisCache(redis.Redis(port=redis_server.port), ttl=60, namespace=namespace)

        @request_memo(shared=cache)
        def price(sku: str) -> int:
            value = row["price"]
            if value == 1:
                started.set()
                release.wait(10)
            return value

        return cache, price

    (cache_a, price_a), (cache_b, price_b) = worker("rw2"), worker("rw2")
    old: list[int] = []

    def in_a() -> None:
        with request_scope():
            old.append(price_a("a"))

    thread = threading.Thread(target=in_a)
    thread.start()
    try:
        assert started.wait(10)
        row["price"] = 2
        price_b.cache_delete("a") if how == "cache_delete" else price_b.cache_clear()
        if read_between:
            with request_scope():
                assert price_b("a") == 2  # B computes afresh, without waiting for A
    finally:
        release.set()
        thread.join(10)
    assert old == [1]  # A's own caller still gets what it computed
    for price in (price_b, price_a):
        with request_scope():
            assert price("a") == 2
    cache_a.close()
    cache_b.close()
