"""MemoStore: a bounded, least-recently-used, thread-safe mapping."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from keys import Model

import perrequest
from perrequest import MemoStore, ScopeClosed, current_store, request_memo, request_scope


def test_mapping_basics() -> None:
    store = MemoStore()
    store["a"] = 1
    store.update(b=2, c=3)
    assert dict(store) == {"a": 1, "b": 2, "c": 3}
    assert len(store) == 3 and "a" in store and "z" not in store
    assert store.get("z", 0) == 0
    assert store.pop("a") == 1 and store.pop("a", None) is None
    with pytest.raises(KeyError):
        store.pop("a")
    assert store.setdefault("d", 4) == 4 and store.setdefault("d", 5) == 4
    del store["b"]
    with pytest.raises(KeyError):
        del store["b"]
    assert repr(store).startswith("<MemoStore open entries=2")
    store.clear()
    assert len(store) == 0
    with pytest.raises(KeyError):
        store.popitem()


def test_least_recently_used_is_evicted() -> None:
    store = MemoStore(max_entries=3)
    store["a"], store["b"], store["c"] = 1, 2, 3
    assert store["a"] == 1  # a is now the most recent
    store["d"] = 4
    assert list(store) == ["a", "c", "d"] or set(store) == {"a", "c", "d"}
    assert "b" not in store
    store["c"] = 30  # overwriting refreshes too
    store["e"] = 5
    assert set(store) == {"c", "d", "e"}
    assert store.stats.evictions == 2 and store.stats.peak_entries == 3
    assert store.stats.entries == 3


def test_get_or_set_refreshes_recency_and_counts() -> None:
    store = MemoStore(max_entries=2)
    store.get_or_set("a", lambda: 1)
    store.get_or_set("b", lambda: 2)
    store.get_or_set("a", lambda: 0)
    store.get_or_set("c", lambda: 3)
    assert set(store) == {"a", "c"}
    assert (store.stats.hits, store.stats.misses) == (1, 3)
    # Plain mapping access is not counted.
    store["x"] = 1
    _ = store["x"]
    assert (store.stats.hits, store.stats.misses) == (1, 3)


def test_popitem_takes_the_most_recent() -> None:
    store = MemoStore()
    store["a"], store["b"] = 1, 2
    assert store.popitem() == ("b", 2)


def test_store_never_exceeds_its_bound() -> None:
    store = MemoStore(max_entries=10)
    for i in range(1000):
        store[i] = i
        assert len(store) <= 10
    assert store.stats.evictions == 990


def test_bad_keys_and_factories() -> None:
    store = MemoStore()
    with pytest.raises(TypeError):
        store[["unhashable"]] = 1
    with pytest.raises(TypeError):
        store.get_or_set(["unhashable"], lambda: 1)

    async def coro() -> int:
        return 1

    with pytest.raises(TypeError, match="coroutine"):
        store.get_or_set("k", coro)  # type: ignore[arg-type, return-value]
    assert "k" not in store


UNHASHABLE = "store keys must be hashable, not list: use a tuple"


def test_an_unhashable_key_is_refused_alike_whatever_the_store_holds() -> None:
    """Before, ``get`` and ``in`` answered "absent" outside a scope and in an empty
    store, and raised a bare "unhashable type" once anything was written: the same call
    flipped from working to failing on an unrelated earlier write."""
    with pytest.raises(TypeError, match=UNHASHABLE):
        perrequest.get(["tenant", 1], "default")  # outside any scope
    with request_scope() as store:
        for when in ("empty", "written"):
            with pytest.raises(TypeError, match=UNHASHABLE):
                perrequest.get(["tenant", 1], "default")
            with pytest.raises(TypeError, match=UNHASHABLE):
                store.get(["tenant", 1])
            with pytest.raises(TypeError, match=UNHASHABLE):
                ["tenant", 1] in store  # noqa: B015
            with pytest.raises(TypeError, match=UNHASHABLE):
                store[["tenant", 1]]
            for write in (
                lambda: perrequest.set(["tenant", 1], 1),
                lambda: perrequest.get_or_set(["tenant", 1], lambda: 1),
                lambda: perrequest.delete(["tenant", 1]),
                lambda: store.setdefault(["tenant", 1], 1),
            ):
                with pytest.raises(TypeError, match=UNHASHABLE):
                    write()
            perrequest.set(("tenant", 1), when)  # the tuple the message suggests
        assert perrequest.get(("tenant", 1)) == "written"
        assert store.stats.misses == 0  # the refused get_or_set counted nothing


def test_get_or_set_refuses_a_factory_that_is_not_callable() -> None:
    """Before: "'int' object is not callable" from inside the library, counted as a miss."""
    with request_scope() as store:
        with pytest.raises(TypeError, match=r"factory must be a callable .* lambda: value"):
            perrequest.get_or_set("answer", 42)  # type: ignore[arg-type]
        assert store.stats.misses == 0 and "answer" not in store


def test_get_or_set_names_a_factory_that_takes_arguments_and_keeps_its_own_type_errors() -> None:
    """Before: Python's bare "<lambda>() missing 1 required positional argument"."""

    def needs_key(key: str) -> str:
        return key

    def broken() -> str:
        raise TypeError("inside the factory")

    with request_scope():
        with pytest.raises(TypeError, match=r"calls factory\(\) with no arguments") as info:
            perrequest.get_or_set("user:1", needs_key)  # type: ignore[arg-type]
        assert "needs_key" in str(info.value) and "'key'" in str(info.value)
        with pytest.raises(TypeError, match=r"^inside the factory$"):
            perrequest.get_or_set("user:2", broken)

        def with_db(fn: Any) -> Any:  # a decorator that supplies the argument
            @functools.wraps(fn)
            def wrapper() -> Any:
                return fn("db")

            return wrapper

        @with_db
        def settings(db: str) -> int:
            return int(None)  # type: ignore[arg-type]  # its own TypeError

        with pytest.raises(TypeError, match="int\\(\\) argument"):  # not "takes some"
            perrequest.get_or_set("settings", settings)
        assert "user:1" not in current_store() and "user:2" not in current_store()


