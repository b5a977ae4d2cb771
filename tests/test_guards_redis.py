"""Guards of the Redis tier (redis, _redis_tier, _redis_lock, _redis_io, _redis_scripts) that
no other test needed: each test here fails with its guard deleted (a block-deletion mutation
pass of the Redis tier, its Lua scripts included, 5 December 2026)."""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from servers import HOST
from signals import Interrupt, RaiseAfter, RaiseAtCall, Signalled, interrupted_by

from perrequest import UnhashableArguments, _redis_lock, bind_scope, request_memo, request_scope
from perrequest.redis import RedisCache

pytestmark = pytest.mark.timeout(30)

SECRET = "0123456789abcdef0123456789abcdef"


class Refusal(Exception):
    """Pickles, but does not load: its __init__ needs two arguments, its args are one."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)


class Priced:
    """A value that pickles through Python code of its own (where a signal's handler runs)."""

    def __init__(self, price: int) -> None:
        self.price = price

    def __reduce__(self) -> tuple[Any, ...]:
        return (Priced, (self.price,))


def _key(namespace: str, fn: Any, call_key: Any) -> str:
    """The documented key format, computed independently of the library."""
    text = json.dumps(call_key, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"{namespace}:{fn.__module__}.{fn.__qualname__}:1:{digest}"


def _scripts_run(client: redis.Redis) -> int:
    """How many scripts the server ran (EVALSHA and EVAL) since its stats were reset."""
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))


@pytest.fixture
def client(redis_server: Any) -> Iterator[redis.Redis]:
    with redis_server.client() as client:
        yield client


def _failing_stores(cache: RedisCache, fails: Callable[[int], bool], message: str) -> list[int]:
    """Make the cache's STOREs raise ``ConnectionError(message)`` while ``fails(n)`` (n: the
    STOREs sent so far, this one included); the list of those sent."""
    store, sent = cache._sync.store, []

    def patched(**kwargs: Any) -> Any:
        sent.append(1)
        if fails(len(sent)):
            raise redis.ConnectionError(message)
        return store(**kwargs)

    cache._sync.store = patched
    return sent


def test_a_miss_waiting_for_another_lock_pauses_between_claims(client: redis.Redis) -> None:
    """_redis_lock._run: a pause step sleeps. Unguarded, the pause is sent to Redis as a
    command, fails, and the waiter CLAIMs again at once: a busy loop on the server."""
    cache = RedisCache(client, ttl=60, namespace="g")

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    client.set(_key("g", price, "a") + ":lock", "another process", px=250)
    client.config_resetstat()
    with request_scope():
        assert price("a") == "a"
    assert cache.stats().lock_waits == 1
    assert _scripts_run(client) < 30  # about 10 CLAIMs in 250 ms, and a STORE
    cache.close()


def test_an_async_miss_waiting_for_another_lock_pauses_between_claims(redis_server: Any) -> None:
    """_redis_lock._run_async: the same, awaited (asyncio.sleep)."""

    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="g")

        @request_memo(shared=cache)
        async def price(sku: str) -> str:
            return sku

        with redis_server.client() as client:
            client.set(_key("g", price, "a") + ":lock", "another process", px=250)
            client.config_resetstat()
            async with request_scope():
                assert await price("a") == "a"
            assert cache.stats().lock_waits == 1
            assert _scripts_run(client) < 30
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())


def test_a_claim_finding_another_bad_value_claims_again_over_it(client: redis.Redis) -> None:
    """_redis_lock._claim: the value read was bad, and by the CLAIM another bad value
    is there (another writer): the miss CLAIMs again over that one, takes the lock and
    stores its value. Unguarded, it computes and stores nothing: the bad value stays
    (or, without the new value's SHA-1, CLAIMs over the old one until lock_timeout)."""
    cache = RedisCache(client, ttl=60, namespace="g", lock_timeout=1, log_interval=0)

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    key = _key("g", price, "a")
    client.set(key, b"{not json", px=60_000)
    claim = cache._sync.claim

    def rewritten_first(**kwargs: Any) -> Any:
        cache._sync.claim = claim
        client.set(key, b"{another", px=60_000)
        return claim(**kwargs)

    cache._sync.claim = rewritten_first
    with request_scope():
        assert price("a") == "a"
    assert client.get(key) == b'"a"'
    assert (cache.stats().bad_values, cache.stats().errors) == (2, 0)
    cache.close()


