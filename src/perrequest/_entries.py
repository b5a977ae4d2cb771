"""The structure inside a ``MemoStore``: entries grouped by owner, one recency order.

Helper entries live in one dict, each memoized function's in its own, keyed by its spec:
a memo hit is two lookups and no key tuple to build (``_subs[spec][key]`` is ``(value,
counter, entry_id, anchor)``). One ordered dict of entry ids is the store-wide recency. A
function's dict goes with its last entry, so the bookkeeping never outgrows the entries.
Reads take no lock: a fill adds, then evicts, so what a read counts is capped at the bound.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextvars import Token
from typing import Any, Final

from ._checks import check_max_entries, unknown_option
from ._flight import MISSING
from ._records import FLIGHTS, Probe, drop_dead
from ._signals import is_time_limit
from ._stats import Counter, ScopeStats, observed, stats_of
from .errors import ScopeClosed

HELPERS: Final = "perrequest.helpers"  # the owner of helper entries (a memo's: its spec)
DEFAULT_MAX_ENTRIES: Final = 10_000
"""The bound of a store when none is given: 10 000 entries, evicted least recently used."""
_OTHER = "(other functions)"  # counters beyond max_entries distinct function names


class Entries:
    """The entries, counters and lock of one store; ``MemoStore`` is its public face."""

    # What the hit path reads is in slots, set in __init__: CPython
    # 3.12+ does not specialise reading an attribute that a class attribute shadows.
    __slots__ = (
        "__weakref__", "_bound", "_closed", "_closed_at", "_counters", "_deletes", "_evictions",
        "_final", "_flights", "_flights_cap", "_helpers", "_lock", "_max_entries", "_next_id",
        "_on_close", "_opened_at", "_order", "_peak", "_subs", "_token",
    )  # fmt: skip
    _closed_at: float  # set by _shut
    _final: ScopeStats | tuple[Any, ...]  # the numbers, until somebody asks

    def __init__(self, max_entries: int | None = DEFAULT_MAX_ENTRIES, **unknown: Any) -> None:
        if unknown:
            name = next(iter(unknown))
            hint = " It is a scope's option: request_scope(on_close=...)." * (name == "on_close")
            raise TypeError(unknown_option("MemoStore()", name, ("max_entries",)) + hint)
        if max_entries is not None and (type(max_entries) is not int or max_entries <= 0):
            check_max_entries(max_entries, "MemoStore(max_entries=...)")
        self._max_entries = max_entries
        self._bound = sys.maxsize if max_entries is None else max_entries
        self._on_close: Callable[[ScopeStats], object] | None = None  # the scope's (_active)
        self._closed = False
        self._token: Token[Any] | None = None  # set by the scope that opens it
        self._opened_at = 0.0  # timed by the scope that opens it, when watched
        self._subs: dict[object, dict[Hashable, tuple[Any, ...]]] | None = {HELPERS: {}}
        self._order: OrderedDict[int, tuple[object, Hashable]] = OrderedDict()
        vars(self._order)  # a __dict__: 3.11 specialises the hit's move_to_end only then
        self._flights: dict[Hashable, Any] = {}
        self._flights_cap = FLIGHTS
        self._counters: dict[str, Counter] = {}
        self._helpers = Counter(timed=False)  # its compute_s is reported nowhere
        self._next_id = self._evictions = self._peak = self._deletes = 0
        self._lock: Any = threading.RLock()

    def _writable(self, what: object) -> Any:
        """The lock; ``ScopeClosed`` once closed. A write racing the close stores nothing:
        ``_shut`` empties the store under the lock, and a closed store fills nothing."""
        if self._closed:
            raise ScopeClosed(
                f"cannot write {what!r}: this MemoStore belongs to a request scope that has "
                "ended. Use perrequest.current_store() inside the request instead of keeping "
                "a reference to an old store."
            )
        return self._lock

    def _counter(self, name: str) -> Counter:
        """Kept by name, not by function, so a helper defined anew per message adds
        nothing; bounded by ``max_entries`` names. ``ScopeClosed`` once closed."""
        # Checked before the lock too: a call finding a closed store (a thread outliving its
        # request) never takes its lock, which a child forked meanwhile inherits held.
        with self._writable(name):
            self._writable(name)  # again under the lock: a close in between keeps no counter
            counters = self._counters
            counter = counters.get(name)
            if counter is None:
                if self._max_entries is not None and len(counters) >= self._max_entries:
                    name = _OTHER
                # Timed if watched now: a listener may have come since the scope opened.
                timed = self._on_close is not None or observed()
                counter = counters.get(name) or counters.setdefault(name, Counter(timed))
            return counter

    def _info(self, owner: Any, name: str) -> tuple[int, int, int]:  # owner: a spec
        counter, size = self._counters.get(name), len((self._subs or {}).get(owner, ()))
        hits, misses = (0, 0) if counter is None else (counter.hits, counter.misses)
        return hits, misses, min(size, self._bound, owner.max_entries or self._bound)

    def _lookup(self, key: tuple[object, Hashable], touch: bool = True) -> Any:
        """The value at ``(owner, key)`` or ``MISSING``."""
        sub = (self._subs or {}).get(key[0])  # None once closed
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
        """Store an entry and enforce the bounds; lock held; nothing once closed. The key's
        ``__hash__``/``__eq__`` may write here too (the lock is reentrant): every write
        moves ``_next_id``, and if others moved it the order is rebuilt (``_resync``).
        The generated memo miss (``_templates._COMPUTE``) writes out the common case."""
        subs = self._subs
        if subs is None:
            return
        owner, key = where
        sub = subs.get(owner)
        if sub is None:
            sub = subs[owner] = {} if getattr(owner, "max_entries", None) is None else OrderedDict()
        order = self._order
        entry_id = self._next_id = self._next_id + 1
        old = sub.get(key)
        sub[key] = (value, counter, entry_id, anchor)
        if type(sub) is not dict:  # this function has a bound of its own
            sub.move_to_end(key)  # type: ignore[attr-defined]
            if len(sub) > owner.max_entries:  # type: ignore[attr-defined]
                # popitem, never next(iter(...)): hits reorder without the lock.
                try:
                    _, entry = sub.popitem(last=False)  # type: ignore[call-arg]
                except KeyError:  # a key's __eq__ wrote here as popitem looked it up
                    return self._resync(owner, sub)  # (the next fill evicts)
                self._peak = max(self._peak, len(order))  # the size before this fill
                order.pop(entry[2], None)
                entry[1].evictions += 1
                self._evictions += 1
        if self._next_id != entry_id:  # written to meanwhile, by the key's own code
            self._resync(owner, sub)
        else:
            order[entry_id] = where
            if old is not None:  # (gone if an interrupt came between an eviction's two pops)
                order.pop(old[2], None)
            if len(order) > self._bound:
                self._evict()

    def _fill_many(
        self, owner: object, keys: list[Hashable], values: list[Any], anchors: list[Any],
        counter: Counter,
    ) -> None:  # fmt: skip
        """``_fill`` of a batch of values; lock held. One loop, without a call per entry,
        when the owner has no bound of its own and the store has room."""
        subs = self._subs
        if subs is None:
            return
        sub = subs.get(owner)
        order = self._order
        if type(sub) is not dict or len(order) + len(keys) > self._bound:
            for key, value, anchor in zip(keys, values, anchors, strict=True):
                self._fill((owner, key), value, counter, anchor)
            return
        mark = self._next_id
        for key, value, anchor in zip(keys, values, anchors, strict=True):
            old = sub.get(key)  # stored meanwhile (prime): replaced, as _fill does
            entry_id = self._next_id = self._next_id + 1
            sub[key] = (value, counter, entry_id if old is None else old[2], anchor)
            if old is None:
                order[entry_id] = (owner, key)
            else:
                order.move_to_end(old[2])
        if self._next_id != mark + len(keys):  # the keys' own code wrote here too
            self._resync(owner, sub)

    def _reserve(self, owner: object) -> None:
        """Make ``owner``'s dict before a batch is fetched, so that its lookups miss
        without raising; ``_unreserve`` drops it if still empty."""
        subs = self._subs
        if subs is not None and owner not in subs:
            subs[owner] = {} if getattr(owner, "max_entries", None) is None else OrderedDict()

    def _unreserve(self, owner: object) -> None:
        subs = self._subs
        if subs is not None and not subs.get(owner, True):
            del subs[owner]

    def _drop(self, last: bool) -> tuple[object, Hashable, Any, Counter] | None:
        """Remove the most (``last``) or least recently used entry (None: gone meanwhile)."""
        entry_id, (owner, key) = self._order.popitem(last=last)
        entry = self._take(owner, key, entry_id)
        return None if entry is None else (owner, key, entry[0], entry[1])

    def _remove(self, owner: object, key: Hashable) -> Any:
        """Drop one entry; its value, or MISSING. Lock held."""
        self._peak = max(self._peak, len(self._order))
        entry = self._take(owner, key)
        if entry is None:
            return MISSING
        self._order.pop(entry[2], None)
        return entry[0]

    def _take(self, owner: object, key: Hashable, entry_id: int = 0) -> tuple[Any, ...] | None:
        """Pop an entry (``entry_id``'s), and its function's dict with its last entry."""
        subs = self._subs
        sub = None if subs is None else subs.get(owner)
        if sub is None:
            return None
        mark, signal = self._next_id + 1, None
        self._next_id = mark
        try:
            entry = sub.pop(key, None)  # the key's __eq__: user code, which may write here
        except Exception as exc:
            if not entry_id:  # a delete by the caller's key: its error, as a dict's
                raise
            entry, signal = None, exc  # an eviction: the key's hash raises now, or a signal
            # came (in it, or as the pop ended): taken by identity, then told which (below)
        try:
            if entry_id and (entry is None or entry[2] != entry_id):
                entry, sub = self._refile(owner, sub, key, entry, entry_id)
            if not sub and owner is not HELPERS and subs.get(owner) is sub:  # type: ignore
                del subs[owner]  # type: ignore[union-attr]
            if self._next_id != mark:
                self._resync()
            if signal is not None and is_time_limit(signal):  # the entry is
                raise signal  # gone: a soft time limit goes on to the task
        finally:  # (this frame, in its traceback: a reference cycle)
            signal = None
        return entry

    def _refile(
        self, owner: object, sub: dict[Hashable, Any], key: Hashable, popped: Any, entry_id: int
    ) -> tuple[Any, dict[Hashable, Any]]:
        """``entry_id``'s entry, taken by identity where a pop missed it (or found another's,
        put back): its key's hash changed since it was stored (a model's primary key
        assigned). So may others' have: an entry its own key no longer finds goes too, as
        a dict would never find it again. The rest make a new dict, in the same order,
        swapped in at once: a hit in another thread finds the old dict or the new one."""
        if popped is not None:
            sub[key] = popped
        order = list(dict.items(sub))  # a plain dict's order means nothing: the store's does
        if type(sub) is not dict:  # a bounded function's recency (its own iteration hashes)
            by_id = {entry[2]: (filed, entry) for filed, entry in order}
            order = [by_id.pop(i) for i in list(self._order) if i in by_id] + [*by_id.values()]
        new: dict[Hashable, Any] = {} if type(sub) is dict else OrderedDict()
        found = signal = None
        for filed, entry in order:
            if entry[2] == entry_id:
                found = entry
                continue
            try:  # by the key's hash now: a dict finds a key by identity whatever its hash
                if dict.get(sub, Probe(filed)) is entry:
                    new[filed] = entry
                    continue
            except Exception as exc:  # its __hash__ or __eq__ raises now (or a signal came)
                signal = signal or (exc if is_time_limit(exc) else None)
            self._order.pop(entry[2], None)
            entry[1].evictions += 1
            self._evictions += 1
        subs = self._subs
        if subs is not None and subs.get(owner) is sub:
            subs[owner] = new
        if signal is not None:  # its entry went all the same: a soft time limit goes on
            try:
                raise signal
            finally:  # this frame, in its traceback: a reference cycle
                signal = None
        return found, new

    def _evict(self) -> None:
        """Drop the least recently used entries beyond the bound. Lock held."""
        order = self._order
        while len(order) > self._bound:
            self._peak = self._bound
            dropped = self._drop(last=False)
            if dropped is not None:
                dropped[3].evictions += 1
                self._evictions += 1

    def _resync(self, owner: object = None, sub: dict[Hashable, Any] | None = None) -> None:
        """Rebuild the recency order from the dicts after a key's own code wrote here too,
        by identity only (no key is hashed), then the bound; ``sub``, being filled, is put
        back if its place is free."""
        subs = self._subs
        if subs is None:
            return
        if sub and owner not in subs:
            subs[owner] = sub
        # dict.items, also on an OrderedDict: its own iteration looks every key up again.
        live = {e[2]: (o, k) for o, s in list(subs.items()) for k, e in list(dict.items(s))}
        order = self._order
        # list(order) copies in one step: hits in other threads reorder it without the
        # lock, which a loop over it in Python would see ("mutated during iteration").
        for entry_id in [i for i in list(order) if i not in live]:
            del order[entry_id]
        for entry_id in sorted(live.keys() - order.keys()):
            order[entry_id] = live[entry_id]
        self._next_id = max(self._next_id, *live, 0) + 1
        self._evict()

    def _snapshot(self) -> ScopeStats:
        return stats_of(self._counts(), self._age())

    def _age(self) -> float:
        start = self._opened_at  # 0.0: a scope nobody watched is not timed
        if not start:
            return 0.0
        return (self._closed_at if self._closed else time.perf_counter()) - start

    def _counts(self) -> tuple[Any, ...]:
        """The numbers the stats are made of (cheaper to copy than the stats)."""
        helpers, counters = self._helpers, list(self._counters.items())  # a new one may come
        named = [(n, c.hits, c.misses, c.evictions, c.compute_s) for n, c in counters]
        entries = min(len(self._order), self._bound)  # a fill adds, then evicts
        return helpers.hits, helpers.misses, entries, self._peak, self._evictions, named

    def _shut(self, want_stats: bool) -> ScopeStats | None:
        """Close and empty the store; the final stats if ``want_stats`` (otherwise their
        numbers, for ``stats``). Computations in flight release their own waiters."""
        self._closed_at = time.perf_counter() if self._opened_at else 0.0
        self._closed = True
        with self._lock:
            # Copied, so that a computation still in flight cannot change them later.
            self._final = self._counts()
            subs, self._subs = self._subs, None
            # A store under way in this thread (a collection, or a key's own code, closed
            # the scope meanwhile) sees the id move, and stores nothing (``_resync``).
            self._next_id += 1
            for sub in (subs or {}).values():
                sub.clear()  # a call in flight holds its function's dict: freed now all the same
            self._order.clear()
            self._counters.clear()
            self._on_close = None  # a function too (close_scope has read it already)
            drop_dead(self, closing=True)  # computations that never end: nothing else leaves
        return self._final_stats() if want_stats else None

    def _final_stats(self) -> ScopeStats:
        final = getattr(self, "_final", None)  # None: read while another thread closes
        if final is None:
            return self._snapshot()
        if isinstance(final, tuple):
            final = self._final = stats_of(final, self._age())
        return final