def test_keys_whose_hash_changes_after_they_are_stored_are_evicted_all_the_same() -> None:
    """A model hashed by its primary key, the key changed after its entry was stored
    (Django's copy idiom: pk = None, save()). Before: eviction popped by the new hash,
    missed, and the entry stayed in its function's dict outside the bound: 10,000
    messages of a long scope bounded to 100 kept 10,000 entries."""

    class Model:
        def __init__(self, pk: int) -> None:
            self.pk = pk

        def __hash__(self) -> int:
            return hash(self.pk)

        def __eq__(self, other: object) -> bool:
            if type(other) is not Model:
                return NotImplemented  # as Django's, dataclasses', attrs'
            return other.pk == self.pk

    @request_memo
    def permissions(model: Model) -> list[str]:
        return ["read"]

    @request_memo(max_entries=10)  # a bound of its own: an OrderedDict
    def owner(model: Model) -> str:
        return "me"

    with request_scope(max_entries=100) as store:
        for i in range(2_000):
            model = Model(i)
            permissions(model), owner(model)
            perrequest.set(("seen", model), True)
            model.pk = -1 - i  # saved as a copy
        held = sum(len(sub) for sub in store._subs.values())  # type: ignore[union-attr]
        assert held == len(store) <= 100, held
        assert store.stats.evictions == 3 * 2_000 - len(store)
        entries = [e for sub in store._subs.values() for e in dict.values(sub)]  # type: ignore[union-attr]
        assert sorted(e[2] for e in entries) == sorted(store._order)  # one index, both ways

    computed: list[int] = []

    @request_memo
    def named(model: Model) -> str:
        computed.append(model.pk)
        return f"model {model.pk}"

    with request_scope(max_entries=3):  # an entry whose key changed is never served
        one, five = Model(1), Model(5)
        named(one), named(five), named(Model(8))
        one.pk, five.pk = 100, 6  # both filed under hashes their keys no longer have
        named(Model(9))  # evicts 1's entry by identity; 5's goes too, 8's stays
        assert named(Model(6)) == "model 6"  # before this fix's review: "model 5"
        assert named(Model(8)) == "model 8" and computed == [1, 5, 8, 9, 6]

    @request_memo(max_entries=3)  # its own bound: its dict keeps its recency through it
    def bounded(model: Model) -> int:
        computed.append(model.pk)
        return model.pk

    with request_scope() as store:
        a, b, k = Model(10), Model(11), Model(12)
        bounded(a), bounded(b), bounded(a)  # b is the function's least recently used
        bounded(k)
        k.pk = 13
        store.popitem()  # k's entry, the most recent: taken by identity
        bounded(Model(14)), bounded(Model(15))  # over the bound: b goes, not a
        computed.clear()
        bounded(a), bounded(b)
        assert computed == [11]


