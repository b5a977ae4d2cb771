"""Guards of the store (store, _entries) that no other test needed: each test here fails with
its guard deleted (a block-deletion mutation pass of the core, 5 December 2026)."""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref

import pytest
from keys import Odd, Seven
from signals import RaiseAfter, RaiseAtCall, Signalled, interrupted_by

import perrequest
from perrequest import MemoStore, request_memo, request_scope
from perrequest._active import close_scope


def test_a_closed_store_refuses_an_unhashable_key_as_an_open_one_does() -> None:
    """store._found: a closed store holds no dicts, so its lookup hashes
    nothing; the key is checked all the same on a miss, as a dict would."""
    with request_scope() as store:
        pass
    with pytest.raises(TypeError, match="must be hashable"):
        ["a"] in store  # noqa: B015
    with pytest.raises(TypeError, match="must be hashable"):
        store.get(["a"])


def test_popitem_skips_an_entry_its_own_key_removed_meanwhile() -> None:
    """store.popitem: popping the most recent entry looks its key up;
    a colliding key's __eq__ (user code) may delete that very entry meanwhile: the
    next one is popped instead."""
    armed = False

    class K:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            return 7

        def __eq__(self, other: object) -> bool:
            nonlocal armed
            if armed and self is k1 and other is k2:
                armed = False
                del store[k2]
            if not isinstance(other, K):
                return NotImplemented  # as Django's, dataclasses', attrs'
            return other.n == self.n

    k1, k2 = K(1), K(2)
    with request_scope() as store:
        store[k1] = 1
        store[k2] = 2
        armed = True
        assert store.popitem() == (k1, 1)
        assert not armed and len(store) == 0


def test_cache_clear_of_functions_made_anew_keeps_nothing_of_them() -> None:
    """store._remove_owner: a function's dict goes with its last entry,
    cache_clear() included, so that a long scope does not keep every function (and
    what its closure holds) that was defined and cleared in it."""
    with request_scope() as store:
        refs = []
        for i in range(20):

            @request_memo
            def per_message(x: int) -> int:
                return x

            per_message(i)
            per_message.cache_clear()
            refs.append(weakref.ref(per_message))
            del per_message
        gc.collect()
        assert len(store._subs) == 1  # type: ignore[arg-type]  # the helpers' dict only
        assert all(r() is None for r in refs)


def test_stats_read_while_another_thread_closes_the_store_are_stats() -> None:
    """_entries._final_stats: a store is marked closed before its final
    numbers are copied under the lock; stats read in between are a snapshot."""
    with request_scope() as store:
        perrequest.set("k", 1)
        with store._lock:  # the closing thread waits here, the store marked closed
            closing = threading.Thread(target=close_scope, args=(store,))
            closing.start()
            for _ in range(500):
                if store.closed:
                    break
                time.sleep(0.002)
            assert store.closed
            stats = store.stats
        closing.join(5)
        assert stats is not None and stats.entries == 1


def test_a_delete_whose_key_cannot_be_compared_with_a_key_in_flight_raises() -> None:
    """store._invalidate: a delete by a key whose __eq__ raises against a
    computation in flight (get_or_set of a colliding key) raises that error, as a dict's
    lookup would; only the whole-function invalidations (cache_clear) swallow it."""

    with request_scope() as store:

        def factory() -> int:
            with pytest.raises(RuntimeError, match="no comparing"):
                store.pop(Odd(), None)
            return 1

        assert store.get_or_set(Seven(), factory) == 1


def test_a_helper_deleted_while_computed_unshared_stores_nothing() -> None:
    """MemoStore._invalidate: a get_or_set computed without registering (recursion on its
    key, a cycle of waiters) stores nothing after a delete of its key (``_flight._keep``);
    a helper's delete did not count, so the stale value was stored after it."""
    with request_scope() as store:

        def inner() -> str:
            store["k"] = "written"  # a write while this computes, then its delete
            del store["k"]
            return "stale"

        assert store.get_or_set("k", lambda: store.get_or_set("k", inner)) == "stale"
        assert "k" not in store  # before: "stale", stored after the delete


@pytest.mark.parametrize("write", ["set", "memo"])
def test_another_thread_never_sees_a_full_store_over_its_bound(write: str) -> None:
    """MemoStore.__len__: a fill into a full store puts the new entry in, then evicts the
    oldest, under the store's lock, which a read does not take (a value's __del__, run by
    the eviction, may read). Another thread saw max_entries + 1 (in 6 to 10% of its
    reads, an audit found); the length is the bound at most."""

    @request_memo
    def f(n: int) -> int:
        return n

    seen: set[int] = set()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between the fill's two steps
    try:
        with request_scope(max_entries=50) as store:
            stop = time.monotonic() + 0.5

            def fill() -> None:
                n = 0
                while time.monotonic() < stop:
                    n += 1
                    perrequest.set(n, n) if write == "set" else f(n)

            writer = threading.Thread(target=perrequest.bind_scope(fill))
            writer.start()
            while writer.is_alive():
                seen.add(len(store))
            writer.join()
    finally:
        sys.setswitchinterval(switch)
    assert max(seen) == 50, seen


