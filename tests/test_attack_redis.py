"""Attacks on the Redis tier's invalidation (a delete or clear writes the key's or the
function's generation anew, so that a computation in flight anywhere stores nothing;
written first with delete marks in the lock key, which these tests broke nine times),
against a real redis-server.
Several RedisCache objects, each with a client of its own, stand for several worker
processes (they share nothing but Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis_apps

from perrequest import request_memo, request_scope
from perrequest.redis import RedisCache

pytestmark = pytest.mark.timeout(60)


class Row:
    """The database row the memoized function reads; ``hold`` makes the next read of the
    old value wait for ``release`` (a computation in flight, from old data). A thread
    named in ``gates`` waits for its gate before reading, and one in ``failing`` then
    fails (the database is down a moment)."""

    def __init__(self) -> None:
        self.price = 1
        self.started, self.release = threading.Event(), threading.Event()
        self.fail_next = False
        self.gates: dict[str, threading.Event] = {}
        self.failing: set[str] = set()
        self.reached: dict[str, threading.Event] = {}

    def read(self) -> int:
        name = threading.current_thread().name
        if name in self.gates:
            price = self.price
            self.reached[name].set()
            assert self.gates[name].wait(10)
            if name in self.failing:
                raise RuntimeError("the database failed")
            return price
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the database failed")
        price = self.price
        if price == 1 and not self.release.is_set():
            self.started.set()
            assert self.release.wait(10)
        return price

    def gate(self, name: str, fail: bool = False) -> threading.Event:
        self.gates[name] = threading.Event()
        self.reached[name] = threading.Event()
        if fail:
            self.failing.add(name)
        return self.gates[name]


def workers(port: int, row: Row, n: int, **options: Any) -> list[tuple[RedisCache, Any]]:
    """``n`` workers, each with its own cache and client: ``price(sku)`` reads ``row``."""
    made = []
    for _ in range(n):
        cache = RedisCache(redis.Redis(port=port), ttl=60, namespace="atk", **options)

        def price(sku: str) -> int:
            return row.read()

        made.append((cache, request_memo(shared=cache)(price)))
    return made


def lock_of(fn: Any, sku: str) -> str:
    """The documented key format, computed independently of the library."""
    digest = hashlib.sha256(json.dumps(sku).encode()).hexdigest()
    return f"atk:{fn.__module__}.{fn.__qualname__}:1:{digest}:lock"


def in_thread(fn: Callable[[], Any], name: str | None = None) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        with request_scope():
            try:
                out.append(fn())
            except Exception as exc:
                out.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, out


def test_a_failed_computation_after_a_delete_lets_no_older_one_store(redis_server: Any) -> None:
    """A computes from the old row; B updates it and deletes the entry; C's miss takes
    the lock and fails (the database is down a moment). A ends: its old
    value must not go in, now that C's failure released the lock."""
    row = Row()
    (_, price_a), (_, price_b), (_, price_c) = workers(redis_server.port, row, 3)
    thread, old = in_thread(lambda: price_a("k"))
    try:
        assert row.started.wait(10)
        row.price = 2
        price_b.cache_delete("k")
        row.fail_next = True
        with request_scope(), pytest.raises(RuntimeError):
            price_c("k")
    finally:
        row.release.set()
        thread.join(10)
    assert old == [1]
    with request_scope():
        assert price_b("k") == 2


def test_a_waiter_that_timed_out_never_overwrites_a_value_computed_after_a_delete(
    redis_server: Any,
) -> None:
    """W waits for another process's lock (one with a longer lock_timeout), gives up and
    computes from the old row. The row changes, the entry is deleted, and B computes and
    stores the new value. W ends: its old value must not overwrite B's."""
    row = Row()
    (cache_w, price_w), (_, price_b) = workers(redis_server.port, row, 2, lock_timeout=0.3)
    client = redis.Redis(port=redis_server.port)
    client.set(lock_of(price_w, "k"), "another-process", px=10_000)
    thread, old = in_thread(lambda: price_w("k"))
    try:
        assert row.started.wait(10)
        assert cache_w.stats().lock_timeouts == 1
        row.price = 2
        price_b.cache_delete("k")
        with request_scope():
            assert price_b("k") == 2
    finally:
        row.release.set()
        thread.join(10)
    assert old == [1]
    with request_scope():
        assert price_b("k") == 2


