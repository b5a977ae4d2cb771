"""``@request_batch``: per-request batching and caching of loads, with nothing to pass around.

A batch function takes a list of keys and returns their values (a sequence in the
same order, or a mapping). Decorated, it becomes a loader whose ``load(key)`` and
``load_many(keys)`` answer from the request store, so values are bounded, counted in
the scope's stats and gone with the request. What the store lacks is fetched:

- sync: in one call per ``load_many``. A fetch registers its keys in the store's
  ``_flights`` with a ``concurrent.futures.Future`` of their outcomes, which threads
  that share the scope and want the same keys wait on;
- async: the keys missing in one event-loop tick form a batch, one task per call of
  the batch function; the task's done-callback hands each waiter (each caller has its
  own future) its value, whatever happened to the task or the scope.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence, Set
from concurrent.futures import Future
from contextvars import ContextVar
from typing import Any, Literal, Protocol, TypeVar, overload

from . import _checks
from ._active import _current, active_store, here
from ._checks import (
    check_max_entries,
    is_async_callable,
    refuse_coroutine,
    refuse_generator,
    unknown_option,
)
from ._flight import MISSING, done_waiting, may_wait
from ._stats import Counter, function_name
from ._typing import CacheInfo
from .errors import ScopeClosed, UnhashableArguments
from .memo import refuse_or_warn
from .store import MemoKey, MemoStore

__all__ = ["AsyncBatchLoader", "BatchLoader", "request_batch"]

K = TypeVar("K")
V = TypeVar("V")
K_contra = TypeVar("K_contra", contravariant=True)

_OPTIONS = ("max_batch_size", "key", "max_entries", "outside_scope")
_OUTSIDE_SCOPE = ("warn", "call", "raise")
_ABSENT: Any = object()  # pop()'s default: MISSING there means "no default"
_UNTIMED = Counter(timed=False)  # outside any scope: nothing is counted
_now = time.perf_counter
_thread_id = threading.get_ident


class BatchLoader(Protocol[K_contra, V]):
    """What ``@request_batch`` makes of a sync batch function: a loader.

    Its values live in the active request's store. ``load`` and ``load_many``
    answer from it and fetch the keys it lacks in one call of the batch
    function; calling the loader is ``load_many``.
    """

    def __call__(self, keys: Iterable[K_contra], /) -> list[V]: ...

    def load(self, key: K_contra, /) -> V:
        """The value of ``key``: ``load_many([key])[0]``."""

    def load_many(self, keys: Iterable[K_contra], /) -> list[V]:
        """The values of ``keys``, in order; raises the first failing key's exception."""

    __wrapped__: Callable[..., Any]

    def prime(self, key: K_contra, value: V, /) -> None:
        """Store ``value`` for ``key`` unless the store holds one (outside: nothing)."""

    def clear(self, key: K_contra, /) -> bool:
        """Drop the stored value of ``key``; whether there was one."""

    def cache_clear(self) -> None:
        """Drop every value of this loader from the active store."""

    def cache_info(self) -> CacheInfo:
        """Hits and misses (keys), bound and entries in the active store."""


class AsyncBatchLoader(Protocol[K_contra, V]):
    """What ``@request_batch`` makes of an async batch function: a loader.

    ``load`` and ``load_many`` return awaitables, as DataLoader's do: the loads
    made in one event-loop tick share one call of the batch function.
    """

    def __call__(self, keys: Iterable[K_contra], /) -> Awaitable[list[V]]: ...

    def load(self, key: K_contra, /) -> Awaitable[V]:
        """Await the value of ``key``; the key joins this tick's batch when called."""

    def load_many(self, keys: Iterable[K_contra], /) -> Awaitable[list[V]]:
        """Await the values of ``keys``, in order; the first failing key's exception."""

    __wrapped__: Callable[..., Any]

    def prime(self, key: K_contra, value: V, /) -> None:
        """Store ``value`` for ``key`` unless the store holds one (outside: nothing)."""

    def clear(self, key: K_contra, /) -> bool:
        """Drop the stored value of ``key``; whether there was one."""

    def cache_clear(self) -> None:
        """Drop every value of this loader from the active store."""

    def cache_info(self) -> CacheInfo:
        """Hits and misses (keys), bound and entries in the active store."""


