"""The per-request store: a bounded, thread-safe mapping with LRU eviction.

Helper entries (``store[key]``, ``get_or_set``) live in one dict, and each
memoized function's entries in a dict of their own, so a memo hit is one
lookup of the function and one of its arguments, with no key tuple to build
for a one-argument call. Every entry is ``(value, entry_id, owner, anchor)``;
recency lives in one ordered dict keyed by the small ``entry_id``, shared by
all of them, so the bound and the LRU order are the store's, not a
function's. Reads take no lock; every write takes the store's lock.

A store is created for every request, so creating and closing one must cost
next to nothing: the dicts, the lock and the counters are made on the first
write, and a store nothing was written to closes without a lock or stats.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import (
    Callable,
    Hashable,
    ItemsView,
    Iterator,
    MutableMapping,
    ValuesView,
)
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar

from ._flight import MISSING, SingleFlight
from .errors import ScopeClosed

__all__ = ["DEFAULT_MAX_ENTRIES", "MemoStore", "ScopeStats"]

DEFAULT_MAX_ENTRIES: Final = 10_000

T = TypeVar("T")

_MISSING: Any = object()

# Serialises the lazy creation of a store's lock with an early close.
_guard = threading.Lock()

Entry = tuple[Any, int, "_Owner | None", Any]


@dataclass(frozen=True, slots=True)
class ScopeStats:
    """An immutable snapshot of one store's counters."""

    hits: int
    misses: int
    entries: int
    peak_entries: int
    evictions: int
    duration_s: float


class _Owner:
    """One memoized function's entries and counters within one store (or the helpers')."""

    __slots__ = ("data", "hits", "max_entries", "misses", "order", "token")

    def __init__(self, token: object, max_entries: int | None) -> None:
        self.token = token
        self.data: dict[Hashable, Entry] = {}
        self.hits = 0
        self.misses = 0
        self.max_entries = max_entries
        # This owner's keys in recency order, kept only when it has its own bound.
        self.order: OrderedDict[Hashable, None] | None = (
            None if max_entries is None else OrderedDict()
        )