def test_a_waiter_that_timed_out_stores_nothing_while_a_lock_taken_after_a_delete_is_held(
    redis_server: Any,
) -> None:
    """W gives up waiting for another process's lock and computes from the old row. The
    entry is deleted; B takes the lock and computes. W ends first: its old
    value must not go in (B then fails, and would leave it there for a whole ttl)."""
    row = Row()
    (cache_w, price_w), (_, price_b) = workers(redis_server.port, row, 2, lock_timeout=0.3)
    client = redis.Redis(port=redis_server.port)
    client.set(lock_of(price_w, "k"), "another-process", px=10_000)
    w_gate, b_gate = row.gate("w"), row.gate("b", fail=True)
    w, old = in_thread(lambda: price_w("k"), "w")
    b: threading.Thread | None = None
    try:
        assert row.reached["w"].wait(10)
        assert cache_w.stats().lock_timeouts == 1
        row.price = 2
        price_b.cache_delete("k")
        b, failed = in_thread(lambda: price_b("k"), "b")
        assert row.reached["b"].wait(10)
        w_gate.set()
        w.join(10)
        assert old == [1]
    finally:
        w_gate.set()
        b_gate.set()
        w.join(10)
        if b is not None:
            b.join(10)
    assert type(failed[0]) is RuntimeError
    with request_scope():
        assert price_b("k") == 2


def test_cache_clear_leaves_no_value_computed_before_it_whatever_the_scan_order(
    redis_server: Any,
) -> None:
    """A computes 40 keys from the old rows; the rows change and B clears the function,
    a SCAN page at a time (3,000 other keys of it make several pages). A's computations
    end between two pages: a key whose value's slot the SCAN had passed (no value then)
    and whose lock's slot it had not (no lock any more) kept A's old value."""
    row = Row()
    (_, price_a), (cache_b, price_b) = workers(redis_server.port, row, 2)
    client = redis.Redis(port=redis_server.port)
    prefix = lock_of(price_a, "x")[: -len(":lock") - 64]
    with client.pipeline(transaction=False) as pipe:
        for n in range(3000):
            pipe.set(prefix + hashlib.sha256(b"%d" % n).hexdigest(), b"0", ex=60)
        pipe.execute()
    threads = [in_thread(lambda n=n: price_a(f"k{n}"))[0] for n in range(40)]  # type: ignore[misc]
    deadline = time.monotonic() + 20
    while sum(k.endswith(b":lock") for k in client.scan_iter(count=1000)) < 40:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    scan, pages = cache_b._sync.client.scan, []

    def paged(*args: Any, **kwargs: Any) -> Any:
        if pages:  # A's computations end between two pages of the clear
            row.release.set()
            for thread in threads:
                thread.join(10)
        pages.append(1)
        return scan(*args, **kwargs)

    row.price = 2
    cache_b._sync.client.scan = paged
    try:
        price_b.cache_clear()
    finally:
        row.release.set()
        for thread in threads:
            thread.join(10)
    assert len(pages) > 1
    with request_scope():
        stale = [n for n in range(40) if price_b(f"k{n}") != 2]
    assert stale == []


