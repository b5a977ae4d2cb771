"""The per-request store: a bounded, thread-safe mapping with least-recently-used eviction.

How entries are kept, bounded and counted is ``_entries``'. Memo entries show up as
``MemoKey`` objects, which never equal a user's key and are not writable here.
"""

from __future__ import annotations

import inspect
from asyncio import Task
from collections.abc import Callable, Hashable, ItemsView, Iterator, MutableMapping, ValuesView
from typing import Any, NamedTuple, TypeVar

from . import _flight
from ._checks import unhashable_because
from ._entries import DEFAULT_MAX_ENTRIES, HELPERS, Entries
from ._flight import MISSING
from ._stats import ScopeStats
from ._waits import Waited

__all__ = ["DEFAULT_MAX_ENTRIES", "MemoKey", "MemoStore"]

T = TypeVar("T")


def check_key(key: object) -> None:
    """One error for an unhashable store key, even where no dict would hash it."""
    if (why := unhashable_because(key)) is not None:
        raise TypeError(
            f"perrequest store keys must be hashable, not {why}: use a tuple "
            "(tuple(key)) or another hashable value (a frozenset instead of a set)"
        )


def check_factory(factory: object) -> None:
    """``get_or_set(key, 42)`` would fail inside the library, counted as a miss."""
    if not callable(factory):
        raise TypeError(
            "get_or_set(key, factory): factory must be a callable taking no arguments, "
            f"called to make the value when the key is missing, not {type(factory).__name__} "
            f"{factory!r}. Wrap a ready value: get_or_set(key, lambda: value)."
        )


class MemoKey(NamedTuple):
    """How a memo entry shows up when the store is iterated: never equal to a user's key."""

    owner: object
    key: Hashable

    # A tuple equals a tuple of the same items: a user's key (owner, key), taken apart
    # from one seen while iterating, would be equal to it, and the store hold both.
    def __eq__(self, other: object) -> bool:
        return type(other) is MemoKey and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return tuple.__hash__(self)