def _set_interrupted(store: MemoStore, function: str, method: str) -> None:
    """Fill ``store`` (3 entries at most) with keys 0 to 2, then set key 3 (evicting 0) with
    ``Signalled`` raised once by a real SIGUSR1 handler, right after ``function`` called the
    C method ``method``: where a signal handler runs, once that call has returned."""
    for i in range(3):
        perrequest.set(i, i)
    at = RaiseAfter(Signalled, method, function)
    at.armed = True
    sys.setprofile(at)
    with interrupted_by(Signalled, at):
        perrequest.set(3, 3)


def test_a_signal_right_after_an_eviction_pops_its_entry_reaches_the_caller() -> None:
    """_entries._take: an eviction's pop is in a ``try`` for keys whose hash raises now; an
    exception a signal handler raised as that pop returned (Celery's soft time limit) was
    caught there and dropped: the task never saw its limit (an audit, on Celery prefork
    workers). It is told by type: the exception goes on."""
    with request_scope(max_entries=3) as store:
        _set_interrupted(store, "_take", "pop")
        assert sorted(store) == [1, 2, 3]
        perrequest.set(4, 4)
        assert sorted(store) == [2, 3, 4]


class _Model:
    """A key with a ``__hash__`` and ``__eq__`` of its own, in Python (a model instance)."""

    def __init__(self, pk: int) -> None:
        self.pk = pk

    def __hash__(self) -> int:
        return hash(self.pk)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Model):
            # As Django's (docs/security.md, How the bound holds: else the others go too).
            return NotImplemented
        return other.pk == self.pk


def test_a_signal_in_an_evicted_keys_own_hash_reaches_the_caller() -> None:
    """_entries._take: a signal handler's exception (Celery's soft time limit, a real
    SIGUSR1 handler here) raised inside the evicted key's own ``__hash__`` was taken for
    the key's error (a hash that raises now): the entry was taken by identity and the
    signal dropped, so the task never saw its limit. It is told by type now: the
    entry is still taken, and the signal goes on."""
    at = RaiseAtCall(Signalled, "__hash__", "_take")
    with request_scope(max_entries=3) as store:
        for pk in range(3):
            perrequest.set(_Model(pk), pk)
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            perrequest.set(3, 3)  # evicts _Model(0)
        assert sorted(store.values()) == [1, 2, 3]
        perrequest.set(4, 4)
        assert sorted(store.values()) == [2, 3, 4]
        assert perrequest.get(_Model(2)) == 2


def test_a_signal_between_an_evictions_two_pops_leaves_the_store_usable() -> None:
    """_entries._fill: an interrupt between an eviction's pop of the recency order and its
    pop of the entry left the entry without its place in the order; setting its key again
    raised a bare KeyError (``del order[...]``) from then on (an audit)."""
    with request_scope(max_entries=3) as store:
        _set_interrupted(store, "_drop", "popitem")  # between the eviction of 0's two pops
        perrequest.set(0, "again")  # 0 kept its entry, not its place in the order
        assert store[0] == "again" and len(store) == 3


def test_an_eviction_of_a_rewritten_key_whose_hash_raises_now_is_not_an_interrupt() -> None:
    """_entries._take: an eviction's pop that raises while the entry is still there is the
    key's own error (its hash raises now: taken out by identity), whichever equal key object
    last wrote the entry (a dict keeps the first). Told by the key object, a key written
    again through an equal object looked gone, and its hash's error went out of the write
    that evicted it."""

    class Model:
        def __init__(self, pk: int) -> None:
            self.pk: int | None = pk

        def __hash__(self) -> int:
            if self.pk is None:
                raise TypeError("Model instances without primary key value are unhashable")
            return hash(self.pk)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Model) and other.pk == self.pk

    first, again = Model(1), Model(1)
    with request_scope(max_entries=2) as store:
        perrequest.set(first, "a")
        perrequest.set(again, "b")  # the entry keeps the key object first
        first.pk = again.pk = None  # deleted: both unhashable now
        perrequest.set(2, 2)
        perrequest.set(3, 3)  # evicts the model's entry
        assert sorted(store.values()) == [2, 3]