def test_a_waiter_that_timed_out_stores_nothing_after_a_cache_clear(redis_server: Any) -> None:
    """H (a long lock_timeout) computes; W (a short one) gives up waiting for it and
    computes from the old row too. H stores and ends; the row changes and the function
    is cleared, with no lock there. W ends: its old value must not go in."""
    row = Row()
    (_, price_h), (cache_w, price_w) = (
        workers(redis_server.port, row, 1, lock_timeout=10)[0],
        workers(redis_server.port, row, 1, lock_timeout=0.3)[0],
    )
    h_gate, w_gate = row.gate("h"), row.gate("w")
    h, _ = in_thread(lambda: price_h("k"), "h")
    w: threading.Thread | None = None
    try:
        assert row.reached["h"].wait(10)
        w, old = in_thread(lambda: price_w("k"), "w")
        assert row.reached["w"].wait(10)
        assert cache_w.stats().lock_timeouts == 1
        h_gate.set()
        h.join(10)
        row.price = 2
        price_h.cache_clear()
        w_gate.set()
        w.join(10)
        assert old == [1]
    finally:
        h_gate.set()
        w_gate.set()
        h.join(10)
        if w is not None:
            w.join(10)
    with request_scope():
        assert price_h("k") == 2


@pytest.mark.parametrize("how", ["cache_delete", "cache_clear"])
def test_a_hot_key_deleted_again_and_again_is_computed_once_per_delete(
    redis_server: Any, how: str
) -> None:
    """4 workers x 4 threads call one key while another deletes (or clears) it every
    80 ms: each delete costs one computation, across workers (never two between two
    deletes: a clear's second SCAN leaves the computation begun since its first), nobody
    waits lock_timeout, and the counters add up to the calls."""
    computations: list[float] = []
    made = []
    for _ in range(4):
        # A loaded machine (make check's four workers) may take over the default 0.5 s
        # for one operation, and the tier would stand aside: not what this test checks.
        cache = RedisCache(
            redis.Redis(port=redis_server.port), ttl=60, namespace="hot", op_timeout=10
        )

        def hot(k: str) -> int:
            computations.append(time.monotonic())
            time.sleep(0.03)
            return 1

        made.append((cache, request_memo(shared=cache)(hot)))
    stop, deletes, calls = time.monotonic() + 1.5, [0.0], [0] * 4
    lock = threading.Lock()

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            with request_scope():
                assert made[i][1]("k") == 1
            with lock:
                calls[i] += 1
            time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4) for _ in range(4)]
    for thread in threads:
        thread.start()
    while time.monotonic() < stop:
        time.sleep(0.08)
        deletes.append(time.monotonic())
        getattr(made[1][1], how)(*(["k"] if how == "cache_delete" else []))
    for thread in threads:
        thread.join(10)
    per = [sum(a <= c < b for c in computations) for a, b in itertools.pairwise(deletes)]
    # At most one computation per delete (and the first): in all, since on a loaded machine
    # the one a delete causes may start after the next delete's time is taken, before that
    # delete has run (its interval then shows 2, the one before it 0).
    assert len(computations) <= len(deletes), (len(deletes), per)
    assert max(per) <= 2 and sum(per) >= len(per) // 2, per  # (a loaded machine calls less)
    stats = [cache.stats() for cache, _ in made]
    assert sum(s.lock_timeouts for s in stats) == sum(s.errors for s in stats) == 0
    assert sum(s.misses for s in stats) == len(computations)
    assert [s.hits + s.misses for s in stats] == calls


def test_a_computation_replacing_a_bad_value_stores_nothing_after_a_cache_clear(
    redis_server: Any,
) -> None:
    """W finds a value it cannot read (another writer's, or one signed with an old
    secret) and computes from the old row. The row changes and the function is cleared:
    W held no lock. W ends: its old value must not go in."""
    row = Row()
    (cache_w, price_w), (_, price_b) = workers(redis_server.port, row, 2)
    client = redis.Redis(port=redis_server.port)
    client.set(lock_of(price_w, "k")[: -len(":lock")], b"not json")
    w_gate = row.gate("w")
    w, old = in_thread(lambda: price_w("k"), "w")
    try:
        assert row.reached["w"].wait(10)
        assert cache_w.stats().bad_values == 1
        row.price = 2
        price_b.cache_clear()
    finally:
        w_gate.set()
        w.join(10)
    assert old == [1]
    with request_scope():
        assert price_b("k") == 2