class _BatchSpec:
    """One decorated batch function: its options, its keys and results, and the sync
    path. It owns the loader's entries in a store, as a memo's spec does
    (``store._subs[spec][cache_key]``, bounded by its ``max_entries``), counted by name."""

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

    load: Callable[[Any], Any]  # an async loader's, which _miss calls again

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

    # -- fetching without batching across callers (sync, trio, outside any scope) ----

    def counter_in(self, store: MemoStore | None) -> Counter | None:
        """This loader's counter in ``store``; None outside any scope or once it ended."""
        if store is None or store._closed:
            return None
        try:
            return store._counter(self.name)
        except ScopeClosed:
            return None

    def look(
        self, store: MemoStore, counter: Counter, keys: list[Any], cks: list[Hashable]
    ) -> tuple[list[Any], dict[Hashable, Any]]:
        """The stored values (MISSING where none), and the keys missing (cache key to load
        key, in first-asked order); what is found, or asked for twice, is a hit."""
        values = [store._lookup((self, ck)) for ck in cks]
        wanted = _wanted(keys, cks, values)
        counter.hits += len(values) - len(wanted)
        return values, wanted

    def fetch(
        self, counter: Counter, wanted: dict[Hashable, Any], out: dict[Hashable, Any]
    ) -> None:
        """Call the batch function for ``wanted`` (per ``max_batch_size``): each key's value,
        or the ``Exception`` it failed with, into ``out`` as each call ends."""
        for cks in self.chunks(list(wanted)):
            keys = [wanted[ck] for ck in cks]
            start = _now() if counter.timed else 0.0
            try:
                result: Any = self.fn(keys)
                refuse_coroutine(result, self.fn, f"@request_batch {self.name}")
                values = self.spread(keys, cks, result)
            except Exception as exc:
                values = [exc] * len(keys)
            finally:
                if start:
                    counter.compute_s += _now() - start
            out.update(zip(cks, values, strict=True))

    async def fetch_async(
        self, counter: Counter, wanted: dict[Hashable, Any], out: dict[Hashable, Any]
    ) -> None:
        """``fetch`` of an async batch function."""
        for cks in self.chunks(list(wanted)):
            keys = [wanted[ck] for ck in cks]
            start = _now() if counter.timed else 0.0
            try:
                values = self.spread(keys, cks, await self.fn(keys))
            except Exception as exc:
                values = [exc] * len(keys)
            finally:
                if start:
                    counter.compute_s += _now() - start
            out.update(zip(cks, values, strict=True))

    def keep(self, store: MemoStore, counter: Counter, fetched: dict[Hashable, Any]) -> None:
        """Store what was fetched, lock held; failures are not cached (a closed store
        keeps nothing)."""
        for ck, value in fetched.items():
            if not isinstance(value, Exception):
                store._fill((self, ck), value, counter, None)

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

    def outside(self, keys: list[Any], cks: list[Hashable]) -> list[Any]:
        """Outside any scope: called directly (per ``max_batch_size``), nothing cached."""
        self.refuse_or_warn()
        out: dict[Hashable, Any] = {}
        self.fetch(_UNTIMED, _wanted(keys, cks), out)
        return settled([out[ck] for ck in cks])

    # -- the sync path: threads sharing a scope never fetch a key twice at once --------

    def load_many(self, keys: Iterable[Any]) -> list[Any]:
        """The values of ``keys``: from the store, or fetched in one call (per
        ``max_batch_size``) with other threads' fetches of the same keys awaited."""
        keys, cks = self.keys_of(keys)
        store = here()
        counter = self.counter_in(store)
        if store is None or counter is None:
            return self.outside(keys, cks)
        values, wanted = self.look(store, counter, keys, cks)
        got: dict[Hashable, Any] = {}
        alone: set[Hashable] = set()  # keys whose fetch waits for this thread's
        while wanted:
            wanted = self._fetch(store, counter, wanted, got, alone)
        return settled([got[ck] if v is MISSING else v for ck, v in zip(cks, values, strict=True)])

    def _fetch(
        self,
        store: MemoStore,
        counter: Counter,
        wanted: dict[Hashable, Any],
        got: dict[Hashable, Any],
        alone: set[Hashable],
    ) -> dict[Hashable, Any]:
        """Into ``got``: fetch what nobody is fetching, wait for the rest. What to ask
        again for: a fetch that was interrupted, or one that waits for this thread's (so
        fetched here too). A key this thread fetches already (a batch function loading
        its own keys) is fetched again, not waited for."""
        me = _Fetch(_thread_id())
        flights = store._flights
        mine: dict[Hashable, Any] = {}
        theirs: list[tuple[Hashable, int, Future[dict[Hashable, Any]]]] = []
        registered: list[Hashable] = []
        with store._lock:
            for ck, key in wanted.items():
                value = store._lookup((self, ck))
                if value is not MISSING:
                    got[ck] = value
                    counter.hits += 1
                    continue
                other = flights.get((self, ck))
                if other is None or other.owner == me.owner or ck in alone:
                    if other is None:
                        flights[(self, ck)] = me
                        registered.append(ck)
                    mine[ck] = key
                    counter.misses += 1
                else:
                    if other.future is None:  # the first to wait makes it
                        other.future = Future()
                    theirs.append((ck, other.owner, other.future))
                    counter.hits += 1
        if mine:
            outcomes: dict[Hashable, Any] = {}
            try:
                self.fetch(counter, mine, outcomes)
            finally:  # interrupted (KeyboardInterrupt...): its waiters ask again
                with store._lock:
                    self.keep(store, counter, outcomes)
                    for ck in registered:
                        flights.pop((self, ck), None)
                    future = me.future  # no waiter comes once unregistered
                if future is not None:
                    future.set_result(outcomes)
            got.update(outcomes)
        again = {}
        for ck, owner, future in theirs:
            if not future.done() and not may_wait(me.owner, owner):  # it waits for us
                alone.add(ck)
                again[ck] = wanted[ck]
                continue
            try:
                value = future.result().get(ck, MISSING)
            finally:
                done_waiting(me.owner)
            if value is MISSING:
                again[ck] = wanted[ck]
            else:
                got[ck] = value
        return again


