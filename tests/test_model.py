"""A model-based check of the memo store against DESIGN.md's Semantics.

A hypothesis ``RuleBasedStateMachine`` drives the real library (memoized functions of
every kind, the helpers on the raw store, functions defined anew, sub-scopes, closing)
and, after every step, compares what it observes with a small reference model written
from DESIGN.md and docs/semantics.md: plain dicts, no cleverness.

What the model says, rule by rule (DESIGN.md, docs/semantics.md "Bounds", "Keys", "Stats"):

- one store per scope, bounded by ``max_entries`` with least-recently-used eviction over
  memo and helper entries together; a read (memo hit, ``get``, ``get_or_set`` hit)
  makes an entry the most recent; ``in`` and ``items()`` do not;
- ``@request_memo(max_entries=n)`` bounds that function's entries, least recently used;
- hits and misses count memo calls and ``get_or_set``; a call that raises is a miss
  and caches nothing; a returned exception is a value like any other;
- counters are kept by ``module.qualname``; at most ``max_entries`` names are counted
  apart, the rest under ``"(other functions)"`` (whose ``cache_info()`` then reports no
  hits or misses); entries are per function object;
- ``cache_clear``, ``cache_delete``, ``delete`` and ``store.clear()`` drop entries and
  leave the counters alone;
- a nested ``request_scope()`` is a fresh store; exiting one gives back what was active
  before it, even with scopes entered in it still open (they stay open, not active);
- a closed store is empty, keeps the stats it closed with, refuses every write with
  ``ScopeClosed``, and holds no functions, keys or values (they are freed at once);
  outside any scope memos follow ``outside_scope``, ``get`` returns its default and
  ``set``/``get_or_set``/``delete`` raise ``NoActiveScope``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import perrequest
from perrequest import (
    CacheInfo,
    MemoStore,
    NoActiveScope,
    ScopeClosed,
    UnhashableArguments,
    request_memo,
    request_scope,
)

OTHER = "(other functions)"
HELPERS = ("helpers",)  # the model's owner of helper entries


# ---------------------------------------------------------------------------------------
# What the memoized functions return: a fresh object per computation, with a serial the
# model remembers, weakly referenced so that "closing frees at once" can be checked.


class Box:
    __slots__ = ("__weakref__", "serial")

    def __init__(self, serial: int) -> None:
        self.serial = serial


class ErrBox(Exception):
    """An exception returned, not raised: a value like any other (cached)."""

    def __init__(self, serial: int) -> None:
        super().__init__(serial)
        self.serial = serial


class Key:
    """A helper key: equal and hashed by its number, a new object per call."""

    __slots__ = ("__weakref__", "n")

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return type(other) is Key and other.n == self.n

    def __repr__(self) -> str:
        return f"Key({self.n})"


class World:
    """What the functions did: how many ran, the next serial, what makes them fail."""

    def __init__(self) -> None:
        self.ran = 0
        self.serial = 0
        self.failing: set[Any] = set()
        self.fail_all = False
        self.inside: Callable[[], None] = lambda: None

    def produce(self, err: bool = False) -> Box | ErrBox:
        self.ran += 1
        self.serial += 1
        value: Box | ErrBox = ErrBox(self.serial) if err else Box(self.serial)
        return value


WORLD = World()


class Failed(Exception):
    pass


def _run(arg: Any) -> Box | ErrBox:
    if WORLD.fail_all or arg in WORLD.failing:
        WORLD.ran += 1
        raise Failed(arg)
    return WORLD.produce(err=isinstance(arg, int) and not isinstance(arg, bool) and arg % 2 == 0)


@request_memo(outside_scope="call")
def one(x: Any) -> Any:
    return _run(x)


@request_memo(outside_scope="call")
def two(a: Any, b: Any = 0) -> Any:
    return _run((a, b))


@request_memo(outside_scope="call")
async def fetch(x: Any) -> Any:
    await asyncio.sleep(0)
    return _run(x)


@request_memo(max_entries=2, outside_scope="raise")
def bounded(x: Any) -> Any:
    return _run(x)


@request_memo(key=lambda a, tag: a, outside_scope="call")
def keyed(a: Any, tag: str) -> Any:
    return _run((a, tag))


@request_memo(outside_scope="call")
def nest(x: Any) -> Any:
    """Runs the machine's action (WORLD.inside) while it computes: reentrant writes."""
    WORLD.inside()
    return _run(x)