def test_keys_changed_as_django_models_change_never_break_eviction_or_cache_clear() -> None:
    """Django's model hash: by pk, and a TypeError while pk is None (a copy being saved).
    Before a review: an unrelated call raised that TypeError as it evicted such a key; a
    key whose new hash probed its old slot kept serving its old value; a bounded
    function's cache_clear() raised KeyError, or never returned."""

    @request_memo
    def f(model: Model) -> int:
        return model.pk or 0

    @request_memo(max_entries=8)
    def g(model: Model) -> int:
        return model.pk or 0

    with request_scope(max_entries=3) as store:
        a = Model(1)
        f(a), f(Model(2)), f(Model(3))
        a.pk = None  # being saved as a copy
        assert f(Model(4)) == 4  # evicts a's entry: by identity, no TypeError
        assert len(store) == 3
    with request_scope(max_entries=3):
        a, b = Model(1), Model(2)
        f(a), f(b), f(Model(3))
        b.pk, a.pk = 10, 100  # 10 probes 2's slot first in a small dict
        f(Model(4))  # evicts a's entry; b's, which its key no longer finds, goes too
        assert f(Model(10)) == 10
    with request_scope() as store:
        keys = [Model(i) for i in range(3)]
        for key in keys:
            g(key)
        keys[0].pk, keys[2].pk = 30, 1  # one changed, one now equal to another's
        g.cache_clear()
        assert g.cache_info().currsize == 0 and len(store) == 0


def test_get_or_set_does_not_cache_exceptions() -> None:
    store = MemoStore()
    with pytest.raises(ZeroDivisionError):
        store.get_or_set("k", lambda: 1 / 0)
    assert store.get_or_set("k", lambda: 7) == 7
    assert store.stats.misses == 2


@pytest.mark.parametrize(
    "write",
    [
        lambda s: s.__setitem__("k", 1),
        lambda s: s.__delitem__("missing"),
        lambda s: s.pop("missing", None),
        lambda s: s.popitem(),
        lambda s: s.clear(),
        lambda s: s.setdefault("k", 1),
        lambda s: s.update(k=1),
        lambda s: s.get_or_set("k", lambda: pytest.fail("factory called on a closed store")),
    ],
    ids=["setitem", "delitem", "pop", "popitem", "clear", "setdefault", "update", "get_or_set"],
)
def test_every_write_to_a_closed_store_raises(write) -> None:  # type: ignore[no-untyped-def]
    with request_scope() as store:
        store["a"] = 1
    assert store.closed and len(store) == 0
    with pytest.raises(ScopeClosed, match="ended"):
        write(store)
    assert len(store) == 0 and store.get("a") is None


def test_closing_frees_values_at_once() -> None:
    import weakref

    class Big:
        pass

    with request_scope() as store:
        value = Big()
        ref = weakref.ref(value)
        store["v"] = value
        del value
    assert ref() is None  # no garbage collection needed


def test_a_closed_store_keeps_no_on_close() -> None:
    """A closed store holds no functions: not its on_close either, which may be a
    closure over a job's data, kept by whatever still holds the store (a task that
    outlived its scope, the ASGI scope dict)."""
    import weakref

    class Job:
        pass

    def run() -> MemoStore:
        job = Job()
        refs.append(weakref.ref(job))
        with request_scope(on_close=lambda stats: job) as store:
            store["k"] = 1
        return store

    refs: list[weakref.ref[Job]] = []
    store = run()  # kept past its scope
    assert store.closed and store.stats.entries == 1
    assert refs[0]() is None  # no garbage collection needed


def test_threads_sharing_one_store_compute_once() -> None:
    store = MemoStore()
    calls = []
    start = threading.Barrier(8)

    def slow() -> int:
        calls.append(1)
        time.sleep(0.05)
        return 99

    def worker() -> int:
        start.wait()
        return store.get_or_set("k", slow)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: worker(), range(8)))
    assert results == [99] * 8 and len(calls) == 1
    assert store.stats.misses == 1 and store.stats.hits == 7


