"""What every ``@request_batch`` loader shares: its spec, its results, the sync path.

A loader's ``_BatchSpec`` owns its entries in the request store, as a memo's
spec does: ``store._subs[spec][cache_key]``, bounded by the spec's
``max_entries``, counted under its name. Keys being fetched are registered in
the store's ``_flights`` (``(spec, cache_key)`` for threads; the async path
adds the event loop), so callers that share a scope never fetch a key twice
at once, and the records go with the fetch: nothing is left once it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Set
from concurrent.futures import Future
from typing import Any

from ._active import here
from ._checks import refuse_coroutine
from ._flight import MISSING, done_waiting, may_wait
from ._stats import Counter, function_name
from .errors import ScopeClosed, UnhashableArguments
from .memo import refuse_or_warn
from .store import MemoStore

logger = logging.getLogger("perrequest")

# The fetch of a key ended without an outcome (cancelled, interrupted): its
# waiters ask for it again.
RESTART: Any = object()
_thread_id = threading.get_ident
now = time.perf_counter


class _BatchSpec:
    """One decorated batch function: its options, and everything not on the hit path."""

    __slots__ = (
        "__weakref__",
        "fn",
        "is_async",
        "key_fn",
        "load",
        "max_batch_size",
        "max_entries",
        "name",
        "outside_scope",
    )

    load: Callable[[Any], Any]  # the async loader's load, which _batch_async calls again

    def __init__(
        self,
        fn: Callable[..., Any],
        is_async: bool,
        max_batch_size: int | None,
        key_fn: Callable[[Any], Hashable] | None,
        max_entries: int | None,
        outside_scope: str,
    ) -> None:
        self.fn = fn
        self.is_async = is_async
        self.max_batch_size = max_batch_size
        self.key_fn = key_fn
        self.max_entries = max_entries  # read by the store: this loader's own bound
        self.outside_scope = outside_scope
        self.name = function_name(fn)  # never the repr: a partial's shows its arguments

    def __repr__(self) -> str:
        return f"<request_batch {self.name}>"

    # -- keys and results ------------------------------------------------------------

    def keys_of(self, keys: Iterable[Any]) -> tuple[list[Any], list[Hashable]]:
        """The load keys as a list, and their cache keys, checked hashable."""
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
            raise TypeError(
                f"@request_batch {self.name}: load_many() takes an iterable of keys, not "
                f"{type(keys).__name__} {keys!r}. Use load(key) for one key."
            )
        keys = keys if type(keys) is list else list(keys)
        cache_keys = keys if self.key_fn is None else [self.key_fn(key) for key in keys]
        try:
            set(cache_keys)
        except TypeError:
            raise self.unhashable(keys, cache_keys) from None
        return keys, cache_keys

    def unhashable(self, keys: list[Any], cache_keys: list[Any]) -> UnhashableArguments:
        for key, cache_key in zip(keys, cache_keys, strict=True):
            try:
                hash(cache_key)
            except TypeError:
                if self.key_fn is not None:
                    return UnhashableArguments(
                        f"the key= function of @request_batch {self.name} returned an "
                        f"unhashable {type(cache_key).__name__} for key {key!r}. Make it "
                        "return a hashable value, such as a tuple of strings and numbers."
                    )
                return UnhashableArguments(
                    f"@request_batch {self.name}: key {key!r} is unhashable "
                    f"({type(key).__name__}), so it cannot be cached. Pass hashable keys (a "
                    "tuple instead of a list), or give the decorator key=, a function of one "
                    "key that returns a hashable cache key."
                )
        return UnhashableArguments(f"@request_batch {self.name}: a key cannot be hashed")

    def spread(self, keys: list[Any], cache_keys: list[Hashable], result: Any) -> list[Any]:
        """One value per key from what the batch function returned; an ``Exception``
        instance where that key failed. ``TypeError`` when the shape is wrong."""
        if isinstance(result, Mapping):
            values = []
            for key, cache_key in zip(keys, cache_keys, strict=True):
                try:
                    value = result.get(key, MISSING)
                except TypeError:  # an unhashable load key: the mapping is by cache key
                    value = MISSING
                if value is MISSING and cache_key is not key:
                    value = result.get(cache_key, MISSING)
                if value is MISSING:
                    value = KeyError(
                        f"@request_batch {self.name} returned a mapping without key {key!r}. "
                        "Map every key it is given (to None, if that means absent)."
                    )
                values.append(value)
            return values
        if type(result) is not list:
            if isinstance(result, (str, bytes, Set)) or not isinstance(result, Iterable):
                raise TypeError(
                    f"@request_batch {self.name} returned {type(result).__name__}: a batch "
                    "function returns a sequence of values in the order of its keys, or a "
                    "mapping from key to value."
                )
            result = list(result)
        if len(result) != len(keys):
            raise TypeError(
                f"@request_batch {self.name} returned {len(result)} values for {len(keys)} "
                "keys: it must return one value per key, in the order of the keys it was "
                "given (an Exception instance fails one key), or a mapping from key to value."
            )
        return result  # type: ignore[no-any-return]

    def chunks(self, items: list[Any]) -> list[list[Any]]:
        size = self.max_batch_size
        if size is None or len(items) <= size:
            return [items]
        return [items[i : i + size] for i in range(0, len(items), size)]

    # -- outside a scope ---------------------------------------------------------------

    def refuse_or_warn(self) -> None:
        """The ``outside_scope`` rule, for a call made outside any scope."""
        refuse_or_warn(
            "request_batch",
            self.name,
            self.outside_scope,
            "batched or cached",
            "Register RequestScopeMiddleware, or wrap the code in `with "
            "perrequest.request_scope():`.",
        )

    def outside(self, keys: list[Any], cache_keys: list[Hashable]) -> list[Any]:
        """Outside any scope: called directly (per ``max_batch_size``), nothing cached."""
        self.refuse_or_warn()
        values: list[Any] = []
        for chunk, cks in zip(self.chunks(keys), self.chunks(cache_keys), strict=True):
            values += self.spread(chunk, cks, self.call(chunk))
        return settled(values)

    def call(self, keys: list[Any]) -> Any:
        result: Any = self.fn(keys)
        refuse_coroutine(result, self.fn, f"@request_batch {self.name}")
        return result

    # -- the sync path ---------------------------------------------------------------

    def load_many(self, keys: Iterable[Any]) -> list[Any]:
        """The values of ``keys``: from the store, or fetched in one call (per
        ``max_batch_size``) with other threads' fetches of the same keys awaited."""
        keys, cache_keys = self.keys_of(keys)
        store = here()
        if store is None or store._closed:
            return self.outside(keys, cache_keys)
        values = [store._lookup((self, ck)) for ck in cache_keys]
        try:
            counter = store._counter(self.name)
        except ScopeClosed:
            return self.outside(keys, cache_keys)
        missing = [i for i, value in enumerate(values) if value is MISSING]
        counter.hits += len(values) - len(missing)
        alone: set[Hashable] = set()  # keys whose fetch waits for ours: fetched here too
        while missing:
            missing = self._fetch(store, counter, keys, cache_keys, values, missing, alone)
        return settled(values)

    def _fetch(
        self,
        store: MemoStore,
        counter: Counter,
        keys: list[Any],
        cache_keys: list[Hashable],
        values: list[Any],
        missing: list[int],
        alone: set[Hashable],
    ) -> list[int]:
        """Fill ``values`` at ``missing``: fetch what nobody is fetching, wait for the
        rest. The indices to ask again for (their fetch was interrupted)."""
        me = _SyncFetch(_thread_id())
        mine: dict[Hashable, list[int]] = {}  # cache key -> indices, fetched here
        registered: list[Hashable] = []
        theirs: list[tuple[int, _SyncFetch]] = []
        flights = store._flights
        with store._lock:
            for i in missing:
                ck = cache_keys[i]
                if ck in mine:
                    mine[ck].append(i)
                    counter.hits += 1
                    continue
                value = store._lookup((self, ck))
                if value is not MISSING:
                    values[i] = value
                    counter.hits += 1
                    continue
                other = flights.get((self, ck))
                if other is None or other.owner == me.owner or ck in alone:  # no sharing
                    if other is None:
                        flights[(self, ck)] = me
                        registered.append(ck)
                    mine[ck] = [i]
                    counter.misses += 1
                else:
                    if other.future is None:
                        other.future = Future()
                    theirs.append((i, other))
                    counter.hits += 1
        if mine:
            self._fetch_mine(store, counter, keys, mine, registered, me)
            for indices in mine.values():
                for i in indices:
                    values[i] = me.outcomes[cache_keys[i]]
        again = []
        for i, other in theirs:
            future: Future[None] = other.future  # type: ignore[assignment]
            if not future.done() and not may_wait(me.owner, other.owner):  # it waits for us
                alone.add(cache_keys[i])  # so fetch it here too
                again.append(i)
                continue
            try:
                future.result()
            finally:
                done_waiting(me.owner)
            value = values[i] = other.outcomes[cache_keys[i]]
            if value is RESTART:
                again.append(i)
        return again

    def _fetch_mine(
        self,
        store: MemoStore,
        counter: Counter,
        keys: list[Any],
        mine: dict[Hashable, list[int]],
        registered: list[Hashable],
        me: _SyncFetch,
    ) -> None:
        outcomes = me.outcomes
        wanted = [(keys[indices[0]], ck) for ck, indices in mine.items()]
        try:
            for chunk in self.chunks(wanted):
                load_keys, cks = [k for k, _ in chunk], [ck for _, ck in chunk]
                start = now() if counter.timed else 0.0
                try:
                    got = self.spread(load_keys, cks, self.call(load_keys))
                except Exception as exc:
                    got = [exc] * len(chunk)
                finally:
                    if start:
                        counter.compute_s += now() - start
                outcomes.update(zip(cks, got, strict=True))
        finally:  # an interrupted fetch (KeyboardInterrupt...): its waiters ask again
            with store._lock:
                for ck in mine:
                    value = outcomes.setdefault(ck, RESTART)
                    if value is not RESTART and not isinstance(value, Exception):
                        store._fill((self, ck), value, counter, None)
                for ck in registered:
                    store._flights.pop((self, ck), None)
            if me.future is not None:
                me.future.set_result(None)


class _SyncFetch:
    """One thread's fetch of some keys: who runs it, the outcome of each key, and the
    future its waiters wait on (made by the first one)."""

    __slots__ = ("future", "outcomes", "owner")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.outcomes: dict[Hashable, Any] = {}
        self.future: Future[None] | None = None


def settled(values: list[Any]) -> list[Any]:
    """``values``, or the first failure among them raised."""
    for value in values:
        if isinstance(value, Exception):
            raise value
    return values