@dataclass
class Repo:  # a plain dataclass: unhashable, and two of them compare equal
    name: str

    @request_memo(outside_scope="call")
    def row(self, x: Any) -> Any:
        return _run(x)

    @classmethod
    @request_memo(outside_scope="call")
    def kind(cls, x: Any) -> Any:  # below @classmethod
        return _run(x)

    @request_memo(outside_scope="call")
    @staticmethod
    def static(x: Any) -> Any:  # above @staticmethod
        return _run(x)


def make_helper() -> Any:
    """A helper decorated per message, as a long scope might."""

    @request_memo(outside_scope="call")
    def helper(x: Any) -> Any:
        return _run(x)

    return helper


def name_of(fn: Any) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


FIXED: dict[str, Any] = {
    "one": one,
    "two": two,
    "fetch": fetch,
    "bounded": bounded,
    "keyed": keyed,
    "row": Repo.row,
    "nest": nest,
    "kind": Repo.kind,
    "static": Repo.static,
}
FN_BOUND = {"bounded": 2}
HELPER_NAME = name_of(make_helper())


# ---------------------------------------------------------------------------------------
# The reference model: one per store.


class ModelStore:
    def __init__(self, bound: int | None) -> None:
        self.bound = bound
        # (owner, key) -> [serial, counter name or None]; dict order is recency, LRU first
        self.entries: dict[tuple[Any, Hashable], list[Any]] = {}
        self.counters: dict[str, list[int]] = {}  # name -> [hits, misses, evictions]
        self.helper_hits = self.helper_misses = 0
        self.evictions = 0
        self.peak = 0
        self.closed = False
        self.final: tuple[Any, ...] | None = None

    # -- entries
    def lookup(self, where: tuple[Any, Hashable], touch: bool = True) -> int | None:
        entry = self.entries.get(where)
        if entry is None:
            return None
        if touch:
            del self.entries[where]
            self.entries[where] = entry
        return int(entry[0])

    def fill(self, where: tuple[Any, Hashable], serial: int, counter: str | None) -> None:
        self.entries.pop(where, None)
        self.entries[where] = [serial, counter]
        owner = where[0]
        fn_bound = FN_BOUND.get(owner) if isinstance(owner, str) else None
        if fn_bound is not None:
            own = [w for w in self.entries if w[0] == owner]
            if len(own) > fn_bound:
                self.evict(own[0])
        while self.bound is not None and len(self.entries) > self.bound:
            self.evict(next(iter(self.entries)))
        self.peak = max(self.peak, len(self.entries))

    def evict(self, where: tuple[Any, Hashable]) -> None:
        _, counter = self.entries.pop(where)
        self.evictions += 1
        if counter is not None:
            self.counters[counter][2] += 1

    def remove(self, where: tuple[Any, Hashable]) -> bool:
        return self.entries.pop(where, None) is not None

    def counter_for(self, name: str) -> str:
        if name not in self.counters:
            if self.bound is not None and len(self.counters) >= self.bound:
                name = OTHER
            self.counters.setdefault(name, [0, 0, 0])
        return name

    # -- what the library reports
    def info(self, owner: Any, name: str, maxsize: int | None) -> CacheInfo:
        hits, misses, _ = self.counters.get(name, (0, 0, 0))
        currsize = sum(1 for w in self.entries if w[0] == owner)
        return CacheInfo(hits, misses, maxsize, currsize)

    def stats(self) -> tuple[Any, ...]:
        if self.final is not None:
            return self.final
        hits = self.helper_hits + sum(c[0] for c in self.counters.values())
        misses = self.helper_misses + sum(c[1] for c in self.counters.values())
        functions = {name: tuple(c) for name, c in self.counters.items()}
        return (hits, misses, len(self.entries), self.peak, self.evictions, functions)

    def close(self) -> None:
        self.final = self.stats()
        self.closed = True
        self.entries.clear()


def real_stats(store: MemoStore) -> tuple[Any, ...]:
    s = store.stats
    assert s.duration_s >= 0.0
    functions = {}
    for name, f in s.functions.items():
        assert f.compute_s >= 0.0
        functions[name] = (f.hits, f.misses, f.evictions)
    return (s.hits, s.misses, s.entries, s.peak_entries, s.evictions, functions)


def serial_of(value: Any) -> int:
    assert type(value) in (Box, ErrBox), value
    return int(value.serial)