def test_threads_waiting_get_the_exception_and_it_is_not_cached() -> None:
    store = MemoStore()
    start = threading.Barrier(4)
    calls = []

    def failing() -> int:
        calls.append(1)
        # Until the three others wait for this call (a waiter counts as a hit): a thread
        # late past a fixed sleep, on a loaded machine, would call again after the error.
        deadline = time.monotonic() + 10
        while store.stats.hits < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        raise ValueError("db down")

    def worker() -> str:
        start.wait()
        try:
            store.get_or_set("k", failing)
        except ValueError as exc:
            return str(exc)
        return "no error"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: worker(), range(4)))
    assert outcomes == ["db down"] * 4 and len(calls) == 1
    assert "k" not in store


def test_concurrent_writers_keep_the_bound() -> None:
    store = MemoStore(max_entries=50)

    def writer(base: int) -> None:
        for i in range(2000):
            store[(base, i)] = i
            store.get((base, i - 1))

    threads = [threading.Thread(target=writer, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 50 and len(store._order) == 50
    assert store.stats.evictions == 4 * 2000 - 50


async def test_store_is_usable_from_the_event_loop_and_threads() -> None:
    async with request_scope() as store:
        await asyncio.to_thread(store.__setitem__, "t", 1)
        assert store["t"] == 1


@contextlib.contextmanager
def _one_memo_entry() -> Iterator[tuple[MemoStore, Any]]:
    """A scope whose store holds one memo entry, ``f(1) == 10``, and its key as iterated."""

    @request_memo
    def f(x: int) -> int:
        return x * 10

    with request_scope() as store:
        f(1)
        (memo_key,) = list(store)
        yield store, memo_key


def test_a_memo_key_never_equals_a_users_key() -> None:
    """Iteration shows memo entries as ``MemoKey`` objects, which never equal a key a
    user passes: not even the plain tuple of the same items (a NamedTuple's equality)."""

    with _one_memo_entry() as (store, memo_key):
        assert memo_key != tuple(memo_key) and tuple(memo_key) != memo_key
        perrequest.set(tuple(memo_key), "a user's value")
        assert len(dict(store)) == len(store) == 2  # two keys, not two equal ones
        assert store[memo_key] == 10 and perrequest.get(tuple(memo_key)) == "a user's value"
        assert memo_key == type(memo_key)(*memo_key) and len({memo_key, tuple(memo_key)}) == 2


def test_memo_entries_are_read_not_written_through_the_mapping() -> None:
    with _one_memo_entry() as (store, memo_key):
        assert store[memo_key] == 10 and memo_key in store
        assert store.setdefault(memo_key, "X") == 10  # an existing entry: read, not replaced
        assert store.get_or_set(memo_key, lambda: "Y") == 10
        assert len(store) == len(list(store)) == 1
        with pytest.raises(TypeError, match="memo entry"):
            store[memo_key] = "Z"
        del store[memo_key]
        with pytest.raises(TypeError, match="memo entry"):
            store.setdefault(memo_key, "X")  # gone: writing it back is refused
        assert len(store) == 0 and list(store) == []


def test_items_and_values_are_snapshots_that_leave_recency_alone() -> None:
    store = MemoStore(max_entries=3)
    store["a"], store["b"], store["c"] = 1, 2, 3
    items = store.items()
    for key, _ in items:
        store.pop(key)  # mutating while iterating a snapshot is fine
    assert len(store) == 0 and len(items) == 0
    store["a"], store["b"], store["c"] = 1, 2, 3
    assert list(store.values()) == [1, 2, 3] and next(iter(store.items())) == ("a", 1)
    store["d"] = 4  # reading items()/values() did not refresh "a": it is evicted
    assert "a" not in store and set(store) == {"b", "c", "d"}


def test_membership_in_items_and_values_leaves_recency_alone() -> None:
    """``x in store.values()`` and ``(k, v) in store.items()``: collections.abc's views
    read ``store[key]``, a touch (of every key, for ``values()``); a probe evicted the
    entry just read instead of the least recently used one."""
    store = MemoStore(max_entries=3)
    store["a"], store["b"], store["c"] = 1, 2, 3
    assert store["a"] == 1  # recency now b, c, a
    assert 99 not in store.values() and 2 in store.values()
    assert ("b", 2) in store.items() and ("b", 3) not in store.items()
    assert ("zz", 1) not in store.items() and "ab" not in store.items()
    store["d"] = 4  # b, the least recently used, goes
    assert set(store) == {"a", "c", "d"}
    with pytest.raises(TypeError, match="keys must be hashable"):  # as in the store
        ([], 1) in store.items()  # noqa: B015


def test_items_survive_another_thread_evicting() -> None:
    store = MemoStore(max_entries=50)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            store[i] = i
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(2000):
            assert all(k == v for k, v in store.items())
            assert all(k == v for k, v in dict(store.items()).items())  # the copy semantics.md
            assert len(list(store.values())) <= 51
            # ValuesView's ``in`` looked each key up again: one evicted meanwhile raised
            # KeyError (a probe, 7 December); the snapshot's does not.
            assert -1 not in store.values()
    finally:
        stop.set()
        thread.join()


def test_items_survive_hits_of_a_bounded_memo_in_another_thread() -> None:
    """A memo with a bound of its own keeps its entries in an OrderedDict, which hits
    reorder without the lock; iterating the store must not look its keys up again
    (a frozen dataclass's Python __hash__ lets the hitting thread run meanwhile)."""
    import contextvars
    import sys
    from dataclasses import dataclass

    from perrequest import request_memo

    @dataclass(frozen=True)
    class Row:
        id: int

    @request_memo(max_entries=50)
    def load(row: Row) -> int:
        return row.id

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    stop = threading.Event()
    try:
        with request_scope() as store:
            for i in range(50):
                load(Row(i))

            def hitter() -> None:
                i = 0
                while not stop.is_set():
                    load(Row(i % 50))
                    i += 1

            thread = threading.Thread(target=contextvars.copy_context().run, args=(hitter,))
            thread.start()
            try:
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    assert len(list(store.items())) == 50
                    assert len(list(store.values())) == 50
                    assert len(list(store)) == 50
            finally:
                stop.set()
                thread.join()
    finally:
        sys.setswitchinterval(interval)


def test_each_store_counts_on_its_own() -> None:
    """A fresh store reads zeros, whatever earlier stores counted; a closed one keeps
    its final numbers."""
    from perrequest import request_memo

    @request_memo
    def double(x: int) -> int:
        return 2 * x

    for _ in range(3):
        with request_scope() as store:
            assert double.cache_info()[:2] == (0, 0)  # reads it, unwritten
            assert double(2) == 4
        assert double.cache_info().misses == 0  # outside: zeros
        assert store.stats.misses == 1
    closed = MemoStore()
    closed._shut(True)
    assert closed.stats.misses == 0


def test_a_close_between_the_check_and_the_lock_keeps_no_counter() -> None:
    """A function's first miss racing the scope's close: the close takes the lock first."""
    store = MemoStore()
    real = store._lock

    class ClosedWhileWaiting:
        def __enter__(self) -> None:
            store._lock = real
            store._shut(False)  # another thread closed the store meanwhile
            real.__enter__()

        def __exit__(self, *exc: object) -> None:
            real.__exit__(*exc)

    store._lock = ClosedWhileWaiting()
    with pytest.raises(ScopeClosed):
        store._counter("module.f")
    assert store.closed and not store._counters


def test_a_keys_own_key_error_is_no_miss_for_get() -> None:
    """``MemoStore.get`` was Mapping's (``self[key]``, a ``KeyError`` taken for a miss):
    a key whose ``__hash__`` raised ``KeyError`` got the default in a scope, and the error
    outside one and from every other method (a probe, 7 December 2026)."""

    class Unsaved:
        def __hash__(self) -> int:
            return hash({}["id"])  # a model whose id is not filled in yet

    with request_scope() as store:
        for read in (lambda: perrequest.get(Unsaved(), "D"), lambda: store.get(Unsaved())):
            with pytest.raises(KeyError, match="id"):
                read()
        store["k"] = 1
        assert store.get("k") == 1 and store.get("absent", "D") == "D"