def test_a_store_that_fails_is_not_sent_again(client: redis.Redis) -> None:
    """_redis_lock._store: only a busy pool (with a lock to release) is waited for; any
    other error is Redis failing: counted, and the STORE not sent again. Unguarded,
    STORE is sent again and again until it goes through (forever if Redis is down)."""
    cache = RedisCache(client, ttl=60, namespace="g")
    sent = _failing_stores(cache, lambda n: n == 1, "Connection reset by peer")

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    start = time.monotonic()
    with request_scope():
        assert price("a") == "a"
    assert time.monotonic() - start < 0.5
    assert sent == [1] and cache.stats().errors == 1
    assert client.get(_key("g", price, "a")) is None
    cache.close()


def test_an_async_hit_is_one_get(redis_server: Any) -> None:
    """_redis_tier._get_async: a request-store miss GETs Redis first, and a value found
    there is read with that GET alone. Unguarded, every read runs the CLAIM script (which
    returns the value too): a script where a GET would do, on every hit."""

    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="g")

        @request_memo(shared=cache)
        async def price(sku: str) -> str:
            return sku

        async with request_scope():
            assert await price("a") == "a"
        with redis_server.client() as client:
            client.config_resetstat()
            async with request_scope():
                assert await price("a") == "a"
            assert _scripts_run(client) == 0
            assert client.info("commandstats")["cmdstat_get"]["calls"] == 1
        assert (cache.stats().hits, cache.stats().misses) == (1, 1)
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())


def test_an_unencodable_call_that_does_not_bind_is_still_unhashable_arguments(
    client: redis.Redis,
) -> None:
    """_redis_tier._unencodable: the bad argument is named from the function's signature,
    which a call may not bind (through a decorator taking ``*args``, the signature is the
    wrapped function's): the error is then the generic UnhashableArguments. Unguarded,
    inspect's TypeError from the binding escapes in its place."""
    cache = RedisCache(client, ttl=60, namespace="g")

    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    @request_memo(shared=cache)
    @logged
    def price(sku: str) -> str:
        return sku

    with request_scope(), pytest.raises(UnhashableArguments, match="cannot be encoded"):
        price(object(), 2)
    cache.close()