args = st.one_of(st.integers(0, 4), st.sampled_from([True, False, 1.0, 2.0]))
bounds = st.one_of(st.integers(1, 6), st.none())


class Scope:
    """One opened ``request_scope()``: the object, its store, its model, and what it
    stored (weakly), which must be gone the moment it closes."""

    def __init__(self, bound: int | None) -> None:
        self.obj = request_scope(max_entries=bound)
        self.store = self.obj.__enter__()
        self.model = ModelStore(bound)
        self.refs: list[weakref.ref[Any]] = []


class MemoStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[Scope] = []  # entered, in order, open: the last one is active
        self.aside: list[Scope] = []  # open, entered in one exited since: not active
        self.closed: list[Scope] = []
        self.repos = [Repo("r"), Repo("r")]
        self.new_repos = 0
        self.helper: Any = None
        self.helper_id = 0
        self.old_helpers: dict[int, weakref.ref[Any]] = {}  # id -> the undecorated function

    # -- the scopes
    @initialize(bound=st.integers(1, 6))
    def open_request(self, bound: int) -> None:
        WORLD.failing.clear()
        WORLD.fail_all = False
        self.stack.append(Scope(bound))

    @property
    def active(self) -> Scope | None:
        return self.stack[-1] if self.stack else None

    @precondition(lambda self: len(self.stack) < 3 and len(self.aside) < 3)
    @rule(bound=bounds)
    def open_scope(self, bound: int | None) -> None:
        """A nested (or, once all are closed, a new) request_scope()."""
        self.stack.append(Scope(bound))
        assert len(self.active.store) == 0  # type: ignore[union-attr]

    @precondition(lambda self: bool(self.stack or self.aside))
    @rule(data=st.data())
    def close_scope(self, data: st.DataObject) -> None:
        """Exit one of the open scopes, possibly out of order."""
        self._close(data.draw(st.sampled_from(self.stack + self.aside)))

    def _close(self, scope: Scope) -> None:
        scope.obj.__exit__(None, None, None)
        scope.model.close()
        self.closed.append(scope)
        if scope in self.aside:  # its exit changes nothing active
            self.aside.remove(scope)
        else:  # what was active before it is again; those entered in it stay open, aside
            at = self.stack.index(scope)
            self.aside += self.stack[at + 1 :]
            del self.stack[at:]
        # Closing frees at once, without waiting for the garbage collector.
        alive = [r() for r in scope.refs if r() is not None]
        assert not alive, f"the closed store still holds {alive}"

    # -- memo calls
    def _memo(
        self, fid: str, owner: Any, key: Hashable, call: Callable[[], Any], fail: bool = False
    ) -> None:
        WORLD.fail_all = fail  # the function raises, if it runs: nothing is cached
        try:
            self._memo_call(fid, owner, key, call)
        finally:
            WORLD.fail_all = False

    def _memo_call(self, fid: str, owner: Any, key: Hashable, call: Callable[[], Any]) -> None:
        scope = self.active
        fn = FIXED.get(fid, self.helper)
        before = WORLD.ran
        if scope is None:  # outside any scope: its outside_scope rule
            if fid == "bounded":
                try:
                    call()
                except NoActiveScope:
                    assert WORLD.ran == before
                    return
                raise AssertionError("outside_scope='raise' did not raise")
            with contextlib.suppress(Failed):
                call()
            assert WORLD.ran == before + 1  # called, uncached
            return
        model = scope.model
        cached = model.lookup((owner, key))
        if cached is not None:
            got = call()
            assert WORLD.ran == before, "a hit ran the function"
            assert serial_of(got) == cached
            model.counters[model.entries[(owner, key)][1]][0] += 1
            return
        counter = model.counter_for(name_of(fn))
        model.counters[counter][1] += 1
        try:
            got = call()
        except Failed:
            assert WORLD.ran == before + 1
            return
        assert WORLD.ran == before + 1, "a miss did not run the function once"
        model.fill((owner, key), serial_of(got), counter)
        scope.refs.append(weakref.ref(got))

    @rule(x=args, fail=st.booleans())
    def call_one(self, x: Any, fail: bool) -> None:
        if fail:
            WORLD.failing.add(x)
        try:
            self._memo("one", "one", x, lambda: one(x))
        finally:
            WORLD.failing.discard(x)

    @rule(n=st.integers(0, 2), fail=st.booleans())
    def call_one_with_a_key_object(self, n: int, fail: bool) -> None:
        """The memo keeps the first key object it stored: gone with the scope too."""
        key = Key(n)
        if self.active is not None:
            self.active.refs.append(weakref.ref(key))
        self._memo("one", "one", ("key", n), lambda: one(key), fail)

    @rule(a=args, b=st.integers(0, 1), form=st.integers(0, 4), fail=st.booleans())
    def call_two(self, a: Any, b: int, form: int, fail: bool) -> None:
        calls: list[Callable[[], Any]] = [
            lambda: two(a, b),
            lambda: two(a, b=b),
            lambda: two(a=a, b=b),
            lambda: two(a) if b == 0 else two(a, b),  # the default is part of the key
            lambda: two(a=a) if b == 0 else two(b=b, a=a),
        ]
        self._memo("two", "two", (a, b), calls[form], fail)

    @rule(x=args, fail=st.booleans())
    def call_fetch(self, x: Any, fail: bool) -> None:
        self._memo("fetch", "fetch", x, lambda: asyncio.run(fetch(x)), fail)

    @rule(x=args, fail=st.booleans())
    def call_bounded(self, x: Any, fail: bool) -> None:
        self._memo("bounded", "bounded", x, lambda: bounded(x), fail)

    @rule(a=args, tag=st.sampled_from(["p", "q"]), fail=st.booleans())
    def call_keyed(self, a: Any, tag: str, fail: bool) -> None:
        self._memo("keyed", "keyed", a, lambda: keyed(a, tag), fail)  # key= decides alone

    @rule(which=st.integers(0, 1), x=args, fail=st.booleans())
    def call_row(self, which: int, x: Any, fail: bool) -> None:
        repo = self.repos[which]  # equal instances never share entries
        self._memo("row", "row", (which, x), lambda: repo.row(x), fail)

    @rule(x=args, through_instance=st.booleans(), fail=st.booleans())
    def call_class_and_static_methods(self, x: Any, through_instance: bool, fail: bool) -> None:
        owner = self.repos[0] if through_instance else Repo
        self._memo("kind", "kind", x, lambda: owner.kind(x), fail)  # type: ignore[call-arg]
        self._memo("static", "static", x, lambda: owner.static(x), fail)

    @rule(x=args)
    def call_row_of_a_new_instance(self, x: Any) -> None:
        """An instance made per message: its entries are its own, and the memo never
        keeps it alive past its scope."""
        repo = Repo("r")  # equal to self.repos' instances, and to the earlier new ones
        self.new_repos += 1
        if self.active is not None:
            self.active.refs.append(weakref.ref(repo))
        self._memo("row", "row", (f"new {self.new_repos}", x), lambda: repo.row(x))

    @precondition(lambda self: self.active is not None)
    @rule()
    def enter_an_open_scope_again(self) -> None:
        with pytest.raises(RuntimeError, match="single-use"):
            self.active.obj.__enter__()  # type: ignore[union-attr]

    @rule()
    def define_helper(self) -> None:
        """A helper decorated anew: the previous one is dropped by this machine."""
        if self.helper is not None:
            self.old_helpers[self.helper_id] = weakref.ref(self.helper.__wrapped__)
        self.helper = make_helper()
        self.helper_id += 1

    @precondition(lambda self: self.helper is not None)
    @rule(x=args, fail=st.booleans())
    def call_helper(self, x: Any, fail: bool) -> None:
        helper = self.helper
        self._memo("helper", ("helper", self.helper_id), x, lambda: helper(x), fail)

    @rule(x=args)
    def call_unhashable(self, x: Any) -> None:
        before = WORLD.ran
        try:
            one([x])
        except UnhashableArguments as exc:
            assert "'x'" in str(exc) or " x" in str(exc)
        else:
            raise AssertionError("an unhashable argument was accepted")
        assert WORLD.ran == before  # counted as neither hit nor miss: the model is unchanged

    # -- cache_clear / cache_delete
    def _owner_fn(self, fid: str) -> tuple[Any, Any]:
        if fid == "helper":
            return ("helper", self.helper_id), self.helper
        return fid, FIXED[fid]

    @rule(fid=st.sampled_from(["one", "two", "fetch", "bounded", "keyed", "row", "helper"]))
    def cache_clear(self, fid: str) -> None:
        owner, fn = self._owner_fn(fid)
        if fn is None:
            return
        fn.cache_clear()
        if self.active is not None:
            for where in [w for w in self.active.model.entries if w[0] == owner]:
                del self.active.model.entries[where]

    @rule(
        fid=st.sampled_from(["one", "two", "fetch", "bounded", "keyed", "row", "helper"]),
        x=args,
        form=st.integers(0, 2),
    )
    def cache_delete(self, fid: str, x: Any, form: int) -> None:
        owner, fn = self._owner_fn(fid)
        if fn is None:
            return
        if fid == "two":  # bound as a call is: the default is part of the key
            if form == 0:
                got, key = fn.cache_delete(x, b=1), (x, 1)
            elif form == 1:
                got, key = fn.cache_delete(x), (x, 0)
            else:
                got, key = fn.cache_delete(b=0, a=x), (x, 0)
        elif fid == "keyed":
            got, key = fn.cache_delete(x, "other tag"), x
        elif fid == "row":
            got, key = Repo.row.cache_delete(self.repos[1], x), (1, x)
        else:
            got, key = fn.cache_delete(x), x
        want = self.active is not None and self.active.model.remove((owner, key))
        assert got == want

    # -- the helpers on the raw store
    def _helper_key(self, n: int) -> Key:
        key = Key(n)
        if self.active is not None:
            self.active.refs.append(weakref.ref(key))
        return key

    @rule(n=st.integers(0, 4))
    def helper_set(self, n: int) -> None:
        value = WORLD.produce()
        key = self._helper_key(n)
        if self.active is None:
            try:
                perrequest.set(key, value)
            except NoActiveScope:
                return
            raise AssertionError("set outside a scope did not raise NoActiveScope")
        perrequest.set(key, value)
        self.active.model.fill((HELPERS, n), value.serial, None)
        self.active.refs.append(weakref.ref(value))

    @rule(n=st.integers(0, 4))
    def helper_get(self, n: int) -> None:
        got = perrequest.get(Key(n), "absent")
        want = None if self.active is None else self.active.model.lookup((HELPERS, n))
        assert (got == "absent") if want is None else (serial_of(got) == want)

    @rule(n=st.integers(0, 4))
    def helper_contains(self, n: int) -> None:
        """``in`` is no read: the recency stays as it was."""
        if self.active is not None:
            got = Key(n) in self.active.store
            assert got == (self.active.model.lookup((HELPERS, n), touch=False) is not None)

    @rule(n=st.integers(0, 4), fail=st.booleans())
    def helper_get_or_set(self, n: int, fail: bool) -> None:
        before = WORLD.ran
        key = self._helper_key(n)

        def factory() -> Any:
            if fail:
                WORLD.ran += 1
                raise Failed(n)
            return WORLD.produce()

        if self.active is None:
            try:
                perrequest.get_or_set(key, factory)
            except NoActiveScope:
                assert WORLD.ran == before
                return
            raise AssertionError("get_or_set outside a scope did not raise NoActiveScope")
        model = self.active.model
        cached = model.lookup((HELPERS, n))
        if cached is not None:
            assert serial_of(perrequest.get_or_set(key, factory)) == cached
            assert WORLD.ran == before
            model.helper_hits += 1
            return
        model.helper_misses += 1
        try:
            got = perrequest.get_or_set(key, factory)
        except Failed:
            assert WORLD.ran == before + 1
            return
        assert WORLD.ran == before + 1
        model.fill((HELPERS, n), serial_of(got), None)
        self.active.refs.append(weakref.ref(got))

    @rule(n=st.integers(0, 4), through_store=st.booleans())
    def helper_delete(self, n: int, through_store: bool) -> None:
        if self.active is None:
            try:
                perrequest.delete(Key(n))
            except NoActiveScope:
                return
            raise AssertionError("delete outside a scope did not raise NoActiveScope")
        want = self.active.model.remove((HELPERS, n))
        if through_store:
            assert (self.active.store.pop(Key(n), "absent") != "absent") == want
        else:
            assert perrequest.delete(Key(n)) == want

    @precondition(lambda self: self.active is not None)
    @rule()
    def store_clear(self) -> None:
        self.active.store.clear()  # type: ignore[union-attr]
        self.active.model.entries.clear()  # type: ignore[union-attr]

    # -- reentrant: what a computation does to its own store while it runs
    @rule(
        x=args,
        y=args,
        action=st.sampled_from(
            [
                "call one",
                "delete own",
                "delete own, call self",
                "clear own",
                "clear store",
                "set helper",
                "close",
            ]
        ),
        fail=st.booleans(),
    )
    def call_nest(self, x: Any, y: Any, action: str, fail: bool) -> None:
        """``nest(x)`` does ``action`` while it computes, then returns or (``fail``) raises."""
        scope = self.active
        invalidated = False
        ran_inside = False

        def inside() -> None:
            nonlocal invalidated, ran_inside
            WORLD.inside = lambda: None  # once: not in a nested call of nest
            ran_inside = True
            active = self.active
            if action == "call one":
                self._memo("one", "one", y, lambda: one(y))
            elif action == "delete own":  # in flight, so not there: no value stored later
                assert nest.cache_delete(x) is False
                invalidated = True
            elif action == "delete own, call self":  # the nested call computes afresh
                assert nest.cache_delete(x) is False
                invalidated = True
                self._memo("nest", "nest", x, lambda: nest(x))
            elif action == "clear own":
                nest.cache_clear()
                if active is not None:
                    for where in [w for w in active.model.entries if w[0] == "nest"]:
                        del active.model.entries[where]
                invalidated = True
            elif action == "clear store":
                if active is not None:
                    active.store.clear()
                    active.model.entries.clear()
                invalidated = True
            elif action == "set helper":
                self.helper_set(4)
            elif action == "close" and active is not None:
                self._close(active)  # the call returns its value and caches nothing
                invalidated = True
            WORLD.fail_all = fail

        WORLD.inside = inside
        before = WORLD.ran
        try:
            if scope is None:
                with contextlib.suppress(Failed):
                    serial_of(nest(x))
                assert ran_inside
                return
            model = scope.model
            cached = model.lookup(("nest", x))
            if cached is not None:
                assert serial_of(nest(x)) == cached
                assert not ran_inside
                model.counters[model.entries[("nest", x)][1]][0] += 1
                return
            counter = model.counter_for(name_of(nest))
            model.counters[counter][1] += 1
            try:
                got = nest(x)
            except Failed:
                assert fail and ran_inside
                return
            assert ran_inside and WORLD.ran > before and not fail
            if not invalidated:
                model.fill(("nest", x), serial_of(got), counter)
                scope.refs.append(weakref.ref(got))
        finally:
            WORLD.inside = lambda: None
            WORLD.fail_all = False

    @precondition(lambda self: self.active is not None)
    @rule(n=st.integers(0, 3), action=st.sampled_from(["set", "delete", "set other", "close"]))
    def get_or_set_reentrant(self, n: int, action: str) -> None:
        """A factory that writes its own key: the write wins over the older value."""
        scope = self.active
        assert scope is not None
        model = scope.model
        cached = model.lookup((HELPERS, n))
        stored: Any = None

        def factory() -> Any:
            nonlocal stored
            if action == "set":
                self.helper_set(n)
                stored = True
            elif action == "delete":
                assert perrequest.delete(Key(n)) is False
                stored = True  # invalidated
            elif action == "set other":
                self.helper_set(n + 1)
            else:
                self._close(scope)
                stored = True
            return WORLD.produce()

        if cached is None:
            model.helper_misses += 1  # counted before the factory runs (it may close)
        key = Key(n)  # held by this call while its factory runs: tracked once stored
        got = perrequest.get_or_set(key, factory)
        if cached is not None:
            assert serial_of(got) == cached and stored is None
            model.helper_hits += 1
            return
        if stored is None:
            model.fill((HELPERS, n), serial_of(got), None)
            scope.refs += [weakref.ref(got), weakref.ref(key)]

    # -- the raw store's own mapping methods
    def _memo_entry(self, data: st.DataObject) -> tuple[Any, int] | None:
        """A memo entry's private key, as iteration shows it, and its value's serial."""
        scope = self.active
        assert scope is not None
        pairs = [(k, serial_of(v)) for k, v in scope.store.items() if type(k) is not Key]
        if not pairs:
            return None
        # An index, not the pair: hypothesis keeps what it draws, for its reports.
        return pairs[data.draw(st.integers(0, len(pairs) - 1))]

    def _where(self, serial: int) -> tuple[Any, Hashable]:
        assert self.active is not None
        model = self.active.model
        (where,) = [w for w, e in model.entries.items() if e[0] == serial]
        return where

    @precondition(lambda self: self.active is not None)
    @rule(data=st.data(), delete=st.booleans())
    def store_memo_key(self, data: st.DataObject, delete: bool) -> None:
        """``store[memo_key]`` reads it (most recent); ``del`` drops it."""
        picked = self._memo_entry(data)
        if picked is None:
            return
        key, serial = picked
        store, model = self.active.store, self.active.model  # type: ignore[union-attr]
        where = self._where(serial)
        if delete:
            del store[key]
            model.remove(where)
        else:
            assert serial_of(store[key]) == serial
            model.lookup(where)

    @precondition(lambda self: self.active is not None)
    @rule()
    def store_popitem(self) -> None:
        store, model = self.active.store, self.active.model  # type: ignore[union-attr]
        if not model.entries:
            with pytest.raises(KeyError):
                store.popitem()
            return
        key, value = store.popitem()
        where = self._where(serial_of(value))
        if type(key) is Key:
            assert where == (HELPERS, key.n)
        model.remove(where)

    @precondition(lambda self: self.active is not None)
    @rule(n=st.integers(0, 4), how=st.sampled_from(["setdefault", "update", "[]=", "[]"]))
    def store_mapping(self, n: int, how: str) -> None:
        scope = self.active
        assert scope is not None
        store, model = scope.store, scope.model
        if how == "[]":
            cached = model.lookup((HELPERS, n))
            if cached is None:
                with pytest.raises(KeyError):
                    store[Key(n)]
            else:
                assert serial_of(store[Key(n)]) == cached
            return
        value = WORLD.produce()
        key = self._helper_key(n)
        if how == "setdefault":
            cached = model.lookup((HELPERS, n))
            got = store.setdefault(key, value)
            if cached is not None:
                assert serial_of(got) == cached
                return
            assert got is value
        elif how == "update":
            store.update({key: value})
        else:
            store[key] = value
        model.fill((HELPERS, n), value.serial, None)
        scope.refs.append(weakref.ref(value))

    # -- misuse: a clear error, and nothing counted
    @rule(
        what=st.sampled_from(
            [
                "unhashable get",
                "unhashable set",
                "factory not callable",
                "write a memo key",
                "unhashable key=",
                "bad max_entries",
            ]
        )
    )
    def misuse(self, what: str) -> None:
        scope = self.active
        try:
            if what == "unhashable get":
                perrequest.get(["k"])
            elif what == "unhashable set":
                if scope is None:
                    return
                perrequest.set(["k"], 1)
            elif what == "unhashable key=":  # key= returned a list: named, not cached
                before = WORLD.ran
                try:
                    request_memo(key=lambda x: [x], outside_scope="call")(_run)(1)
                except UnhashableArguments:
                    assert WORLD.ran == before
                    return
                raise AssertionError("an unhashable key= result was accepted")
            elif what == "bad max_entries":
                for bad, error in (("3", TypeError), (True, TypeError), (0, ValueError)):
                    with pytest.raises(error):
                        request_scope(max_entries=bad)  # type: ignore[arg-type]
                    with pytest.raises(error):
                        request_memo(max_entries=bad)  # type: ignore[arg-type]
                return
            elif what == "factory not callable":
                if scope is None:
                    return
                perrequest.get_or_set(Key(0), 42)  # type: ignore[arg-type]
            else:
                memo_keys = [k for k in (scope.store if scope else ()) if type(k) is not Key]
                if not memo_keys:
                    return
                scope.store[memo_keys[0]] = 1  # type: ignore[union-attr]
        except TypeError as exc:
            assert str(exc)  # says what was wrong
        else:
            raise AssertionError(f"{what}: no TypeError")

    # -- the closed stores
    @precondition(lambda self: bool(self.closed))
    @rule(data=st.data())
    def use_closed_store(self, data: st.DataObject) -> None:
        scope = data.draw(st.sampled_from(self.closed))
        store = scope.store
        ran = WORLD.ran

        def factory() -> Any:
            WORLD.ran += 1
            return 1

        writes: list[Callable[[], Any]] = [
            lambda: store.__setitem__(Key(0), 1),
            lambda: store.__delitem__(Key(0)),
            lambda: store.pop(Key(0), None),
            lambda: store.popitem(),
            lambda: store.clear(),
            lambda: store.setdefault(Key(0), 1),
            lambda: store.update({Key(0): 1}),
            lambda: store.get_or_set(Key(0), factory),
        ]
        write = data.draw(st.sampled_from(writes))
        with pytest.raises(ScopeClosed):
            write()
        assert WORLD.ran == ran  # get_or_set's factory is never called
        assert store.get(Key(0), "absent") == "absent"
        assert Key(0) not in store
        assert list(store) == []
        with pytest.raises(RuntimeError, match="single-use"):
            scope.obj.__enter__()

    # -- checked after every step
    @invariant()
    def matches_the_model(self) -> None:
        scope = self.active
        if scope is None:
            assert not perrequest.in_request_scope()
            with pytest.raises(NoActiveScope):
                perrequest.current_store()
        else:
            assert perrequest.in_request_scope()
            assert perrequest.current_store() is scope.store
            assert not scope.store.closed
        for fid, fn in (*FIXED.items(), ("helper", self.helper)):
            if fn is None:
                continue
            owner = ("helper", self.helper_id) if fid == "helper" else fid
            maxsize = FN_BOUND.get(fid)
            if scope is None:
                want = CacheInfo(0, 0, maxsize, 0)
            else:
                want = scope.model.info(owner, name_of(fn), maxsize)
            info = fn.cache_info()
            assert info == want, fid
            assert info._fields == functools._CacheInfo._fields  # type: ignore[attr-defined]
        for s in self.stack + self.aside + self.closed:
            assert real_stats(s.store) == s.model.stats(), "stats"
            assert len(s.store) == len(s.model.entries)
            assert s.store.closed == s.model.closed
            # items() is a snapshot and no read: the values are the model's
            helpers: dict[int, int] = {}
            memos: list[int] = []
            for key, value in s.store.items():
                if type(key) is Key:
                    helpers[key.n] = serial_of(value)
                else:
                    memos.append(serial_of(value))
            model_helpers = {k: e[0] for (o, k), e in s.model.entries.items() if o == HELPERS}
            model_memos = [e[0] for (o, _), e in s.model.entries.items() if o != HELPERS]
            assert helpers == model_helpers
            assert sorted(memos) == sorted(model_memos)

    @invariant()
    def bookkeeping_within_the_bound(self) -> None:
        """A dropped helper is kept only while one of its entries is."""
        held = {
            owner[1]
            for s in self.stack + self.aside
            for (owner, _) in s.model.entries
            if type(owner) is tuple and owner[0] == "helper"
        }
        for hid, ref in self.old_helpers.items():
            assert (ref() is not None) == (hid in held), (hid, held)

    def teardown(self) -> None:
        for scope in reversed(self.stack + self.aside):
            scope.obj.__exit__(None, None, None)
        WORLD.failing.clear()