def test_a_bad_value_is_replaced_once_across_workers(redis_server: Any) -> None:
    """Every worker finds a value it cannot read at once (the secret changed): one
    computes its replacement, under the lock, and the others wait for it."""
    row = Row()
    row.price = 3
    made = workers(redis_server.port, row, 4)
    redis.Redis(port=redis_server.port).set(lock_of(made[0][1], "k")[: -len(":lock")], b"?")
    computed = []
    read = row.read

    def slow_read() -> int:
        computed.append(1)
        time.sleep(0.2)
        return read()

    row.read = slow_read  # type: ignore[method-assign]
    threads = [in_thread(lambda fn=fn: fn("k")) for _, fn in made]  # type: ignore[misc]
    for thread, _ in threads:
        thread.join(10)
    assert [out for _, out in threads] == [[3]] * 4
    assert len(computed) == 1
    assert sum(cache.stats().lock_waits for cache, _ in made) == 3


def test_a_request_after_another_process_deleted_does_not_join_the_old_computation(
    redis_server: Any,
) -> None:
    """Worker A computes from the old row. Worker B updates the row and deletes the
    entry; the user's next request lands on A, where the old computation is still in
    flight: it must not get that computation's value (nor wait for it to get it)."""
    row = Row()
    (_, price_a), (_, price_b) = workers(redis_server.port, row, 2)
    a1_gate = row.gate("a1")
    a1, old = in_thread(lambda: price_a("k"), "a1")
    a2: threading.Thread | None = None
    try:
        assert row.reached["a1"].wait(10)
        row.price = 2
        price_b.cache_delete("k")
        a2, new = in_thread(lambda: price_a("k"), "a2")
        a2.join(0.3)  # it computes afresh (or waits for the old computation)
        a1_gate.set()
        a1.join(10)
        a2.join(10)
    finally:
        a1_gate.set()
        a1.join(10)
        if a2 is not None:
            a2.join(10)
    assert old == [1]
    assert new == [2]


def test_async_a_request_after_another_process_deleted_does_not_join_the_old_computation(
    redis_server: Any,
) -> None:
    """As above, for async functions: worker A's tasks."""
    row = {"price": 1}

    async def main() -> tuple[int, int]:
        release = asyncio.Event()
        made = []
        for _ in range(2):
            cache = RedisCache(redis_server.aclient(), ttl=60, namespace="atk-async")

            async def price(sku: str) -> int:
                value = row["price"]
                if value == 1:
                    await release.wait()
                return value

            made.append((cache, request_memo(shared=cache)(price)))
        (cache_a, price_a), (_, price_b) = made

        async def request(fn: Any) -> int:
            async with request_scope():
                return int(await fn("k"))

        a1 = asyncio.create_task(request(price_a))
        deadline = time.monotonic() + 10
        while cache_a.stats().misses == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        row["price"] = 2
        price_b.cache_delete("k")
        a2 = asyncio.create_task(request(price_a))
        await asyncio.sleep(0.2)
        release.set()
        result = await asyncio.wait_for(asyncio.gather(a1, a2), 10)
        for cache, _ in made:
            await cache.aclose()
        return result[0], result[1]

    assert asyncio.run(main()) == (1, 2)


