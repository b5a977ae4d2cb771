"""The per-request store: a bounded, thread-safe mapping with LRU eviction.

Each entry is kept as ``key -> (value, entry_id, owner, anchor)``; recency lives
in a second ordered dict keyed by the small ``entry_id``. A hit therefore hashes
the caller's key once (tuple hashes are not cached by CPython) and refreshes
recency with a cheap int lookup, without taking a lock. Every write takes the
store's lock.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ._flight import MISSING, SingleFlight
from .errors import ScopeClosed

__all__ = ["DEFAULT_MAX_ENTRIES", "MemoStore", "ScopeStats"]

DEFAULT_MAX_ENTRIES: Final = 10_000

T = TypeVar("T")

_MISSING: Any = object()


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
    """Counters for one memoized function (or the helpers) within one store."""

    __slots__ = ("entries", "hits", "max_entries", "misses", "order")

    def __init__(self, max_entries: int | None = None) -> None:
        self.hits = 0
        self.misses = 0
        self.entries = 0
        self.max_entries = max_entries
        # Keys of this owner in recency order, kept only when it has its own bound.
        self.order: OrderedDict[Hashable, None] | None = (
            None if max_entries is None else OrderedDict()
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
    stays empty, and every write raises ``ScopeClosed``.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_data",
        "_entry_ids",
        "_evictions",
        "_flights",
        "_helpers",
        "_lock",
        "_max_entries",
        "_opened_at",
        "_order",
        "_owners",
        "_peak",
    )

    def __init__(self, max_entries: int | None = DEFAULT_MAX_ENTRIES) -> None:
        self._max_entries = check_max_entries(max_entries)
        self._data: dict[Hashable, tuple[Any, int, _Owner | None, Any]] = {}
        self._order: OrderedDict[int, Hashable] = OrderedDict()
        self._entry_ids = itertools.count()
        self._lock = threading.RLock()
        self._flights = SingleFlight(self._lock)
        self._owners: dict[object, _Owner] = {}
        self._helpers = _Owner()
        self._closed = False
        self._peak = 0
        self._evictions = 0
        self._opened_at = time.perf_counter()

    # -- Mapping -----------------------------------------------------------

    def __getitem__(self, key: Hashable) -> Any:
        entry = self._data[key]
        self._touch(key, entry)
        return entry[0]

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self._check_writable(key)
        self._insert(key, value, None, None)

    def __delitem__(self, key: Hashable) -> None:
        self._check_writable(key)
        with self._lock:
            self._remove(key)

    def __iter__(self) -> Iterator[Hashable]:
        # A snapshot, so another thread writing cannot break the iteration.
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MemoStore {state} entries={len(self._data)} max_entries={self._max_entries}>"

    # The mixins would read before writing, so a closed store could answer a
    # pop() with its default instead of refusing the write: check first.

    def pop(self, key: Hashable, default: Any = _MISSING) -> Any:
        self._check_writable(key)
        with self._lock:
            entry = self._data.get(key, _MISSING)
            if entry is _MISSING:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            self._remove(key)
            return entry[0]

    def popitem(self) -> tuple[Hashable, Any]:
        self._check_writable("popitem()")
        with self._lock:
            if not self._order:
                raise KeyError("popitem(): the store is empty")
            key = next(reversed(self._order.values()))
            value = self._data[key][0]
            self._remove(key)
            return key, value

    def clear(self) -> None:
        self._check_writable("clear()")
        with self._lock:
            self._clear()

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        self._check_writable(key)
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._touch(key, entry)
                return entry[0]
            self._insert(key, default, None, None)
            return default

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._check_writable("update()")
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
        """A snapshot of hits, misses, entries, peak, evictions and age."""
        return self._snapshot(time.perf_counter())

    def get_or_set(self, key: Hashable, factory: Callable[[], T]) -> T:
        """Return the value at ``key``, calling ``factory()`` once to fill it if missing.

        Counted in ``stats``; concurrent callers in threads sharing this store
        wait for one computation instead of running ``factory`` twice.
        """
        self._check_writable(key)
        hash(key)  # fail on an unhashable key before anything else happens

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

        return self._compute_sync(key, self._helpers, None, compute)  # type: ignore[no-any-return]

    # -- internals used by request_memo and the scope lifecycle -------------

    def _check_writable(self, key: object) -> None:
        if self._closed:
            raise ScopeClosed(
                f"cannot write {key!r}: this MemoStore belongs to a request scope that has "
                "ended. Use perrequest.current_store() inside the request instead of keeping "
                "a reference to an old store."
            )

    def _touch(self, key: Hashable, entry: tuple[Any, int, _Owner | None, Any]) -> None:
        try:
            self._order.move_to_end(entry[1])
            owner = entry[2]
            if owner is not None and owner.order is not None:
                owner.order.move_to_end(key)
        except KeyError:  # removed meanwhile by another thread: nothing to refresh
            pass

    def _owner_for(self, token: object, max_entries: int | None) -> _Owner:
        """The counters of one memoized function in this store."""
        owner = self._owners.get(token)
        if owner is None:
            with self._lock:
                owner = self._owners.setdefault(token, _Owner(max_entries))
        return owner

    def _insert(
        self,
        key: Hashable,
        value: Any,
        owner: _Owner | None,
        anchor: Any,
        count_miss: bool = False,
    ) -> None:
        with self._lock:
            if count_miss and owner is not None:
                owner.misses += 1
            if self._closed:
                return
            data = self._data
            old = data.get(key)
            if old is not None:
                # Replace in place; a memo entry keeps its owner's accounting.
                owner = owner or old[2]
                data[key] = (value, old[1], owner, anchor if owner is not None else None)
                self._touch(key, old)
                return
            entry_id = next(self._entry_ids)
            data[key] = (value, entry_id, owner, anchor)
            self._order[entry_id] = key
            if owner is not None:
                owner.entries += 1
                if owner.order is not None:
                    owner.order[key] = None
                    if owner.entries > owner.max_entries:  # type: ignore[operator]
                        self._remove(next(iter(owner.order)))
                        self._evictions += 1
            size = len(data)
            bound = self._max_entries
            if bound is not None and size > bound:
                self._remove(next(iter(self._order.values())))
                self._evictions += 1
            elif size > self._peak:
                self._peak = size

    def _remove(self, key: Hashable) -> None:
        _, entry_id, owner, _ = self._data.pop(key)
        del self._order[entry_id]
        if owner is not None:
            owner.entries -= 1
            if owner.order is not None:
                del owner.order[key]

    def _clear(self) -> None:
        self._data.clear()
        self._order.clear()
        for owner in (*self._owners.values(), self._helpers):
            owner.entries = 0
            if owner.order is not None:
                owner.order.clear()

    def _remove_owner_entries(self, token: object) -> None:
        """Drop every memo entry of one function (``fn.cache_clear()``)."""
        with self._lock:
            if self._closed:
                return
            for key in [k for k in self._data if type(k) is tuple and k and k[0] is token]:
                self._remove(key)

    def _snapshot(self, now: float) -> ScopeStats:
        owners = (*self._owners.values(), self._helpers)
        return ScopeStats(
            hits=sum(o.hits for o in owners),
            misses=sum(o.misses for o in owners),
            entries=len(self._data),
            peak_entries=self._peak,
            evictions=self._evictions,
            duration_s=now - self._opened_at,
        )

    def _close(self) -> ScopeStats | None:
        """Clear and close; returns the final stats, or None if already closed."""
        with self._lock:
            if self._closed:
                return None
            stats = self._snapshot(time.perf_counter())
            self._closed = True
            self._clear()
            self._flights.clear()
            return stats

    def _lookup(self, key: Hashable) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return MISSING
        self._touch(key, entry)
        return entry[0]

    def _compute_sync(
        self, key: Hashable, owner: _Owner, anchor: Any, compute: Callable[[], Any]
    ) -> Any:
        """Return the entry at ``key`` or compute it once across threads."""
        return self._flights.run(
            key, self._lookup, lambda k, v: self._insert(k, v, owner, anchor), compute, owner
        )

    async def _compute_async(
        self, key: Hashable, owner: _Owner, anchor: Any, compute: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Return the entry at ``key`` or compute it once across tasks."""
        return await self._flights.run_async(
            key, self._lookup, lambda k, v: self._insert(k, v, owner, anchor), compute, owner
        )