# About 8 s on one core. A long search: PERREQUEST_MODEL_EXAMPLES=20000 (and maybe
# PERREQUEST_MODEL_STEPS=150), with pytest's --timeout=0.
# ---------------------------------------------------------------------------------------
# What the machine found, as plain regression tests.


async def test_closing_frees_the_entries_of_a_function_still_computing() -> None:
    """A task that outlives its request, computing ``f(2)``, must not keep ``f(1)``'s
    value (nor its key) alive: closing frees the store's memory at once. The call in
    flight had looked up ``f``'s dict of entries on its miss and held it in its frame."""
    gate = asyncio.Event()

    @request_memo
    async def f(x: Key) -> Box:
        if x.n == 2:
            await gate.wait()
        return Box(x.n)

    async with request_scope():
        key = Key(1)
        value = await f(key)
        refs = [weakref.ref(value), weakref.ref(key)]
        del key, value
        task = asyncio.create_task(f(Key(2)))
        await asyncio.sleep(0)  # the task misses, and waits at the gate
    try:
        assert [r() for r in refs] == [None, None]
    finally:
        gate.set()
        assert (await task).serial == 2


def test_closing_frees_the_entries_of_a_function_whose_call_closes_the_scope() -> None:
    """The same, in one thread: the computation ends the scope itself (the machine's
    find: ``call_nest(action="close")`` after another entry of ``nest``)."""
    scope = request_scope()
    refs: list[weakref.ref[Any]] = []

    @request_memo
    def f(x: int) -> Box:
        if x == 2:
            scope.__exit__(None, None, None)
            assert [r() for r in refs] == [None]
        return Box(x)

    scope.__enter__()
    refs.append(weakref.ref(f(1)))
    assert f(2).serial == 2
    assert refs[0]() is None


MemoStoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("PERREQUEST_MODEL_EXAMPLES", "500")),
    stateful_step_count=int(os.environ.get("PERREQUEST_MODEL_STEPS", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoStoreModel = MemoStoreMachine.TestCase
