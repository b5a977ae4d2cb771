"""The per-request store: a bounded, thread-safe mapping with least-recently-used eviction.

Entries are grouped by owner: helper entries (``store[key]``, ``get_or_set``) in
one dict, each memoized function's in a dict of its own, so a memo hit is two
lookups and no key tuple to build. One ordered dict of entry ids holds the
recency of every entry, so the bound and the LRU order are the store's. A
function's dict goes with its last entry: the bookkeeping never outgrows the
entries, and a closed store holds no functions, keys or values.

Reads take no lock. The lock and the dicts are made on the first write, so a
request that writes nothing costs one small object.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import (
    Callable,
    Hashable,
    ItemsView,
    Iterator,
    Mapping,
    MutableMapping,
    ValuesView,
)
from contextvars import Token
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeVar

from . import _flight
from ._flight import MISSING
from .errors import ScopeClosed

__all__ = ["DEFAULT_MAX_ENTRIES", "FunctionStats", "MemoStore", "ScopeStats"]

DEFAULT_MAX_ENTRIES: Final = 10_000

T = TypeVar("T")

# The owner of helper entries; memo entries are owned by their function's spec.
HELPERS: Final = "perrequest.helpers"
# Serialises the first write's set-up of one store with another thread's.
_setup = threading.RLock()
_NO_STATS: Mapping[str, FunctionStats] = MappingProxyType({})
_OTHER = "(other functions)"  # counters beyond max_entries distinct function names


class FunctionStats(NamedTuple):
    """One function's counters in one scope; ``compute_s``: seconds spent on its misses."""

    hits: int
    misses: int
    evictions: int
    compute_s: float


@dataclass(frozen=True, slots=True)
class ScopeStats:
    """An immutable snapshot of one store's counters, per function in ``functions``."""

    hits: int
    misses: int
    entries: int
    peak_entries: int
    evictions: int
    duration_s: float
    functions: Mapping[str, FunctionStats] = field(default_factory=lambda: _NO_STATS)


_EMPTY = ScopeStats(0, 0, 0, 0, 0, 0.0)


class Counter:
    """Hits, misses, evictions and compute time of one function (or the helpers).

    The clock is read around a computation only when ``timed``: when somebody
    will see the stats (``on_close``, a scope listener, DEBUG logging). A clock
    read costs a sixth of a miss.
    """

    __slots__ = ("compute_s", "evictions", "hits", "misses", "timed")

    def __init__(self, timed: bool = True) -> None:
        self.hits = self.misses = self.evictions = 0
        self.compute_s = 0.0
        self.timed = timed


# Called with the ScopeStats of every scope that closes (perrequest.add_scope_listener).
listeners: list[Callable[[ScopeStats], object]] = []
_logger = logging.getLogger("perrequest")


def observed() -> bool:
    """Whether anybody beyond a scope's own ``on_close`` reads the stats of closed scopes."""
    return bool(listeners) or _logger.isEnabledFor(logging.DEBUG)


class MemoKey(NamedTuple):
    """How a memo entry shows up when the store is iterated: never equal to a user's key."""

    owner: object
    key: Hashable