class MemoKey:
    """How a memo entry shows up when the store is iterated: never equal to a user's key."""

    __slots__ = ("key", "owner")

    def __init__(self, owner: object, key: Hashable) -> None:
        self.owner = owner
        self.key = key

    def __eq__(self, other: object) -> bool:
        return type(other) is MemoKey and other.owner is self.owner and bool(other.key == self.key)

    def __hash__(self) -> int:
        return hash((id(self.owner), self.key))

    def __repr__(self) -> str:
        return f"<memo entry of {self.owner!r}: {self.key!r}>"


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

    Created and closed by ``request_scope`` and the middlewares. Once closed it
    stays empty, and every write raises ``ScopeClosed``. Iterating it yields
    the helper keys and, for memo entries, private ``MemoKey`` objects.
    """

    # A store is made for every request, so making one must cost next to
    # nothing. What every request reads is in slots, set when the store is made
    # (``__init__``, or ``open_scope``, which skips it): CPython 3.12+ will not
    # specialise the read of an instance attribute that a class attribute
    # shadows, and a memo hit would cost a third more. The rest starts as the
    # class-level defaults below (never mutated), and each store gets its own
    # on first write (``_writable``).
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_closed",
        "_lock",
        "_max_entries",
        "_on_close",
        "_opened_at",
        "_order",
        "_subs",
        "_token",
    )
    _closed: bool
    _lock: threading.RLock | None  # made first on a write; says the rest is there too
    _max_entries: int | None
    _on_close: Callable[[ScopeStats], object] | None  # set by open_scope
    _opened_at: float
    _order: OrderedDict[int, tuple[dict[Hashable, Entry], Hashable]] | None
    _subs: dict[object, dict[Hashable, Entry]] | None
    _token: Any  # set by open_scope

    _closed_at: float | None = None
    _final: ScopeStats | None = None
    _data: dict[Hashable, Entry] | None = None
    _owners: dict[object, _Owner] | None = None
    _flights: SingleFlight | None = None
    _helpers: _Owner | None = None
    _next_id = 0
    _peak = 0
    _evictions = 0

    def __new__(cls, *args: Any, **kwargs: Any) -> MemoStore:
        # The slots, set here rather than in __init__ so that a subclass whose
        # __init__ does not call ours still has them.
        self = super().__new__(cls)
        self._max_entries = DEFAULT_MAX_ENTRIES
        self._opened_at = time.perf_counter()
        self._closed = False
        self._lock = self._order = self._subs = self._on_close = self._token = None
        return self

    def __init__(self, max_entries: int | None = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries is not DEFAULT_MAX_ENTRIES:
            self._max_entries = check_max_entries(max_entries)

    # -- Mapping -----------------------------------------------------------

    def __getitem__(self, key: Hashable) -> Any:
        data, key = self._where(key)
        entry = data[key]
        self._touch(key, entry)
        return entry[0]

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if type(key) is MemoKey:
            raise _memo_key_write(key)
        lock = self._writable(key)
        with lock:
            self._insert(self._data, key, value, None, None)  # type: ignore[arg-type]

    def __delitem__(self, key: Hashable) -> None:
        lock = self._writable(key)
        with lock:
            data, key = self._where(key)
            if key not in data:
                raise KeyError(key)
            self._remove(data, key)

    def __iter__(self) -> Iterator[Hashable]:
        # A snapshot, so another thread writing cannot break the iteration.
        keys: list[Hashable] = list(self._data or ())
        for owner in list((self._owners or {}).values()):
            keys += [MemoKey(owner.token, key) for key in list(owner.data)]
        return iter(keys)

    def items(self) -> ItemsView[Hashable, Any]:
        """A view whose iteration is a snapshot, and does not refresh recency."""
        return _SnapshotItems(self)

    def values(self) -> ValuesView[Any]:
        """A view whose iteration is a snapshot, and does not refresh recency."""
        return _SnapshotValues(self)

    def _pairs(self) -> list[tuple[Hashable, Any]]:
        # list(dict.items()) copies in one step: another thread cannot break it.
        pairs = [(key, entry[0]) for key, entry in list((self._data or {}).items())]
        for owner in list((self._owners or {}).values()):
            pairs += [(MemoKey(owner.token, k), e[0]) for k, e in list(owner.data.items())]
        return pairs

    def __len__(self) -> int:
        return 0 if self._order is None else len(self._order)

    def __contains__(self, key: object) -> bool:
        data, key = self._where(key)
        return key in data

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

    # The mixins would read before writing, so a closed store could answer a
    # pop() with its default instead of refusing the write: check first.

    def pop(self, key: Hashable, default: Any = _MISSING) -> Any:
        lock = self._writable(key)
        with lock:
            data, key = self._where(key)
            entry = data.get(key, _MISSING)
            if entry is _MISSING:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            self._remove(data, key)
            return entry[0]

    def popitem(self) -> tuple[Hashable, Any]:
        lock = self._writable("popitem()")
        with lock:
            assert self._order is not None
            if not self._order:
                raise KeyError("popitem(): the store is empty")
            # popitem, never next(iter(...)): a hit refreshes the order without
            # the lock, and an iterator over it would fail on that mutation.
            _, (data, key) = self._order.popitem()
            value, _, owner, _ = data.pop(key)
            if owner is not None and owner.order is not None:
                owner.order.pop(key, None)
            if data is self._data or owner is None:
                return key, value
            return MemoKey(owner.token, key), value

    def clear(self) -> None:
        lock = self._writable("clear()")
        with lock:
            self._clear()

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        lock = self._writable(key)
        if type(key) is MemoKey:
            return self._memo_key_value(key)
        with lock:
            data = self._data
            assert data is not None
            entry = data.get(key)
            if entry is not None:
                self._touch(key, entry)
                return entry[0]
            self._insert(data, key, default, None, None)
            return default

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._writable("update()")
        super().update(*args, **kwargs)

    # -- the rest of the public surface -------------------------------------

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
        """A snapshot of hits, misses, entries, peak, evictions and age; once the
        scope has closed, the stats it closed with."""
        final = self._final
        return self._snapshot() if final is None else final

    def get_or_set(self, key: Hashable, factory: Callable[[], T]) -> T:
        """Return the value at ``key``, calling ``factory()`` once to fill it if missing.

        Counted in ``stats``; concurrent callers in threads sharing this store
        wait for one computation instead of running ``factory`` twice.
        """
        lock = self._writable(key)
        if type(key) is MemoKey:
            return self._memo_key_value(key)  # type: ignore[no-any-return]
        hash(key)  # fail on an unhashable key before anything else happens
        with lock:
            data = self._data
            assert data is not None
            helpers = self._helpers
            if helpers is None:
                helpers = self._helpers = _Owner(None, None)
                helpers.data = data

        def compute() -> T:
            value = factory()
            if inspect.iscoroutine(value):
                value.close()
                raise TypeError(
                    f"get_or_set({key!r}, ...): the factory returned a coroutine, which "
                    "would be cached unawaited. Await the value first, or memoize an async "
                    "function with @request_memo."
                )
            return value

        assert self._flights is not None  # made with the lock, by _writable
        return self._flights.run(  # type: ignore[no-any-return]
            (helpers, key),
            partial(self._lookup, data, key),
            lambda value: self._insert(data, key, value, helpers, None),
            compute,
            helpers,
        )

    # -- internals used by request_memo and the scope lifecycle -------------

    def _where(self, key: Hashable) -> tuple[dict[Hashable, Entry], Hashable]:
        """The dict that holds ``key`` (a helper key or a ``MemoKey``) and its key there."""
        if type(key) is MemoKey:
            owner = (self._owners or {}).get(key.owner)
            return ({} if owner is None else owner.data), key.key
        return self._data or {}, key

    def _memo_key_value(self, key: MemoKey) -> Any:
        """``setdefault``/``get_or_set`` on a memo entry: read it, never write it."""
        data, inner = self._where(key)
        entry = data.get(inner)
        if entry is None:
            raise _memo_key_write(key)
        self._touch(inner, entry)
        return entry[0]

    def _writable(self, key: object) -> threading.RLock:
        """The store's lock, made on first use; raises ``ScopeClosed`` once closed."""
        lock = self._lock
        if lock is None:
            with _guard:
                lock = self._lock
                if lock is None and not self._closed:
                    lock = threading.RLock()
                    self._flights = SingleFlight(lock)
                    self._order = OrderedDict()
                    self._data = {}
                    self._owners = {}
                    self._lock = lock  # published last: it says the rest is there
        if self._closed or lock is None:
            raise ScopeClosed(
                f"cannot write {key!r}: this MemoStore belongs to a request scope that has "
                "ended. Use perrequest.current_store() inside the request instead of keeping "
                "a reference to an old store."
            )
        return lock

    def _owner(self, token: object, max_entries: int | None) -> _Owner:
        """One memoized function's entries in this store, made on its first miss."""
        owners = self._owners
        owner = None if owners is None else owners.get(token)
        if owner is None:
            with self._writable(token):
                owners = self._owners
                assert owners is not None
                owner = owners.get(token)
                if owner is None:
                    owner = _Owner(token, max_entries)
                    subs = self._subs
                    if subs is None:
                        subs = {}
                    subs[token] = owner.data
                    owners[token] = owner
                    self._subs = subs  # published last: a hit reads _subs without the lock
        return owner

    def _touch(self, key: Hashable, entry: Entry) -> None:
        try:
            self._order.move_to_end(entry[1])  # type: ignore[union-attr]
            owner = entry[2]
            if owner is not None and owner.order is not None:
                owner.order.move_to_end(key)
        except KeyError:  # removed meanwhile by another thread: nothing to refresh
            pass

    def _insert(
        self,
        data: dict[Hashable, Entry],
        key: Hashable,
        value: Any,
        owner: _Owner | None,
        anchor: Any,
    ) -> None:
        """Store an entry and enforce the bounds; the caller holds the lock."""
        order = self._order
        if self._closed or order is None:
            return
        old = data.get(key)
        if old is not None:
            data[key] = (value, old[1], old[2], anchor if old[2] is not None else None)
            self._touch(key, old)
            return
        entry_id = self._next_id = self._next_id + 1
        data[key] = (value, entry_id, owner, anchor)
        order[entry_id] = (data, key)
        if owner is not None and owner.order is not None:
            owner.order[key] = None
            if len(owner.order) > owner.max_entries:  # type: ignore[operator]
                oldest, _ = owner.order.popitem(last=False)
                order.pop(data.pop(oldest)[1], None)
                self._evictions += 1
        size = len(order)
        bound = self._max_entries
        if bound is not None and size > bound:
            _, (oldest_data, oldest) = order.popitem(last=False)
            evicted = oldest_data.pop(oldest)
            if evicted[2] is not None and evicted[2].order is not None:
                evicted[2].order.pop(oldest, None)
            self._evictions += 1
        elif size > self._peak:
            self._peak = size

    def _remove(self, data: dict[Hashable, Entry], key: Hashable) -> None:
        _, entry_id, owner, _ = data.pop(key)
        del self._order[entry_id]  # type: ignore[union-attr]
        if owner is not None and owner.order is not None:
            del owner.order[key]

    def _clear(self) -> None:
        if self._data is not None:
            self._data.clear()
        if self._order is not None:
            self._order.clear()
        for owner in (self._owners or {}).values():
            owner.data.clear()
            if owner.order is not None:
                owner.order.clear()

    def _remove_owner_entries(self, token: object) -> None:
        """Drop every entry of one memoized function (``fn.cache_clear()``)."""
        owner = (self._owners or {}).get(token)
        if owner is None or self._lock is None:
            return
        with self._lock:
            for key in list(owner.data):
                self._remove(owner.data, key)

    def _snapshot(self) -> ScopeStats:
        owners = list((self._owners or {}).values())
        if self._helpers is not None:
            owners.append(self._helpers)
        return ScopeStats(
            hits=sum(o.hits for o in owners),
            misses=sum(o.misses for o in owners),
            entries=len(self),
            peak_entries=self._peak,
            evictions=self._evictions,
            duration_s=(self._closed_at or time.perf_counter()) - self._opened_at,
        )

    def _shut(self, want_stats: bool) -> ScopeStats | None:
        """Clear and close, for the scope lifecycle, which makes sure it runs once;
        returns the final stats when ``want_stats``.

        No lock for a store nothing was written to: a writer makes the lock
        before it checks ``_closed``, so either it sees the store closed, or the
        lock is there to wait on here.
        """
        self._closed = True
        lock = self._lock
        if lock is None:
            return self._snapshot() if want_stats else None
        with lock:
            # Kept, so that a call still in flight as the scope closes cannot
            # change the stats afterwards.
            stats = self._final = self._snapshot()
            self._clear()
            self._subs = None
            if self._flights is not None:
                self._flights.clear()
            return stats

    def _lookup(self, data: dict[Hashable, Entry], key: Hashable) -> Any:
        entry = data.get(key)
        if entry is None:
            return MISSING
        self._touch(key, entry)
        return entry[0]