class _Fetch:
    """One thread's fetch of some keys, as registered in ``_flights`` for each. The first
    thread to wait for it makes its ``Future``, whose result is their outcomes (a key
    without one was interrupted: ask again); a fetch nobody waits for makes none."""

    __slots__ = ("future", "owner")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.future: Future[dict[Hashable, Any]] | None = None


def _wanted(keys: list[Any], cks: list[Hashable], values: Any = None) -> dict[Hashable, Any]:
    """The keys missing (all, without ``values``): cache key to first load key."""
    wanted: dict[Hashable, Any] = {}
    for i, ck in enumerate(cks):
        if (values is None or values[i] is MISSING) and ck not in wanted:
            wanted[ck] = keys[i]
    return wanted


def settled(values: list[Any]) -> list[Any]:
    """``values``, or the first failure among them raised."""
    for value in values:
        if isinstance(value, Exception):
            raise value
    return values


class _Loader:
    """The object a batch function is decorated into; its ``load`` and ``load_many``
    are closures set per loader, so that calling them binds nothing."""

    load: Callable[[Any], Any]
    load_many: Callable[[Iterable[Any]], Any]

    def __init__(self, spec: _BatchSpec) -> None:
        self._spec = spec
        if spec.is_async:
            self.load = make_load(spec)
            self.load_many = functools.partial(load_many, spec)
        else:
            self.load = _make_sync_load(spec)
            self.load_many = spec.load_many

    def __call__(self, keys: Iterable[Any], /) -> Any:
        """``load_many(keys)``: existing calls of the batch function gain the cache."""
        return self.load_many(keys)

    def __repr__(self) -> str:
        return f"<request_batch loader {self._spec.name}>"

    def prime(self, key: Any, value: Any, /) -> None:
        spec = self._spec
        if isinstance(value, BaseException):
            raise TypeError(
                f"{spec.name}.prime({key!r}, {value!r}): failures are never cached, so an "
                "exception cannot be primed. Prime values only; a load of the key will ask "
                "the batch function."
            )
        _, (cache_key,) = spec.keys_of([key])
        store = active_store()
        counter = spec.counter_in(store)
        if store is None or counter is None:
            return
        with store._lock:
            if store._lookup((spec, cache_key), touch=False) is MISSING:
                store._fill((spec, cache_key), value, counter, None)

    def clear(self, key: Any, /) -> bool:
        _, (cache_key,) = self._spec.keys_of([key])
        store = active_store()
        if store is None:
            return False
        return store.pop(MemoKey(self._spec, cache_key), _ABSENT) is not _ABSENT

    def cache_clear(self) -> None:
        store = active_store()
        if store is not None:
            store._remove_owner(self._spec)

    def cache_info(self) -> CacheInfo:
        spec, store = self._spec, active_store()
        hits, misses, currsize = (0, 0, 0) if store is None else store._info(spec, spec.name)
        return CacheInfo(hits, misses, spec.max_entries, currsize)