@pytest.mark.slow  # seconds of waits: make check skips it
def test_a_delete_storm_strands_no_caller(redis_server: Any) -> None:
    """Deletes every 20 ms, by one of 4 workers x 8 threads, of a key that takes 50 ms
    to compute: no value lasts, yet every call ends within about lock_timeout (a waiter
    whose computation a delete made old tries once more, not again and again)."""
    made = []
    for _ in range(4):
        cache = RedisCache(redis.Redis(port=redis_server.port), ttl=60, namespace="storm",
                           lock_timeout=0.5)  # fmt: skip

        def hot(k: str) -> int:
            time.sleep(0.05)
            return 1

        made.append(request_memo(shared=cache)(hot))
    stop, slowest = time.monotonic() + 4, [0.0]

    def worker(fn: Any) -> None:
        while time.monotonic() < stop:
            start = time.monotonic()
            with request_scope():
                assert fn("k") == 1
            slowest[0] = max(slowest[0], time.monotonic() - start)

    threads = [threading.Thread(target=worker, args=(fn,)) for fn in made for _ in range(8)]
    for thread in threads:
        thread.start()
    while time.monotonic() < stop:
        made[0].cache_delete("k")
        time.sleep(0.02)
    for thread in threads:
        thread.join(10)
    assert slowest[0] < 3, slowest


def test_async_a_cancelled_caller_that_took_the_lock_after_a_delete_leaves_no_stall(
    redis_server: Any,
) -> None:
    """A (async) computes from the old row; the entry is deleted; C takes the
    lock and is cancelled mid-computation. The next caller does not wait for
    anything, and A's old value still does not go in when A ends."""
    row = {"price": 1}

    async def main() -> None:
        old_gate, c_gate = asyncio.Event(), asyncio.Event()
        made = []
        for _ in range(3):
            cache = RedisCache(redis_server.aclient(), ttl=60, namespace="atk-cancel")

            async def price(sku: str) -> int:
                value = row["price"]
                await (old_gate if value == 1 else c_gate).wait()
                return value

            made.append((cache, request_memo(shared=cache)(price)))
        (cache_a, price_a), (cache_c, price_c), (_, price_d) = made

        async def request(fn: Any) -> int:
            async with request_scope():
                return int(await fn("k"))

        async def until(cache: RedisCache) -> None:
            deadline = time.monotonic() + 10
            while cache.stats().misses == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

        a = asyncio.create_task(request(price_a))
        await until(cache_a)
        row["price"] = 2
        price_d.cache_delete("k")
        c = asyncio.create_task(request(price_c))
        await until(cache_c)
        c.cancel()
        with pytest.raises(asyncio.CancelledError):
            await c
        await asyncio.sleep(0.05)  # its release, in a task of its own
        c_gate.set()
        start = time.monotonic()
        assert await request(price_d) == 2
        assert time.monotonic() - start < 1  # not lock_timeout (5 s)
        old_gate.set()
        assert await a == 1
        assert await request(price_c) == 2
        for cache, _ in made:
            await cache.aclose()

    asyncio.run(main())
    with redis.Redis(port=redis_server.port) as admin:
        locks = [k for k in admin.scan_iter() if k.endswith(b":lock")]
        assert locks == []