def check_max_entries(value: object, what: str = "max_entries") -> int | None:
    """Validate a bound: a positive int, or None for an explicitly unbounded store."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{what} must be a positive int or None, not {type(value).__name__} {value!r}"
        )
    if value <= 0:
        raise ValueError(f"{what} must be a positive int or None, not {value!r}")
    return value


class MemoStore(MutableMapping[Hashable, Any]):
    """The memo store of one scope: bounded, least-recently-used, thread-safe.

    Made by ``request_scope`` and the middlewares. Once closed it stays empty
    and every write raises ``ScopeClosed``. Iterating it yields the helper
    keys and, for memo entries, ``MemoKey`` objects.
    """

    # What the hit path reads is in slots, set in __init__: CPython 3.12+ does
    # not specialise reading an attribute that a class attribute shadows.
    __slots__ = (
        "__weakref__",
        "_bound",
        "_closed",
        "_closed_at",
        "_counters",
        "_evictions",
        "_final",
        "_flights",
        "_helpers",
        "_lock",
        "_max_entries",
        "_next_id",
        "_on_close",
        "_opened_at",
        "_order",
        "_peak",
        "_subs",
        "_token",
    )
    # Made on the first write (_writable):
    _bound: int
    _counters: dict[str, Counter]
    _evictions: int
    _flights: dict[Hashable, Any]
    _helpers: Counter
    _next_id: int
    _order: OrderedDict[int, tuple[object, Hashable]]
    _peak: int
    _closed_at: float  # set by _shut
    _final: ScopeStats

    def __init__(
        self,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        on_close: Callable[[ScopeStats], object] | None = None,
    ) -> None:
        if max_entries is not None and (type(max_entries) is not int or max_entries <= 0):
            check_max_entries(max_entries)
        self._max_entries = max_entries
        self._on_close = on_close
        self._subs: dict[object, dict[Hashable, tuple[Any, ...]]] | None = None
        self._lock: Any = None  # a threading.RLock once written to
        self._closed = False
        self._token: Token[MemoStore | None] | None = None  # set by the scope that opens it
        self._opened_at = time.perf_counter()

    # -- Mapping ---------------------------------------------------------------

    def __getitem__(self, key: Hashable) -> Any:
        value = self._lookup(self._split(key))
        if value is MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if type(key) is MemoKey:
            raise _memo_key_write(key)
        with self._writable(key):
            self._fill((HELPERS, key), value, self._helpers, None)

    def __delitem__(self, key: Hashable) -> None:
        owner, inner = self._split(key)
        with self._writable(key):
            sub = self._subs.get(owner) if self._subs is not None else None
            if sub is None or inner not in sub:
                raise KeyError(key)
            self._remove(owner, sub, inner)

    def __iter__(self) -> Iterator[Hashable]:
        return iter([key for key, _ in self._pairs()])  # a snapshot: safe from other threads

    def __len__(self) -> int:
        order = self._order if self._subs is not None else None
        return 0 if order is None else len(order)

    def __contains__(self, key: object) -> bool:
        return self._lookup(self._split(key), touch=False) is not MISSING

    def items(self) -> ItemsView[Hashable, Any]:
        """A view whose iteration is a snapshot, and does not refresh recency."""
        return _SnapshotItems(self)

    def values(self) -> ValuesView[Any]:
        """A view whose iteration is a snapshot, and does not refresh recency."""
        return _SnapshotValues(self)

    def _pairs(self) -> list[tuple[Hashable, Any]]:
        pairs: list[tuple[Hashable, Any]] = []
        for owner, sub in list((self._subs or {}).items()):
            for key, entry in list(sub.items()):  # list() copies in one step, under the GIL
                pairs.append((key if owner is HELPERS else MemoKey(owner, key), entry[0]))
        return pairs

    # A store is a handle on one scope's memory, like a lock: copying a structure
    # that holds one (an ASGI scope deep-copied by a proxy middleware) shares it.
    def __copy__(self) -> MemoStore:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> MemoStore:
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            "a MemoStore cannot be pickled: it belongs to one request scope in this "
            "process. Pickle dict(store) if you need its contents."
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MemoStore {state} entries={len(self)} max_entries={self._max_entries}>"

    # The mixins read before they write, so a closed store could answer pop() with
    # its default instead of refusing the write: these check first.

    def pop(self, key: Hashable, default: Any = MISSING) -> Any:
        owner, inner = self._split(key)
        with self._writable(key):
            sub = self._subs.get(owner) if self._subs is not None else None
            if sub is None or inner not in sub:
                if default is MISSING:
                    raise KeyError(key)
                return default
            return self._remove(owner, sub, inner)

    def popitem(self) -> tuple[Hashable, Any]:
        with self._writable("popitem()"):
            if not self._order:
                raise KeyError("popitem(): the store is empty")
            self._peak = max(self._peak, len(self._order))
            owner, key, value, _ = self._drop(last=True)  # the most recent, as dict does
            return (key if owner is HELPERS else MemoKey(owner, key)), value

    def clear(self) -> None:
        with self._writable("clear()"):
            for owner, sub in list(self._subs.items()):  # type: ignore[union-attr]
                for key in list(sub):
                    self._remove(owner, sub, key)

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        with self._writable(key):
            if type(key) is MemoKey:  # read it, never write it
                value = self._lookup(self._split(key))
                if value is MISSING:
                    raise _memo_key_write(key)
                return value
            value = self._lookup((HELPERS, key))
            if value is MISSING:
                self._fill((HELPERS, key), default, self._helpers, None)
                value = default
            return value

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._writable("update()")
        super().update(*args, **kwargs)

    # -- the rest of the public surface -------------------------------------------

    @property
    def max_entries(self) -> int | None:
        """The bound of this store (None only when asked for explicitly)."""
        return self._max_entries

    @property
    def closed(self) -> bool:
        """True once the scope that owns this store has ended."""
        return self._closed

    @property
    def stats(self) -> ScopeStats:
        """Hits, misses, entries, peak, evictions and age; once closed, the final stats."""
        return getattr(self, "_final", None) or self._snapshot()

    def get_or_set(self, key: Hashable, factory: Callable[[], T]) -> T:
        """The value at ``key``, calling ``factory()`` once to fill it if missing.

        Counted in ``stats``. Threads sharing this store that miss the same key
        wait for one call of ``factory`` instead of making their own.
        """
        self._writable(key)
        value = self._lookup(self._split(key))  # an unhashable key fails here
        if value is MISSING and type(key) is MemoKey:
            raise _memo_key_write(key)
        if value is not MISSING:
            self._helpers.hits += 1
            return value  # type: ignore[no-any-return]
        return _flight.run(self, (HELPERS, key), factory, (), {}, self._helpers, None)  # type: ignore[no-any-return]

    # -- what request_memo and the scope lifecycle use ----------------------------

    def _split(self, key: Hashable) -> tuple[object, Hashable]:
        return (key.owner, key.key) if type(key) is MemoKey else (HELPERS, key)

    def _writable(self, what: object) -> threading.RLock:
        """The store's lock, made with the dicts on the first write; ``ScopeClosed`` once closed.

        The lock is published before ``_closed`` is checked under it, and closing
        sets ``_closed`` before it looks for the lock: either a writer sees the
        store closed, or the closing thread finds the lock and waits for it.
        """
        lock: threading.RLock | None = self._lock
        if lock is None:
            # Made before taking _setup: an allocation under it could start a collection
            # whose finalizers write to a new store, and so take _setup again.
            timed = self._on_close is not None or observed()
            fresh: tuple[Any, ...] = (
                OrderedDict(), {}, {}, Counter(timed), {HELPERS: {}}, threading.RLock()
            )  # fmt: skip
            with _setup:
                lock = self._lock
                if lock is None:
                    self._order, self._flights, self._counters, self._helpers, subs, new = fresh
                    self._next_id = self._evictions = self._peak = 0
                    self._bound = sys.maxsize if self._max_entries is None else self._max_entries
                    self._subs = subs
                    lock = self._lock = new
        if self._closed:
            raise ScopeClosed(
                f"cannot write {what!r}: this MemoStore belongs to a request scope that has "
                "ended. Use perrequest.current_store() inside the request instead of keeping "
                "a reference to an old store."
            )
        return lock

    def _counter(self, name: str) -> Counter:
        """The counters of the function called ``name``; raises ``ScopeClosed`` once closed.

        Kept by name (``module.qualname``), not by function object, so a helper
        defined anew per message adds nothing; bounded by ``max_entries`` names.
        """
        with self._writable(name):
            counters = self._counters
            counter = counters.get(name)
            if counter is None:
                if self._max_entries is not None and len(counters) >= self._max_entries:
                    name = _OTHER
                counter = counters.get(name) or counters.setdefault(
                    name, Counter(self._helpers.timed)
                )
            return counter

    def _lookup(self, key: tuple[object, Hashable], touch: bool = True) -> Any:
        """The value at ``(owner, key)`` or ``MISSING``; a found entry becomes the most recent."""
        subs = self._subs
        sub = None if subs is None else subs.get(key[0])
        entry = None if sub is None else sub.get(key[1])
        if entry is None:
            return MISSING
        if touch:
            try:
                self._order.move_to_end(entry[2])
                if type(sub) is OrderedDict:
                    sub.move_to_end(key[1])
            except KeyError:  # removed by another thread meanwhile: nothing to refresh
                pass
        return entry[0]

    def _fill(
        self, where: tuple[object, Hashable], value: Any, counter: Counter, anchor: Any
    ) -> None:
        """Store an entry at ``(owner, key)`` and enforce the bounds; the caller holds the
        lock. Once closed, nothing is stored (a computation that outlived the scope)."""
        subs = self._subs
        if subs is None:
            return
        owner, key = where
        sub = subs.get(owner)
        if sub is None:
            sub = subs[owner] = {} if getattr(owner, "max_entries", None) is None else OrderedDict()
        order = self._order
        old = sub.get(key)
        if old is None:
            entry_id = self._next_id = self._next_id + 1
            order[entry_id] = where
        else:
            entry_id = old[2]
            order.move_to_end(entry_id)
        sub[key] = (value, counter, entry_id, anchor)
        if type(sub) is not dict:  # this function has a bound of its own
            sub.move_to_end(key)  # type: ignore[attr-defined]
            if len(sub) > owner.max_entries:  # type: ignore[attr-defined]
                # popitem, never next(iter(...)): hits reorder without the lock.
                _, entry = sub.popitem(last=False)  # type: ignore[call-arg]
                self._peak = max(self._peak, len(order) - 1)  # the size before this fill
                del order[entry[2]]
                self._evicted(entry[1])
        if len(order) > self._bound:
            self._peak = self._bound
            self._evicted(self._drop(last=False)[3])

    def _evicted(self, counter: Counter) -> None:
        counter.evictions += 1
        self._evictions += 1

    def _drop(self, last: bool) -> tuple[object, Hashable, Any, Counter]:
        """Remove the most (``last``) or least recently used entry; lock held."""
        _, (owner, key) = self._order.popitem(last=last)
        sub = self._subs[owner]  # type: ignore[index]
        value, counter, _, _ = sub.pop(key)
        if not sub and owner is not HELPERS:
            del self._subs[owner]  # type: ignore[union-attr]
        return owner, key, value, counter

    def _remove(self, owner: object, sub: dict[Hashable, tuple[Any, ...]], key: Hashable) -> Any:
        """Drop one entry, and its function's dict with its last entry; lock held."""
        self._peak = max(self._peak, len(self._order))
        value, _, entry_id, _ = sub.pop(key)
        del self._order[entry_id]
        if not sub and owner is not HELPERS:
            del self._subs[owner]  # type: ignore[union-attr]
        return value

    def _remove_owner(self, owner: object) -> None:
        """Drop every entry of one memoized function (``fn.cache_clear()``)."""
        if self._subs is None or owner not in self._subs:
            return
        with self._writable("cache_clear()"):
            sub = self._subs.get(owner)
            for key in list(sub or ()):
                self._remove(owner, sub, key)  # type: ignore[arg-type]

    def _snapshot(self) -> ScopeStats:
        now = self._closed_at if self._closed else time.perf_counter()
        if self._lock is None:
            return ScopeStats(0, 0, 0, 0, 0, now - self._opened_at)
        counters = dict(self._counters)
        helpers = self._helpers
        return ScopeStats(
            hits=helpers.hits + sum(c.hits for c in counters.values()),
            misses=helpers.misses + sum(c.misses for c in counters.values()),
            entries=len(self),
            peak_entries=max(self._peak, len(self)),
            evictions=self._evictions,
            duration_s=now - self._opened_at,
            functions=MappingProxyType(
                {
                    name: FunctionStats(c.hits, c.misses, c.evictions, c.compute_s)
                    for name, c in counters.items()
                }
            ),
        )

    def _shut(self, want_stats: bool) -> ScopeStats:
        """Close and empty the store; the final stats, computed when ``want_stats`` or
        something was written (and then kept, for ``stats``).

        In-flight computations are left alone: each one releases its own
        waiters when it ends, and a closed store stores nothing.
        """
        self._closed_at = time.perf_counter()
        self._closed = True
        lock = self._lock
        if lock is None:  # nothing was ever written: the stats are all zeros
            return self._snapshot() if want_stats else _EMPTY
        with lock:
            # Kept, so that a computation still in flight cannot change them later.
            final = self._final = self._snapshot()
            self._subs = None
            self._order.clear()
            self._counters.clear()
            return final


class _SnapshotItems(ItemsView[Hashable, Any]):
    _mapping: MemoStore

    def __iter__(self) -> Iterator[tuple[Hashable, Any]]:
        return iter(self._mapping._pairs())


class _SnapshotValues(ValuesView[Any]):
    _mapping: MemoStore

    def __iter__(self) -> Iterator[Any]:
        return iter([value for _, value in self._mapping._pairs()])


def _memo_key_write(key: MemoKey) -> TypeError:
    return TypeError(
        f"{key!r} is a memo entry: @request_memo writes those. Delete it, or use the "
        "function's cache_clear(), instead of writing to it."
    )