def _make_sync_load(spec: _BatchSpec) -> Callable[[Any], Any]:
    """A sync loader's ``load(key)``: a hit is the store's two lookups; a miss is
    ``load_many([key])[0]``."""
    get_store, key_fn, owner, load_many = _current.get, spec.key_fn, spec, spec.load_many
    bounded = spec.max_entries is not None

    def load(key: Any) -> Any:
        store = get_store()
        if store is not None:
            ck = key if key_fn is None else key_fn(key)
            try:
                sub = store._subs[owner]
                entry = sub[ck]
                store._order.move_to_end(entry[2])
                if bounded:
                    sub.move_to_end(ck)
            except (KeyError, TypeError, AttributeError):  # a miss; or no store yet
                pass
            else:
                entry[1].hits += 1
                return entry[0]
        return load_many([key])[0]

    return load


# -- the decorator -------------------------------------------------------------------------


class _Decorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[[list[K]], Awaitable[Sequence[V] | Mapping[K, V]]], /
    ) -> AsyncBatchLoader[K, V]: ...
    @overload
    def __call__(
        self, fn: Callable[[list[K]], Sequence[V] | Mapping[K, V]], /
    ) -> BatchLoader[K, V]: ...


@overload
def request_batch(
    fn: Callable[[list[K]], Awaitable[Sequence[V] | Mapping[K, V]]], /
) -> AsyncBatchLoader[K, V]: ...


@overload
def request_batch(fn: Callable[[list[K]], Sequence[V] | Mapping[K, V]], /) -> BatchLoader[K, V]: ...


@overload
def request_batch(
    *,
    max_batch_size: int | None = None,
    key: Callable[[Any], Hashable] | None = None,
    max_entries: int | None = None,
    outside_scope: Literal["warn", "call", "raise"] = "warn",
) -> _Decorator: ...


def request_batch(
    fn: Any = None,
    /,
    *,
    max_batch_size: int | None = None,
    key: Callable[[Any], Hashable] | None = None,
    max_entries: int | None = None,
    outside_scope: Literal["warn", "call", "raise"] = "warn",
    **unknown: Any,
) -> Any:
    """Make a batch function into a per-request loader: batched, cached, bounded.

    The batch function takes a list of keys and returns their values: a
    sequence in the same order (an ``Exception`` instance in it fails that key
    alone) or a mapping from key to value (a key it lacks fails with
    ``KeyError``). Async: the loads made in one event-loop tick within a scope
    share one call; keys cached or in flight are not asked for again. Sync:
    ``load_many`` asks for the keys it lacks in one call. Values live in the
    request store; failures are not cached. Outside any scope nothing is
    batched or cached. Also usable bare: ``@request_batch``.

    Args:
        fn: The batch function, when used bare (``@request_batch``).
        max_batch_size: At most this many keys per call; more are split.
        key: A function of one load key returning its hashable cache key (the
            batch function still receives the load keys).
        max_entries: Bound this loader's values within each store (least
            recently used go first); ``None``: only the store's bound applies.
        outside_scope: Outside any scope, ``"warn"``: call the batch function
            uncached and log one WARNING per function; ``"call"``: call it
            silently; ``"raise"``: raise ``NoActiveScope``.

    Returns:
        A ``BatchLoader`` (sync) or ``AsyncBatchLoader``: ``load``,
        ``load_many``, ``prime``, ``clear``, ``cache_clear``, ``cache_info``,
        ``__wrapped__``; calling it is ``load_many``.

    Raises:
        TypeError: A generator or a method, or a bad option value or name
            (``ValueError`` for a value out of range).
    """
    if unknown:
        raise TypeError(unknown_option("request_batch()", next(iter(unknown)), _OPTIONS))
    # The same rule and messages as a bound's.
    max_batch_size = check_max_entries(max_batch_size, "request_batch(max_batch_size=...)")
    if key is not None and (not callable(key) or is_async_callable(key)):
        raise TypeError(
            "request_batch(key=...) must be a plain (sync) function of one load key returning "
            f"a hashable cache key, not {type(key).__name__} {key!r}"
        )
    max_entries = check_max_entries(max_entries, "request_batch(max_entries=...)")
    if outside_scope not in _OUTSIDE_SCOPE:
        raise ValueError(
            f"request_batch(outside_scope=...) must be 'warn' (call uncached, log once), "
            f"'call' (call uncached) or 'raise' (raise NoActiveScope), not {outside_scope!r}"
        )

    def decorate(target: Any) -> Any:
        if isinstance(target, staticmethod):
            target = target.__func__
        if isinstance(target, classmethod) or not callable(target):
            raise TypeError(
                f"@request_batch decorates a function of a list of keys, not {target!r}"
            )
        refuse_generator(target, "@request_batch")
        if _checks.is_method(target):
            raise TypeError(
                f"@request_batch cannot decorate the method {target.__qualname__}: a loader "
                "is one per function, not per instance. Decorate a module-level function "
                "(or a @staticmethod) of the keys alone."
            )
        spec = _BatchSpec(
            target, is_async_callable(target), max_batch_size, key, max_entries, outside_scope
        )
        return functools.update_wrapper(_Loader(spec), target)

    if fn is None:
        return decorate
    if isinstance(fn, (bool, int, str)) or not (
        callable(fn) or isinstance(fn, (staticmethod, classmethod))
    ):
        raise TypeError(
            f"@request_batch takes a function, or options as keywords "
            f"(@request_batch(max_batch_size=100)), not {fn!r}"
        )
    return decorate(fn)