def test_a_busy_pool_is_logged_as_busy_not_as_redis_down(
    redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """redis.RedisCache._failed: a pool out of connections is this process being busy:
    a WARNING says so and how to fix it. Unguarded, nothing is logged."""
    plain = redis.ConnectionPool(host=HOST, port=redis_server.port, max_connections=1)
    cache = RedisCache(redis.Redis(connection_pool=plain), ttl=60, namespace="g")
    held = cache._sync.client.connection_pool.get_connection()

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    with caplog.at_level(logging.WARNING, logger="perrequest"), request_scope():
        assert price("a") == "a"
    assert cache.stats().errors == 1 and "had no free connection" in caplog.text
    cache._sync.client.connection_pool.release(held)
    cache.close()


def _in_a_child(run: Any) -> int:
    """``run()`` in a process made by fork: its exit status (-1 if still running after 5 s)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            run()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_child_forked_while_a_lock_of_the_cache_is_held_gets_free_ones(
    client: redis.Redis,
) -> None:
    """redis._forked: a thread of the parent may hold the cache's lock (counting) or a
    tier's (a cache_delete) as another forks: the child's copies would stay held, with
    nobody to release them. The child gets new ones. Unguarded, its first count hangs."""
    cache = RedisCache(client, ttl=60, namespace="g")

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    def use() -> None:
        with request_scope():
            assert price("a") == "a"
        price.cache_delete("a")

    (tier,) = cache._tiers
    with cache._lock, tier._lock:
        assert _in_a_child(use) == 0
    cache.close()


def test_aclose_closes_the_running_loops_connections(redis_server: Any) -> None:
    """redis.RedisCache.aclose: the running event loop's pool is disconnected, and the
    sync one (cache_delete's). Unguarded, their connections stay open on the server."""

    async def main() -> None:
        aclient = redis_server.aclient(client_name="guarded-async")
        cache = RedisCache(aclient, ttl=60, namespace="g")

        @request_memo(shared=cache)
        async def price(sku: str) -> str:
            return sku

        async with request_scope():
            assert await price("a") == "a"
        assert price.cache_delete("a")  # on the sync pool
        with redis_server.client() as client:
            assert sum(c.get("name") == "guarded-async" for c in client.client_list()) == 2
            await cache.aclose()
            assert _connected(client, "guarded-async") == 0
        await aclient.aclose()

    asyncio.run(main())


def test_a_busy_pool_at_store_time_is_waited_for_with_growing_pauses(
    client: redis.Redis,
) -> None:
    """_redis_lock._store: a STORE refused for a busy pool (with a lock to release) is
    sent again after a pause that doubles, up to MAX_PAUSE. Unguarded, it is sent again
    every 2 ms until op_timeout."""
    cache = RedisCache(client, ttl=60, namespace="g", op_timeout=0.3)
    busy_until = time.monotonic() + 0.15
    sent = _failing_stores(
        cache, lambda n: time.monotonic() < busy_until, "No connection available."
    )

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    with request_scope():
        assert price("a") == "a"
    assert client.get(_key("g", price, "a")) == b'"a"'
    assert 3 < len(sent) < 12  # 2, 4, 8, 16, 32, 50, 50 ms: not 75 tries of 2 ms
    assert cache.stats().errors == 0
    cache.close()


def test_a_value_that_pickles_but_does_not_load_is_not_stored(client: redis.Redis) -> None:
    """_redis_tier._encoded: the bytes are loaded once before they are stored, so a value
    that pickles but cannot load (an exception class whose __init__ takes more than its
    args) fails the call that computed it and is never stored. Unguarded, it is stored,
    and every later read finds a bad value."""
    cache = RedisCache(client, ttl=60, namespace="g", serializer="pickle", secret=SECRET)

    @request_memo(shared=cache)
    def outcome(n: int) -> Refusal:
        return Refusal(n, "declined")

    with request_scope(), pytest.raises(TypeError, match="missing 1 required"):
        outcome(1)
    assert list(client.scan_iter("g:*")) == []
    cache.close()


def test_a_new_connection_of_the_cache_costs_no_handshake_round_trips(
    redis_server: Any, client: redis.Redis
) -> None:
    """_redis_io.Conn: the cache's connections say nothing of the library (no CLIENT
    SETINFO after connecting), which would cost round trips out of the first command's
    op_timeout. Unguarded, each new connection sends two, which a server before 7.2
    refuses."""
    client.config_resetstat()
    cache = RedisCache(redis_server.client(), ttl=60, namespace="g")

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    with request_scope():
        assert price("a") == "a"
    assert "errorstat_ERR" not in client.info("errorstats")
    assert "cmdstat_client|setinfo" not in client.info("commandstats")
    cache.close()


def test_a_release_left_to_finish_is_dropped_once_done() -> None:
    """_redis_lock.finish_later: a cancelled caller's STORE, left to finish in a task of its
    own, is kept while it runs and dropped once done. Unguarded, every such task (and
    what its STORE holds) is kept for good."""

    async def main() -> None:
        ran: list[int] = []

        async def release() -> None:
            await asyncio.sleep(0)
            ran.append(1)

        before = set(_redis_lock._finishing)  # (another test's, if any)
        _redis_lock.finish_later(release)
        assert len(_redis_lock._finishing - before) == 1
        for _ in range(10):
            await asyncio.sleep(0)
        assert ran == [1] and not _redis_lock._finishing - before

    asyncio.run(main())


def test_the_options_are_the_caches_attributes(client: redis.Redis) -> None:
    """redis.RedisCache.__init__: each option is an attribute of the cache (as ttl and
    namespace in its repr). Unguarded, ``serializer`` is not."""
    cache = RedisCache(client, ttl=60, namespace="g", serializer="pickle", secret=SECRET)
    assert (cache.serializer, cache.ttl, cache.namespace, cache.version) == ("pickle", 60, "g", 1)
    cache.close()


def _connected(client: redis.Redis, name: str) -> int:
    """How many connections named ``name`` the server has, after those closing are gone."""
    deadline = time.monotonic() + 2
    while True:
        n = sum(c.get("name") == name for c in client.client_list())
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


def test_close_closes_the_sync_connections(redis_server: Any, client: redis.Redis) -> None:
    """redis.RedisCache.close: the cache's own pool is disconnected. Unguarded, its
    connections stay open on the server."""
    cache = RedisCache(redis_server.client(client_name="guarded-sync"), ttl=60, namespace="g")

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    with request_scope():
        assert price("a") == "a"
    assert sum(c.get("name") == "guarded-sync" for c in client.client_list()) == 1
    cache.close()
    assert _connected(client, "guarded-sync") == 0


def test_a_recursive_closure_made_again_replaces_the_garbage_one(client: redis.Redis) -> None:
    """redis.RedisCache._check_name: a memoized closure that calls itself is garbage in a
    reference cycle once its factory's caller drops it, which only the GC frees; made
    again, the name check collects it rather than refuse the new one as another live
    function of that name. Unguarded, the second one is refused."""
    cache = RedisCache(client, ttl=60, namespace="g")

    def make() -> Any:
        @request_memo(shared=cache)
        def factorial(n: int) -> int:
            return 1 if n <= 1 else n * factorial(n - 1)

        return factorial

    gc.disable()  # no collection but the name check's
    try:
        with request_scope():
            assert make()(4) == 24
        with request_scope():
            assert make()(5) == 120
    finally:
        gc.enable()
    cache.close()


def test_a_holder_computing_longer_than_op_timeout_keeps_its_lock(client: redis.Redis) -> None:
    """_redis_scripts.EXTEND: a CLAIM takes the lock for op_timeout (a lease), which its
    holder extends to lock_timeout once it has the reply. Unguarded, the lock expires
    after op_timeout, and another process's miss computes the value a second time."""
    calls: list[str] = []
    started = threading.Event()

    def worker() -> tuple[RedisCache, Any]:
        cache = RedisCache(client, ttl=60, namespace="g", op_timeout=0.1, lock_timeout=5)

        def report(n: int) -> int:
            calls.append(threading.current_thread().name)
            started.set()
            time.sleep(0.4)
            return n

        return cache, request_memo(shared=cache)(report)

    (cache_a, report_a), (cache_b, report_b) = worker(), worker()
    thread = threading.Thread(target=request_scope()(report_a), args=(1,), name="a")
    thread.start()
    assert started.wait(5)
    with request_scope():
        assert report_b(1) == 1  # waited for the holder's value
    thread.join(5)
    assert calls == ["a"] and cache_b.stats().lock_waits == 1
    cache_a.close()
    cache_b.close()


def test_a_warning_after_a_quiet_interval_says_how_many_were_not_logged(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """redis.RedisCache._warn: a WARNING within log_interval of the last of its kind is
    not logged but counted, and the next one logged says how many. Unguarded, it says
    nothing of them."""
    cache = RedisCache(client, ttl=60, namespace="g", log_interval=0.2)

    @request_memo(shared=cache)
    def price(sku: str) -> str:
        return sku

    with caplog.at_level(logging.WARNING, logger="perrequest"):
        for n, sku in enumerate("abc"):
            if n == 2:
                time.sleep(0.25)
            client.set(_key("g", price, sku), b"{not json", px=60_000)
            with request_scope():
                assert price(sku) == sku
    warned = [r.getMessage() for r in caplog.records if "was refused" in r.getMessage()]
    assert len(warned) == 2 and "1 more since the last" in warned[1]
    assert cache.stats().bad_values == 3
    cache.close()


def test_an_interrupt_as_a_tiers_computation_takes_its_lock_never_hangs(
    client: redis.Redis,
) -> None:
    """_flight.finish: an interrupt right after acquiring the cache's lock leaves what was
    unregistered unknown; ``abandon`` takes the lock again to send the waiters back, as the
    store's reentrant lock allows. The Redis tier's lock was not reentrant: that thread
    blocked on itself for ever (an audit, from reading)."""
    import sys

    cache = RedisCache(client, ttl=60, namespace="g")
    at = RaiseAfter(Interrupt, "acquire", "finish")

    @request_memo(shared=cache)
    def price(item: int) -> int:
        if item:
            sys.setprofile(at)
        return item * 10

    outcome: list[object] = []

    def call() -> None:
        at.armed = True
        try:
            outcome.append(price(1))
        except Interrupt:
            outcome.append("interrupted")
        finally:
            sys.setprofile(None)

    with request_scope():
        price(0)
        thread = threading.Thread(target=bind_scope(call), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the thread blocks on the lock it holds"
        assert outcome == ["interrupted"] and not at.armed
        assert price(1) == 10  # computed again: nothing was left in flight


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("point", ["flight", "redis"])
def test_a_signal_as_a_tiers_value_is_stored_never_reaches_the_waiting_request(
    client: redis.Redis, point: str, fails: bool
) -> None:
    """_waits.outcome_of, _shared_errors.own: a signal handler's ``Exception`` (Celery's
    soft time limit) in the computing request, as the tier's single-flight stores the
    value, was handed to the waiter in another request as the very object, its traceback
    holding the computing request's frames; as the value is stored in Redis, as a copy (in
    place of the function's own error, if it raised: a sweep of every handler point). The
    waiter computes instead, and gets its own value or error."""
    import sys

    from perrequest._waits import Waited

    at = RaiseAtCall(Signalled, "finish", "run") if point == "flight" else None
    at = at or RaiseAtCall(Signalled, "_storable", "fetch")
    main = threading.current_thread()
    out: dict[str, Any] = {}

    @request_memo(shared=RedisCache(client, ttl=60, namespace="signalled"))
    def price(item: int) -> int:
        if threading.current_thread() is main:
            other.start()
            flights = price.__globals__["__pr_spec"].shared._flights  # type: ignore[attr-defined]
            for _ in range(1000):
                if any(type(r) is Waited for r in list(flights.values())):
                    break
                time.sleep(0.005)
            at.armed = True
            sys.setprofile(at)
        if fails:
            raise ValueError(threading.current_thread().name)
        return item * 10

    def other_request() -> None:
        try:
            with request_scope():
                out["got"] = ("value", price(1))
        except BaseException as exc:  # what the other request got
            out["got"] = ("error", exc)

    other = threading.Thread(target=other_request, daemon=True)
    with request_scope(), interrupted_by(Signalled):
        price(1)
    assert not at.armed, "the signal never came: the test tests nothing"
    other.join(10)
    assert not other.is_alive()
    if fails:
        kind, got = out["got"]
        assert kind == "error" and type(got) is ValueError and str(got) == other.name
    else:
        assert out["got"] == ("value", 10)


@pytest.mark.parametrize(
    ("command", "nth"), [("get", 1), ("evalsha", 1), ("evalsha", 3)], ids=["GET", "CLAIM", "STORE"]
)
def test_a_signal_during_a_redis_command_reaches_the_caller(
    client: redis.Redis, command: str, nth: int, caplog: pytest.LogCaptureFixture
) -> None:
    """_redis_io.FAILURES: a command's failure fails open (computed here, logged, Redis off
    for ``retry_after``). A signal handler's ``Exception`` (Celery's soft time limit, where a
    worker waiting on Redis spends its time) was taken for one: the task never saw it, the
    tier logged Redis as failing and turned itself off (a sweep of every handler point)."""
    import sys

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal nth
        if event == "call" and frame.f_code.co_name == command and nth:
            nth -= 1
            if not nth:
                raise Signalled

    cache = RedisCache(client, ttl=60, namespace=f"signalled-{command}-{nth}")

    @request_memo(shared=cache)
    def price(item: int) -> int:
        return item * 10

    with request_scope(), caplog.at_level(logging.WARNING, logger="perrequest"):
        sys.setprofile(profile)
        with interrupted_by(Signalled):
            price(1)
    assert not nth, "the signal never came: the test tests nothing"
    assert not [r for r in caplog.records if "Redis" in r.getMessage()], "taken for Redis failing"
    with request_scope():
        assert price(1) == 10


@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_as_a_computed_value_is_stored_releases_the_lock(
    client: redis.Redis, signal: type[BaseException]
) -> None:
    """_redis_lock.fetch: the lock is released as the value is stored. A signal between the
    claim and that store (as the value is made storable) left the lock to expire: every
    process's next miss of the key waited ``lock_timeout`` (a sweep of every handler point)."""
    import sys

    at = RaiseAtCall(signal, "_storable", "fetch")
    cache = RedisCache(client, ttl=60, namespace="released", lock_timeout=30)

    @request_memo(shared=cache)
    def price(item: int) -> int:
        return item * 10

    with request_scope():
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(signal):
            price(1)
    assert not at.armed, "the signal never came: the test tests nothing"
    assert list(client.scan_iter("released:*:lock")) == [], "the lock was left to expire"


@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_as_an_async_value_is_stored_releases_the_lock(
    redis_server: Any, signal: type[BaseException]
) -> None:
    """_redis_lock.fetch_async: the same, released in a task of its own."""
    import sys

    async def main() -> None:
        aclient = redis_server.aclient()
        cache = RedisCache(aclient, ttl=60, namespace="released", lock_timeout=30)

        @request_memo(shared=cache)
        async def price(item: int) -> int:
            return item * 10

        at = RaiseAtCall(signal, "_storable", "fetch_async")
        async with request_scope():
            at.armed = True
            sys.setprofile(at)
            with interrupted_by(signal):
                await price(1)
        assert not at.armed, "the signal never came: the test tests nothing"
        for _ in range(30):  # the release, a task of its own (before op_timeout's 0.5 s)
            left = [key async for key in aclient.scan_iter("released:*:lock")]
            if not left:
                break
            await asyncio.sleep(0.01)
        assert left == [], "the lock was left to expire"
        await cache.aclose()
        await aclient.aclose()

    asyncio.run(main())


def test_a_signal_as_a_value_read_from_redis_is_decoded_reaches_the_caller(
    client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """_redis_tier._decoded: a value that does not verify or decode is refused (counted,
    logged, computed again). A signal handler's ``Exception`` (Celery's soft time limit)
    raised while a good value was decoded was taken for a bad value: the task never saw
    it, and the log blamed another writer. Its type tells it (raised by a real SIGUSR1
    handler: tests/signals.py), and it goes on."""
    import sys

    cache = RedisCache(client, ttl=60, namespace="signalled-decode")
    calls: list[int] = []

    @request_memo(shared=cache)
    def price(item: int) -> dict[str, int]:
        calls.append(item)
        return {"price": item * 10}

    with request_scope():
        assert price(1) == {"price": 10}  # stored in Redis
    at = RaiseAfter(Signalled, "decode", "loads", "loads")  # json.loads, from Codec.loads
    with request_scope(), caplog.at_level(logging.WARNING, logger="perrequest"):
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            price(1)
    assert not [r for r in caplog.records if "refused" in r.getMessage()], "taken for a bad value"
    with request_scope():
        assert price(1) == {"price": 10}
    assert calls == [1]  # read from Redis each time after the first


def test_a_signal_as_a_value_is_pickled_for_redis_reaches_the_caller(client: redis.Redis) -> None:
    """_redis_io._pickle_dumps: a value pickle refuses is a ``TypeError`` naming the fix. A
    signal handler's ``Exception`` (Celery's soft time limit) raised as a large value was
    pickled was turned into that ``TypeError``: the task's ``except SoftTimeLimitExceeded``
    never saw it. Its type tells it, and it goes on."""
    import sys

    cache = RedisCache(client, ttl=60, namespace="signalled-pickle", serializer="pickle",
                       secret=SECRET)  # fmt: skip

    @request_memo(shared=cache)
    def price(item: int) -> Priced:
        return Priced(item * 10)

    at = RaiseAtCall(Signalled, "__reduce__", "_pickle_dumps")
    with request_scope():
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            price(1)
    with request_scope():
        assert price(1).price == 10


def quote(k: int) -> int:
    """Computed by another worker: the sync holder of the key's Redis lock (below)."""
    return k


def test_asyncio_run_ending_while_a_miss_waits_for_a_lock_leaves_no_task(redis_server: Any) -> None:
    """_redis_lock.fetch_async: a miss waiting for another worker's lock is cancelled as
    ``asyncio.run`` ends (a sibling in ``gather`` raised; a Celery task's soft limit): its
    release of the lock it may hold went to a task of its own, made on the loop
    ``asyncio.run`` was closing, which never ran to its end. Each such job kept, for the
    life of the process, that task, its closed loop and the loop's Redis connection (a
    red-team's real worker, 6 December). The release is awaited where it was cancelled:
    ``asyncio.run`` waits for it."""
    started, release = threading.Event(), threading.Event()

    def slow(k: int) -> int:
        started.set()
        release.wait(5)
        return k

    slow.__qualname__ = quote.__qualname__  # one Redis key, as in two workers' code
    held = request_memo(shared=RedisCache(redis_server.client(), ttl=60, namespace="closing"))(slow)

    async def waits(k: int) -> int:
        return k

    waits.__qualname__ = quote.__qualname__
    cache = RedisCache(redis_server.aclient(), ttl=60, namespace="closing")
    waiting = request_memo(shared=cache)(waits)

    async def failing() -> None:
        await asyncio.sleep(0.2)  # while the other waits for the holder's lock
        raise RuntimeError("a sibling failed")

    async def main() -> None:
        await asyncio.gather(waiting(1), failing())

    holder = threading.Thread(target=lambda: request_scope()(held)(1))
    holder.start()
    try:
        assert started.wait(5)
        for _ in range(5):
            with request_scope(), pytest.raises(RuntimeError, match="sibling"):
                asyncio.run(main())
        gc.collect()
        left = [
            o for o in gc.get_objects()
            if issubclass(type(o), asyncio.Task) and not o.done() and o.get_loop().is_closed()
        ]  # fmt: skip
        assert not left, left
    finally:
        release.set()
        holder.join(5)


def test_asyncio_run_ending_as_a_value_is_stored_still_stores_it(redis_server: Any) -> None:
    """_redis_lock.fetch_async: ``asyncio.run`` ending (a sibling in ``gather`` raised) as a
    computed value's STORE was on its way (a slow Redis: here paused for writes) cancelled
    it, and the STORE went to a task made on the closing loop, which never ran: the value
    was lost and its lock held every process's next miss for ``lock_timeout``. It is sent
    once more where it was cancelled, and ``asyncio.run`` waits for it."""
    admin = redis_server.client()
    cache = RedisCache(  # op_timeout: the paused write must not time out on a busy machine
        redis_server.aclient(), ttl=60, namespace="stored", lock_timeout=8, op_timeout=3
    )
    computed: list[int] = []

    @request_memo(shared=cache)
    async def quote(k: int) -> int:
        computed.append(k)
        await asyncio.sleep(0.1)
        return k

    async def sibling() -> None:
        await asyncio.sleep(0.09)  # quote is about to store its value
        admin.execute_command("CLIENT", "PAUSE", 200, "WRITE")
        await asyncio.sleep(0.05)
        raise RuntimeError("a sibling failed")

    async def job() -> None:
        await asyncio.gather(quote(1), sibling())

    with request_scope(), pytest.raises(RuntimeError, match="sibling"):
        asyncio.run(job())
    assert not list(admin.scan_iter("stored:*:lock")), "the lock was left to expire"
    with request_scope():
        assert asyncio.run(quote(1)) == 1
    assert computed == [1], "the value was lost"
    assert cache.stats().errors == 0
