"""Guards of the store's entries (_entries) that no other test needed: each test here fails
with its guard deleted (a block-deletion mutation pass of the core, 5 December 2026)."""

from __future__ import annotations

import time
from collections import OrderedDict

from keys import Model, Odd, Seven

import perrequest
from perrequest import request_memo, request_scope


def test_evicting_a_moved_key_beside_an_unhashable_one_raises_nothing() -> None:
    """_entries._refile: evicting an entry whose key's hash changed
    rebuilds its function's dict, probing every other key by its hash now; another key
    whose hash raises now (a copy being saved, pk None) is dropped, not raised from an
    unrelated call."""

    @request_memo
    def f(model: Model) -> int:
        return model.pk or 0

    with request_scope(max_entries=3) as store:
        a, b, c = Model(1), Model(2), Model(3)
        f(a), f(b), f(c)
        b.pk = None  # unhashable now
        a.pk = 100  # moved: the eviction's pop misses it
        assert f(Model(4)) == 4  # evicts a: by identity, b dropped on the way
        assert len(store) == len(store._order) <= 3
        assert f(c) == 3


def test_a_hit_whose_entry_another_thread_just_removed_is_still_a_hit() -> None:
    """_entries._lookup: a hit reads without the lock; another thread
    may remove the entry between the dict lookup and the recency refresh."""

    with request_scope() as store:
        perrequest.set("k", 1)

        class Racing(OrderedDict):  # another thread removes "k" just before the refresh
            def move_to_end(self, key, last=True):  # type: ignore[override]
                store._order = plain
                plain.pop(key, None)
                return plain.move_to_end(key, last)

        plain = store._order
        store._order = Racing(plain)
        assert perrequest.get("k") == 1


def test_a_bounded_functions_eviction_whose_key_compare_deletes_it_stores_all_the_same() -> None:
    """_entries._fill: popitem() of a bounded function's OrderedDict looks
    the oldest key up; a colliding key's __eq__ (user code) may delete it meanwhile, and
    popitem raises KeyError. The call still returns its value and the store stays whole."""
    armed = False

    class K:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            return 7  # all collide

        def __eq__(self, other: object) -> bool:
            nonlocal armed
            if armed and self is k1 and other is k2:
                armed = False
                g.cache_delete(k2)
            return isinstance(other, K) and other.n == self.n

    @request_memo(max_entries=2)
    def g(k: K) -> int:
        return k.n

    k1, k2, k3 = K(1), K(2), K(3)
    with request_scope() as store:
        g(k1), g(k2), g(k1)  # recency k2, k1; dict slots k1, k2
        armed = True
        assert g(k3) == 3  # evicts k2: its lookup compares k1 == k2 first
        assert not armed
        entries = [e for sub in store._subs.values() for e in dict.values(sub)]  # type: ignore[union-attr]
        assert sorted(e[2] for e in entries) == sorted(store._order)
        assert len(store) <= 2


def test_deleting_a_key_whose_eq_raises_raises_that_error_as_a_dict_would() -> None:
    """_entries._take: a delete by the caller's key whose __eq__ raises
    (comparing with a stored key of the same hash) raises that error, as dict.pop does;
    not a KeyError, nor the default."""
    import pytest

    with request_scope() as store:
        store[Seven()] = 1
        with pytest.raises(RuntimeError, match="no comparing"):
            store.pop(Odd(), None)
        with pytest.raises(RuntimeError, match="no comparing"):
            perrequest.delete(Odd())


def test_evicting_a_key_whose_hash_now_finds_another_entry_keeps_that_entry() -> None:
    """_entries._refile: a key whose hash changed to another stored key's
    (a copy saved with that pk) pops that other entry when evicted; it is put back."""
    computed: list[int] = []

    @request_memo
    def f(model: Model) -> int:
        computed.append(model.pk or 0)
        return model.pk or 0

    with request_scope(max_entries=2) as store:
        a, b = Model(1), Model(2)
        f(a), f(b)
        a.pk = 2  # equal to b now
        f(Model(3))  # evicts a's entry: its pop finds b's, put back
        assert len(store) == len(store._order) == sum(len(s) for s in store._subs.values())
        assert f(b) == 2 and computed == [1, 2, 3]  # b's entry still there: a hit


def test_an_unwatched_scope_reports_its_duration_but_no_compute_time() -> None:
    """_entries._age: every store is timed from when it is made (one clock read), open or
    closed; compute_s only in watched scopes (two reads per miss)."""

    @request_memo
    def slow() -> int:
        time.sleep(0.02)
        return 1

    with request_scope() as store:
        slow()
        during = store.stats
        (fn,) = during.functions.values()
        assert during.duration_s >= 0.02 and fn.compute_s == 0.0
    closed = store.stats.duration_s
    assert closed >= during.duration_s
    time.sleep(0.01)
    assert store.stats.duration_s == closed  # stopped as it closed


def test_reading_a_bounded_functions_entry_through_the_store_refreshes_it() -> None:
    """_entries._lookup: a hit through the store (a MemoKey, a batch's
    lookups) refreshes a bounded function's own recency too, not only the store's."""
    computed: list[int] = []

    @request_memo(max_entries=2)
    def f(x: int) -> int:
        computed.append(x)
        return x

    with request_scope() as store:
        f(1), f(2)
        key1 = next(k for k in store if k.key == 1)  # type: ignore[attr-defined]
        assert store[key1] == 1  # refreshes 1: 2 is now the least recently used
        f(3)
        f(1)
        assert computed == [1, 2, 3]


def test_a_write_from_a_keys_hash_as_an_eviction_refiles_keeps_the_order_in_step() -> None:
    """_entries._take: an eviction whose key's hash moved (its pop misses) refiles the
    other keys, hashing each: user code, which may write to the store (a key whose
    ``__hash__`` calls ``perrequest.set``). That write moves ``_next_id``; without the
    rebuild of the recency order it then asks for (``_resync``), the order kept an entry
    that had gone with the dict the refile replaced: the store counted two entries and
    held one, and the next fill evicted a real entry for it (``{4: "d"}`` under a bound
    of 2, where ``3`` was the least recent entry still there)."""

    class Writing(Model):
        """A model whose hash, once, writes to the store (an audit trail kept there)."""

        write = False

        def __hash__(self) -> int:
            if self.write:
                self.write = False
                perrequest.set("audit", self.pk)
            return super().__hash__()

    with request_scope(max_entries=2) as store:
        moved, writer = Model(1), Writing(2)
        perrequest.set(moved, "a")
        perrequest.set(writer, "b")
        moved.pk = 99  # saved: its hash moved, so its eviction's pop misses it
        writer.write = True
        perrequest.set(3, "c")  # evicts moved: refiling the others hashes writer, which writes
        assert not writer.write, "the key never wrote: the test tests nothing"
        assert len(store) == len(list(store)) == len(store._order)
        perrequest.set(4, "d")
        assert dict(store.items()) == {3: "c", 4: "d"}