# -- the async path: the loads of one event-loop tick share one call ------------------------


def make_load(spec: _BatchSpec) -> Callable[[Any], Any]:
    """An async loader's ``load(key)``: a hit is the store's two lookups and returns the
    finished future kept with the value; anything else is ``_miss``'s."""
    get_store, key_fn, owner = _current.get, spec.key_fn, spec
    bounded = spec.max_entries is not None

    def load(key: Any) -> Any:
        store = get_store()
        if store is None:
            return _outside_one(spec, key)
        try:
            entry = store._subs[owner].get(key)
            if entry is not None:
                store._order.move_to_end(entry[2])  # KeyError: evicted by another thread
        except (KeyError, TypeError, AttributeError):  # a miss; no store yet; unhashable
            entry = None
        if entry is None:
            return _miss(spec, store, key, key)
        entry[1].hits += 1
        anchor = entry[3]
        # (loop, its finished future) while that loop runs: after asyncio.run or
        # async_to_sync, the next loop's gather() and wait_for() would refuse it.
        if anchor is not None and anchor[0].is_running():
            return anchor[1]
        return _ready(store, owner, key, entry)

    def load_keyed(key: Any) -> Any:  # with key= or a bound of its own
        store = get_store()
        if store is None:
            return _outside_one(spec, key)
        ck = key if key_fn is None else key_fn(key)
        try:
            sub = store._subs[owner]
            entry = sub.get(ck)
            if entry is not None:
                store._order.move_to_end(entry[2])
                if bounded:
                    sub.move_to_end(ck)
        except (KeyError, TypeError, AttributeError):
            entry = None
        if entry is None:
            return _miss(spec, store, key, ck)
        entry[1].hits += 1
        anchor = entry[3]
        if anchor is not None and anchor[0].is_running():
            return anchor[1]
        return _ready(store, owner, ck, entry)

    spec.load = load if key_fn is None and not bounded else load_keyed
    return spec.load


def _miss(spec: _BatchSpec, store: Any, key: Any, ck: Hashable) -> Any:
    """The key joins this tick's batch (a batch of 100 loads makes 100 of these)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _unbatched(spec, [key], [ck], single=True)
    try:
        state = store._flights.get((spec, loop))
    except AttributeError:  # a middleware's scope, its store not made yet
        state = None
    if state is None or store._closed:
        if type(store) is list:  # make it, and load again
            here()
            return spec.load(key)
        try:
            hash(ck)
        except TypeError:  # refused before any bookkeeping is made for it
            raise spec.unhashable([key], [ck]) from None
        state = _state_of(spec, store, loop)
        if state is None:  # the scope has ended: outside any scope now
            return _outside_one(spec, key)
    future = loop.create_future()
    state.join(key, ck, future)
    return future


def _ready(store: MemoStore, spec: _BatchSpec, ck: Hashable, entry: tuple[Any, ...]) -> Any:
    """A finished future of a stored value, on this loop, kept for later hits: for a value
    stored without one (``prime``, ``load_many``) or with a loop's that has stopped."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _value(entry[0])
    future = loop.create_future()
    future.set_result(entry[0])
    with store._lock:
        if store._lookup((spec, ck), touch=False) is entry[0]:
            store._fill((spec, ck), entry[0], entry[1], (loop, future))
    return future


async def _value(value: Any) -> Any:
    return value


async def _outside_one(spec: _BatchSpec, key: Any) -> Any:
    return (await load_many(spec, [key]))[0]