@pytest.mark.slow  # seconds of waits: make check skips it
@pytest.mark.timeout(120)
def test_a_stampede_of_4_processes_with_deletes_computes_once_per_delete(
    redis_server: Any,
) -> None:
    """tests/test_redis_processes.py's stampede (4 spawned processes x 20 threads or
    tasks on one key), with a long ttl and the test process deleting the key every
    300 ms: one computation after each delete, never two between two deletes."""
    spawn = multiprocessing.get_context("spawn")
    kinds, port, compute_s, seconds = ("sync", "sync", "async", "async"), redis_server.port, 0.1, 3
    barrier, out = spawn.Barrier(len(kinds) + 1), spawn.Queue()
    children = [
        spawn.Process(
            target=redis_apps.stampede, args=(port, kind, 60, compute_s, seconds, barrier, out)
        )
        for kind in kinds
    ]
    for child in children:
        child.start()
    cache = RedisCache(redis.Redis(port=port), ttl=60, namespace="stampede")
    hot = request_memo(shared=cache)(redis_apps._sync_hot)
    barrier.wait(60)
    deletes, stop = [0.0], time.monotonic() + seconds - 0.3
    while time.monotonic() < stop:
        time.sleep(0.3)
        deletes.append(time.time())
        hot.cache_delete(port, compute_s)
    deletes.append(time.time() + 60)
    calls = [out.get(timeout=90) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    with redis.Redis(port=port) as client:
        starts = sorted(float(item.split()[0]) for item in client.lrange("computations", 0, -1))
    per = [sum(a <= s < b for s in starts) for a, b in itertools.pairwise(deletes)]
    assert max(per) == 1 and sum(per) >= len(per) // 2, (per, calls)


@pytest.mark.parametrize("how", ["cache_delete", "cache_clear"])
@pytest.mark.parametrize("step", ["claim", "extend", "compute", "store", "store-retry"])
def test_an_update_and_delete_at_any_step_of_a_miss_leaves_no_old_value(
    redis_server: Any, step: str, how: str
) -> None:
    """Another worker updates the row and deletes the entry at one step of A's miss:
    before its CLAIM, between CLAIM and EXTEND, during its computation, before its
    STORE, between two tries of its STORE (a busy pool). A's caller gets what A read;
    the next read anywhere gets the new row at once."""
    row = {"price": 1}
    made = []
    for _ in range(2):
        cache = RedisCache(redis.Redis(port=redis_server.port), ttl=60, namespace="steps",
                           lock_timeout=5)  # fmt: skip

        def price(sku: str) -> int:
            value = row["price"]
            if step == "compute" and value == 1:
                update()
            return value

        made.append((cache, request_memo(shared=cache)(price)))
    (cache_a, price_a), (_, price_b) = made

    def update() -> None:
        row["price"] = 2
        price_b.cache_delete("k") if how == "cache_delete" else price_b.cache_clear()

    name = "store" if step == "store-retry" else step
    real, tries = getattr(cache_a._sync, name, None), []

    def hooked(**kwargs: Any) -> Any:
        tries.append(1)
        if len(tries) == 1:
            update()
            if step == "store-retry":
                raise redis.ConnectionError("No connection available.")
        return real(**kwargs)  # type: ignore[misc]

    if real is not None:
        setattr(cache_a._sync, name, hooked)
    with request_scope():
        assert price_a("k") == (2 if step in ("claim", "extend") else 1)
    assert tries or step == "compute"
    start = time.monotonic()
    for fn in (price_b, price_a):
        with request_scope():
            assert fn("k") == 2
    assert time.monotonic() - start < 1


def test_a_delete_from_a_cache_with_a_shorter_lock_timeout_still_outlives_the_lock(
    redis_server: Any,
) -> None:
    """A management command (its RedisCache with lock_timeout=0.2) deletes a key that a
    web worker (lock_timeout=30, for a slow report) computes from the old row. The
    key's generation lasts as long as the lock it removed: the report, ending after 0.2 s but
    within its own lock, stores nothing."""
    row = Row()
    (_, web) = workers(redis_server.port, row, 1, lock_timeout=30)[0]
    (_, admin) = workers(redis_server.port, row, 1, lock_timeout=0.2)[0]
    gate = row.gate("web")
    thread, old = in_thread(lambda: web("k"), "web")
    try:
        assert row.reached["web"].wait(10)
        row.price = 2
        admin.cache_delete("k")
        time.sleep(0.4)
    finally:
        gate.set()
        thread.join(10)
    assert old == [1]
    with request_scope():
        assert admin("k") == 2


@pytest.mark.parametrize("how", ["cache_delete", "cache_clear"])
def test_a_full_server_still_deletes(own_redis: Any, how: str) -> None:
    """A server at maxmemory with noeviction refuses writes that need memory, not the
    deletes that free it: cache_delete and cache_clear still delete (and renew the
    generation). A script is refused only if its first write needs memory."""
    server = own_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    row = Row()
    row.release.set()
    ((cache, price),) = workers(server.port, row, 1)
    with request_scope():
        assert price("k") == 1
    client = redis.Redis(port=server.port)
    n = 0
    for size in (1000, 1):  # fill it until even a small new key is refused
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            while n < 100_000:
                client.set(f"filler:{n}", b"x" * size)
                n += 1
    row.price = 2
    if how == "cache_delete":
        assert price.cache_delete("k") is True
        assert price.cache_delete("absent") is False
    else:
        price.cache_clear()
    assert cache.stats().errors == 0
    values = [k for k in client.scan_iter("atk:*") if not k.endswith((b":lock", b":gen"))]
    assert values == []


def test_a_lock_taken_after_a_delete_by_a_claim_nobody_extends_still_invalidates(
    redis_server: Any,
) -> None:
    """A computes from the old row; the entry is deleted; a CLAIM takes the lock
    and its caller never extends the lock (Redis ran it after the caller gave up; the
    process died). Its lease (op_timeout) ends: the next miss takes the lock over at
    once, and A, ending after the lease, still stores nothing: the generation changed."""
    row = Row()
    (cache_a, price_a), (_, price_b) = workers(redis_server.port, row, 2, op_timeout=0.2)
    gate = row.gate("a")
    thread, old = in_thread(lambda: price_a("k"), "a")
    lock = lock_of(price_a, "k")
    try:
        assert row.reached["a"].wait(10)
        row.price = 2
        price_b.cache_delete("k")
        key = lock[: -len(":lock")]
        keys = [key, lock, key + ":gen", key.rsplit(":", 2)[0] + "::gen", key + ":last"]
        ghost = cache_a._sync.claim(keys=keys, args=["ab" * 9, 200, "", 60_000])
        assert ghost[0] == 2
        time.sleep(0.3)  # the lease is over
    finally:
        gate.set()
        thread.join(10)
    assert old == [1]
    start = time.monotonic()
    with request_scope():
        assert price_b("k") == 2
    assert time.monotonic() - start < 1  # not lock_timeout (5 s)


def test_a_holder_that_dies_after_a_delete_holds_the_key_no_longer_than_its_lock(
    redis_server: Any,
) -> None:
    """A worker with lock_timeout=20 computes from the old row; a cache with
    lock_timeout=1 deletes the entry; another process's miss takes the lock, extends
    it to its 1 s and dies. With delete marks, the mark it took over kept the worker's
    20 s: every call waited its 1 s, computed and stored nothing, for 20 s. Now the
    first call waits at most the dead holder's second, and the next one is a hit."""
    row = Row()
    ((slow, price_slow),) = workers(redis_server.port, row, 1, lock_timeout=20)
    ((fast, price_fast),) = workers(redis_server.port, row, 1, lock_timeout=1)
    gate = row.gate("slow")
    thread, old = in_thread(lambda: price_slow("k"), "slow")
    lock = lock_of(price_fast, "k")
    key = lock[: -len(":lock")]
    try:
        assert row.reached["slow"].wait(10)
        row.price = 2
        price_fast.cache_delete("k")
        keys = [key, lock, key + ":gen", key.rsplit(":", 2)[0] + "::gen", key + ":last"]
        ghost = "ab" * 9
        assert fast._sync.claim(keys=keys, args=[ghost, 500, "", 60_000])[0] == 2
        fast._sync.extend(keys=[lock], args=[ghost, 1000])  # then it dies
        for call in range(3):
            start = time.monotonic()
            with request_scope():
                assert price_fast("k") == 2
            assert time.monotonic() - start < (1.8 if call == 0 else 0.5), call
        assert redis.Redis(port=redis_server.port).exists(key)  # stored
    finally:
        gate.set()
        thread.join(10)
    assert old == [1]
    with request_scope():
        assert price_fast("k") == 2  # the old computation stored nothing
    slow.close()
    fast.close()