class MemoStore(Entries, MutableMapping[Hashable, Any]):
    """The memo store of one scope: bounded, least-recently-used, thread-safe.

    Made by ``request_scope`` and the middlewares. Once closed it stays empty
    and every write raises ``ScopeClosed``. Iterating it yields the helper
    keys and, for memo entries, ``MemoKey`` objects.

    A store you create yourself is just a bounded mapping: it is not a scope,
    never active, and not counted by ``live_scopes()`` (an ``on_close`` is a
    scope's option: ``request_scope(on_close=...)``).

    Args:
        max_entries: The bound, counting memo and helper entries together; the
            least recently used entry is evicted beyond it. ``None``: unbounded.
    """

    __slots__ = ("_before",)
    _before: object  # only while _active.open_scope sets it active (see opened_on)

    def __init__(self, max_entries: int | None = DEFAULT_MAX_ENTRIES, **unknown: Any) -> None:
        super().__init__(max_entries, **unknown)  # here: Python's own errors name MemoStore

    def _found(self, key: Hashable, touch: bool = True) -> Any:
        """The value at ``key``, or MISSING. An unhashable key raises check_key's error
        even in an empty store, checked on misses only, so a hit pays nothing."""
        try:
            value = self._lookup(self._split(key), touch=touch)
        except TypeError:
            check_key(key)
            raise
        if value is MISSING:
            check_key(key)
        return value

    def __getitem__(self, key: Hashable) -> Any:
        value = self._found(key)
        if value is MISSING:
            raise KeyError(key)
        return value

    def get(self, key: Hashable, default: Any = None) -> Any:
        """Not Mapping's: a ``KeyError`` of the key's own ``__hash__`` is not a miss."""
        value = self._found(key)
        return default if value is MISSING else value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if type(key) is MemoKey:
            raise _memo_key_write(key)
        check_key(key)
        with self._writable(key):
            self._invalidate(HELPERS, key, deleted=False)  # a get_or_set in flight keeps it
            self._fill((HELPERS, key), value, self._helpers, None)

    def __delitem__(self, key: Hashable) -> None:
        self.pop(key)

    def __len__(self) -> int:
        # A fill into a full store adds, then evicts (under the lock, which a read does not
        # take: a value's __del__ run by that eviction may ask): never over the bound.
        return min(len(self._order), self._bound)

    def __iter__(self) -> Iterator[Hashable]:
        return iter([key for key, _ in self._pairs()])  # a snapshot: safe from other threads

    def __contains__(self, key: object) -> bool:
        return self._found(key, touch=False) is not MISSING

    def items(self) -> ItemsView[Hashable, Any]:
        """A view whose iteration is a snapshot, and does not refresh recency."""
        return _SnapshotItems(self)

    def values(self) -> ValuesView[Any]:
        """A view whose iteration is a snapshot, and does not refresh recency."""
        return _SnapshotValues(self)

    def _pairs(self) -> list[tuple[Hashable, Any]]:
        pairs: list[tuple[Hashable, Any]] = []
        for owner, sub in list((self._subs or {}).items()):
            # list() copies in one step, under the GIL; dict.items, also on a bounded
            # function's OrderedDict, whose own items() hashes every key (Python code,
            # during which another thread's hit reorders it: "mutated during iteration").
            for key, entry in list(dict.items(sub)):
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
            "process. Pickle the entries you set: {k: v for k, v in store.items() if "
            "not isinstance(k, perrequest.store.MemoKey)} (memo entries are keyed by their "
            "function's private spec, which does not pickle)."
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MemoStore {state} entries={len(self)} max_entries={self._max_entries}>"

    def _split(self, key: Hashable) -> tuple[object, Hashable]:
        return (key.owner, key.key) if type(key) is MemoKey else (HELPERS, key)

    # The mixins read before they write, so a closed store could answer pop() with
    # its default instead of refusing the write: these check first.

    def pop(self, key: Hashable, default: Any = MISSING) -> Any:
        owner, inner = self._split(key)
        check_key(inner)
        with self._writable(key):
            self._invalidate(owner, inner)
            value = self._remove(owner, inner)
        if value is MISSING:
            if default is MISSING:
                raise KeyError(key)
            return default
        return value

    def popitem(self) -> tuple[Hashable, Any]:
        with self._writable("popitem()"):
            if not self._order:
                raise KeyError("popitem(): the store is empty")
            self._peak = max(self._peak, len(self._order))
            dropped = self._drop(last=True)  # the most recent, as dict does
            if dropped is None:  # its key's own code removed it meanwhile
                return self.popitem()
            return (dropped[1] if dropped[0] is HELPERS else MemoKey(*dropped[:2])), dropped[2]

    def clear(self) -> None:
        with self._writable("clear()"):
            self._invalidate(None)
            for owner in list(self._subs or ()):
                self._remove_owner(owner)

    def _remove_owner(self, owner: object) -> None:  # fn.cache_clear()
        """Every entry of ``owner``, by identity: no key is hashed (one whose hash changed
        since it was stored goes too; a bounded function's own iteration would hash)."""
        if self._subs is None:
            return
        with self._writable("cache_clear()"):
            self._invalidate(owner)
            sub = (self._subs or {}).get(owner)
            if not sub:
                return
            self._peak = max(self._peak, len(self._order))
            for entry in list(dict.values(sub)):
                self._order.pop(entry[2], None)
            sub.clear()
            if owner is not HELPERS and self._subs and self._subs.get(owner) is sub:
                del self._subs[owner]

    def _invalidate(self, owner: object, key: Any = MISSING, deleted: bool = True) -> None:
        """A delete of ``(owner, key)`` (all of ``owner``'s keys; every owner's for None)
        invalidates its computations in flight; a batch's are left alone. Lock held."""
        if deleted:  # for computations not in _flights (trio, recursion, a cycle): _keep
            self._deletes += 1
        flights = self._flights
        if not flights:
            return
        if key is not MISSING:
            found = [(owner, key)]
        else:
            found = [
                k
                for k in list(flights)
                if type(k) is tuple and len(k) == 2 and (owner is None or k[0] is owner)
            ]
        for where in found:
            try:
                record = flights.get(where)
                if type(record) is Waited or type(record) is int or isinstance(record, Task):
                    _flight.invalidate(self, where)
            except Exception:  # another key's __hash__ or __eq__: not this call's error
                if key is not MISSING:
                    raise

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        check_key(key)
        with self._writable(key):
            value = self._lookup(self._split(key))
            if value is MISSING:
                if type(key) is MemoKey:  # read it, never write it
                    raise _memo_key_write(key)
                self._fill((HELPERS, key), default, self._helpers, None)
                value = default
            return value

    def update(self, other: Any = (), /, **kwargs: Any) -> None:  # update(self=1): a key
        self._writable("update()")
        super().update(other, **kwargs)

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
        return self._final_stats() if self._closed else self._snapshot()

    def get_or_set(self, key: Hashable, factory: Callable[[], T]) -> T:
        """The value at ``key``, calling ``factory()`` once to fill it if missing.

        Counted in ``stats``. Threads sharing this store that miss the same key
        wait for one call of ``factory`` instead of making their own.
        """
        check_factory(factory)  # before anything is counted
        self._writable(key)
        value = self._found(key)
        if value is MISSING and type(key) is MemoKey:
            raise _memo_key_write(key)
        if value is not MISSING:
            self._helpers.hits += 1
            return value  # type: ignore[no-any-return]
        try:
            return _flight.run(self, (HELPERS, key), factory, (), {}, self._helpers, None)  # type: ignore[no-any-return]
        except TypeError as exc:
            if _binds_no_arguments(factory):  # its own TypeError
                raise
            raise TypeError(
                f"get_or_set(key, factory) calls factory() with no arguments, but {factory!r} "
                f"takes some ({exc}). Pass a callable of no arguments: "
                "get_or_set(key, lambda: make(key))."
            ) from exc


def _binds_no_arguments(factory: Callable[..., Any]) -> bool:
    try:
        inspect.signature(factory, follow_wrapped=False).bind()  # as it is called
    except TypeError:
        return False
    except ValueError:  # no signature to read: the error may be anything's
        pass
    return True


class _SnapshotItems(ItemsView[Hashable, Any]):
    _mapping: MemoStore

    def __iter__(self) -> Iterator[tuple[Hashable, Any]]:
        return iter(self._mapping._pairs())

    def __contains__(self, item: object) -> bool:  # ItemsView's reads with store[key]: a touch
        if not isinstance(item, tuple) or len(item) != 2:
            return False
        found = self._mapping._found(item[0], touch=False)
        return found is not MISSING and (found is item[1] or found == item[1])


class _SnapshotValues(ValuesView[Any]):
    _mapping: MemoStore

    def __iter__(self) -> Iterator[Any]:
        return iter([value for _, value in self._mapping._pairs()])

    def __contains__(self, value: object) -> bool:  # ValuesView's: a touch per key, KeyError
        return any(v is value or v == value for v in self)  # for one evicted meanwhile


def _memo_key_write(key: MemoKey) -> TypeError:
    return TypeError(
        f"{key!r} is a memo entry: its @request_memo or @request_batch writes those. Delete "
        "it, or use the function's cache_clear(), instead of writing to it."
    )