def load_many(spec: _BatchSpec, keys: Iterable[Any]) -> Any:
    """An async loader's ``load_many(keys)``: a future of the values in order, or of the
    first failing key's exception."""
    keys, cks = spec.keys_of(keys)
    store = here()
    if store is None or store._closed:
        return _outside(spec, keys, cks)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _unbatched(spec, keys, cks)
    values = [store._lookup((spec, ck)) for ck in cks]
    missing = [i for i, value in enumerate(values) if value is MISSING]
    state = _state_of(spec, store, loop) if missing else None  # none made for hits alone
    counter = spec.counter_in(store) if state is None else state.counter
    if counter is None:  # the scope has ended meanwhile
        return _outside(spec, keys, cks)
    many = _Many(loop.create_future(), values, len(missing))
    for i in missing:
        state.join(keys[i], cks[i], (many, i))  # type: ignore[union-attr]
    counter.hits += len(values) - len(missing)
    if not missing:
        many.future.set_result(values)
    return many.future


async def _outside(spec: _BatchSpec, keys: list[Any], cks: list[Hashable]) -> list[Any]:
    """Outside any scope: called directly (per ``max_batch_size``), nothing cached."""
    spec.refuse_or_warn()
    out: dict[Hashable, Any] = {}
    await spec.fetch_async(_UNTIMED, _wanted(keys, cks), out)
    return settled([out[ck] for ck in cks])


async def _unbatched(
    spec: _BatchSpec, keys: list[Any], cks: list[Hashable], single: bool = False
) -> Any:
    """With no asyncio loop running (trio): what the store lacks is fetched by this call
    (per ``max_batch_size``) and cached; loads are not batched across calls."""
    store = here()
    counter = spec.counter_in(store)
    if store is None or counter is None:
        values = await _outside(spec, keys, cks)
    else:
        values, wanted = spec.look(store, counter, keys, cks)
        counter.misses += len(wanted)
        got: dict[Hashable, Any] = {}
        await spec.fetch_async(counter, wanted, got)
        with store._lock:
            spec.keep(store, counter, got)
        values = settled(
            [got[ck] if v is MISSING else v for ck, v in zip(cks, values, strict=True)]
        )
    return values[0] if single else values


class _Many:
    """A ``load_many`` waiting for keys: its future, its values, how many are to come."""

    __slots__ = ("failed", "future", "remaining", "values")

    def __init__(self, future: asyncio.Future[list[Any]], values: list[Any], remaining: int):
        self.future, self.values, self.remaining = future, values, remaining
        self.failed = False

    def put(self, i: int, value: Any, failed: bool) -> None:
        self.values[i] = value
        self.failed |= failed
        self.remaining -= 1
        if not self.remaining:
            if self.failed:
                _fail(self.future, next(v for v in self.values if isinstance(v, Exception)))
            else:
                self.future.set_result(self.values)


def _hand(who: Any, value: Any, failed: bool) -> Any:
    """Hand ``value`` to a waiter (a caller's future, a ``(_Many, index)``) or to each of a
    list of them; the future now holding the value, if any, for later hits."""
    if type(who) is list:
        kept = None
        for one in who:
            kept = _hand(one, value, failed) or kept
        return kept
    if type(who) is tuple:
        if not who[0].future.done():
            who[0].put(who[1], value, failed)
        return None
    if who.done():  # that caller was cancelled
        return None
    if failed:
        _fail(who, value)
        return None
    who.set_result(value)
    return who


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except TypeError:  # StopIteration cannot travel through a future
        future.set_exception(RuntimeError(f"the batch function's value was {exc!r}"))


# -- the async batches and their tasks ------------------------------------------------------

_Future = asyncio.Future
# In a batch's tasks (and the tasks they make): the state whose batches they must not wait
# for (their own, or one that may wait for theirs).
_fetching: ContextVar[_State | None] = ContextVar("perrequest.batch", default=None)
# Batch tasks while they run, by event loop (a loop keeps only weak references to its
# tasks), with their states. A loop that closed with tasks it never finished (a shutdown)
# leaves them here until the next batch starts, which drops them and their states.
_running: dict[asyncio.AbstractEventLoop, dict[asyncio.Task[Any], _State]] = {}


class _State:
    """One loader's batches in one store on one event loop, in the store's ``_flights``
    while it has work: who waits for each key in flight (``inflight``: a future, a
    ``(_Many, index)``, or a list of those), and the pending batch, which every key
    missing before it starts joins: its load keys and cache keys (the same list without
    ``key=``). The loader's own batch functions load apart (``own``, ``own_keys``: who
    waits for each cache key, and its load key), in batches of their own."""

    __slots__ = (
        "cks",
        "counter",
        "inflight",
        "keys",
        "loop",
        "own",
        "own_keys",
        "spec",
        "store",
        "where",
    )

    def __init__(self, spec: _BatchSpec, store: MemoStore, loop: asyncio.AbstractEventLoop) -> None:
        self.spec, self.store, self.loop = spec, store, loop
        self.counter: Counter = store._counter(spec.name)  # ScopeClosed once closed
        self.inflight: dict[Hashable, Any] = {}
        self.keys: list[Any] | None = None
        self.cks: list[Hashable] | None = None
        self.own: dict[Hashable, Any] | None = None
        self.own_keys: dict[Hashable, Any] = {}
        self.where = (spec, loop)

    def join(self, key: Any, ck: Hashable, who: Any) -> None:
        """Wait for ``ck``: with its flight (a hit), or in the pending batch (misses are
        counted when it starts). A batch function of this loader never waits for a batch
        that has started (its own, or one that may wait for it): it loads apart."""
        inflight = self.inflight
        try:
            other = inflight.get(ck)
        except TypeError:
            raise self.spec.unhashable([key], [ck]) from None
        if other is None:
            inflight[ck] = who
            keys = self.keys
            if keys is None:
                keys = self.pend()
            keys.append(key)
            if self.cks is not keys:
                self.cks.append(ck)  # type: ignore[union-attr]
        elif _fetching.get() is self and (self.cks is None or ck not in self.cks):
            self.join_own(key, ck, who)
        else:
            inflight[ck] = _with(other, who)
            self.counter.hits += 1

    def pend(self) -> list[Any]:
        """Make the pending batch (its start is scheduled unless own loads' is)."""
        keys = self.keys = []
        self.cks = keys if self.spec.key_fn is None else []
        if self.own is None:
            self.loop.call_soon(_start, self)
        return keys

    def join_own(self, key: Any, ck: Hashable, who: Any) -> None:
        """Wait for ``ck`` in the pending batch of keys in flight that batch functions load."""
        own = self.own
        if own is None:
            own = self.own = {}
            if self.keys is None:
                self.loop.call_soon(_start, self)
        other = own.get(ck)
        if other is None:
            own[ck] = who
            self.own_keys[ck] = key
        else:
            own[ck] = _with(other, who)
            self.counter.hits += 1


def _with(waiters: Any, who: Any) -> Any:
    if type(waiters) is list:
        waiters.append(who)
        return waiters
    return [waiters, who]


def _state_of(spec: _BatchSpec, store: MemoStore, loop: asyncio.AbstractEventLoop) -> _State | None:
    """The loader's state in ``store`` on ``loop``; None once the scope has ended."""
    if store._closed:
        return None
    state: _State | None = store._flights.get((spec, loop))
    if state is None:
        try:
            state = _State(spec, store, loop)
        except ScopeClosed:
            return None
        with store._lock:
            store._flights[state.where] = state
            store._reserve(spec)  # lookups of keys in flight now miss without raising
    return state


def _start(state: _State) -> None:
    """Start the pending batches: a task per call of at most ``max_batch_size`` keys,
    held in ``_running`` while it runs. First drop what loops that have closed left
    (no lock is held here, so taking their stores' locks cannot deadlock)."""
    for closed in [loop for loop in list(_running) if loop.is_closed()]:
        for left in _running.pop(closed, {}).values():
            _drop(left)
    keys, cks, own = state.keys, state.cks, state.own
    state.keys = state.cks = state.own = None
    if keys is not None:
        _spawn(state, keys, cks, state.inflight)  # type: ignore[arg-type]
    if own is not None:
        own_keys, state.own_keys = state.own_keys, {}
        _spawn(state, [own_keys[ck] for ck in own], list(own), own)


def _spawn(
    state: _State, keys: list[Any], cks: list[Hashable], waiters: dict[Hashable, Any]
) -> None:
    """A task per call of the batch function; its done-callback hands the values to
    ``waiters`` (a callback, not a finally: a task cancelled before its first step runs
    no code)."""
    state.counter.misses += len(keys)
    size = state.spec.max_batch_size or len(keys)
    for i in range(0, len(keys), size):
        part, part_cks = keys[i : i + size], cks[i : i + size]
        task = state.loop.create_task(_call(state, part, part_cks))
        _running.setdefault(state.loop, {})[task] = state
        task.add_done_callback(functools.partial(_ended, state, part, part_cks, waiters))


async def _call(state: _State, keys: list[Any], cks: list[Hashable]) -> Any:
    """One call of the batch function: a value (or an ``Exception``) per key."""
    _fetching.set(state)
    spec, counter = state.spec, state.counter
    start = _now() if counter.timed else 0.0
    try:
        return spec.spread(keys, cks, await spec.fn(keys))
    except Exception as exc:  # the whole call failed: so does every key
        return [exc] * len(keys)
    except asyncio.CancelledError as exc:
        if _cancelled():
            raise
        return [_interrupted(spec, exc)] * len(keys)  # raised by the batch function itself
    finally:
        if start:
            counter.compute_s += _now() - start


def _ended(
    state: _State,
    keys: list[Any],
    cks: list[Hashable],
    waiters: dict[Hashable, Any],
    task: asyncio.Task[Any],
) -> None:
    """Each key's waiters get its value, and the value is stored (scope open). A
    cancelled task's keys go in the next batch while the scope is open, for whoever
    still waits; once it has ended, their waits are cancelled instead (no call after
    the request)."""
    tasks = _running.get(state.loop, {})
    tasks.pop(task, None)
    if not tasks:
        _running.pop(state.loop, None)
    if task.cancelled():
        values = None
    else:
        exc = task.exception()  # KeyboardInterrupt, SystemExit: every key fails
        values = task.result() if exc is None else [_interrupted(state.spec, exc)] * len(keys)
    store, loop = state.store, state.loop
    with store._lock:
        if values is None:
            own = waiters is not state.inflight
            for key, ck in zip(keys, cks, strict=True):
                _again(state, key, ck, waiters.pop(ck), own)
            _release(state)
            return
        anchors: list[Any] = []
        failures = False
        for ck, value in zip(cks, values, strict=True):
            who = waiters.pop(ck)
            if type(who) is _Future and not isinstance(value, Exception):  # one load
                try:
                    who.set_result(value)  # runs no code now: it schedules the wake-up
                    anchors.append((loop, who))  # a finished future of it, for later hits
                except asyncio.InvalidStateError:  # that caller was cancelled
                    anchors.append(None)
            else:
                failed = isinstance(value, Exception)
                kept = _hand(who, value, failed)
                anchors.append(_FAILED if failed else None if kept is None else (loop, kept))
                failures |= failed
        if failures:  # failures are not stored
            kept_at = [i for i, anchor in enumerate(anchors) if anchor is not _FAILED]
            cks, values = [cks[i] for i in kept_at], [values[i] for i in kept_at]
            anchors = [anchors[i] for i in kept_at]
        store._fill_many(state.spec, cks, values, anchors, state.counter)
        _release(state)


_FAILED: Any = object()  # an anchor's place for a failed key: it is not stored


def _again(state: _State, key: Any, ck: Hashable, who: Any, own: bool) -> None:
    """Put the waits of a key whose call was cancelled in the next batch (lock held)."""
    for one in who if type(who) is list else (who,):
        future = one[0].future if type(one) is tuple else one
        if future.done():
            continue
        if state.store._closed:
            future.cancel()
        elif own:
            state.join_own(key, ck, one)
        elif ck in state.inflight:  # put back already, for its other waiters
            state.inflight[ck] = _with(state.inflight[ck], one)
        else:
            state.join(key, ck, one)


def _cancelled() -> bool:
    """Whether the running batch task is being cancelled (rather than its batch function
    raising ``CancelledError`` of its own)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # closed by the garbage collector, outside any loop
        return True
    return task is None or task.cancelling() > 0


def _interrupted(spec: _BatchSpec, exc: BaseException) -> RuntimeError:
    error = RuntimeError(
        f"@request_batch {spec.name}: the batch function raised {exc!r} without its task "
        "being cancelled, so every key of the batch fails. Let it return or raise an "
        "Exception."
    )
    error.__cause__ = exc
    return error


def _drop(state: _State) -> None:
    """Forget the state's work: its loop has closed, so nobody waits for it any more."""
    with state.store._lock:
        state.inflight.clear()
        state.keys = state.cks = state.own = None
        state.own_keys = {}
        _release(state)


def _release(state: _State) -> None:
    """Drop the state from the store once nothing is in flight or pending."""
    if not state.inflight and state.keys is None and state.own is None:
        flights = state.store._flights
        if flights.get(state.where) is state:
            del flights[state.where]
            state.store._unreserve(state.spec)
