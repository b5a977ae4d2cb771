"""``@request_batch``: per-request batching and caching of loads (docs/batching.md). Hits
are answered here; misses by ``_batching`` (sync, trio) and ``_batch_async``."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar, overload

from . import _checks
from ._active import _current, active_store
from ._batch_async import in_flight, load_many, miss, outside_one, ready
from ._batching import THREAD, _BatchSpec
from ._checks import check_max_entries, is_async_callable, unknown_option
from ._flight import MISSING
from ._targets import refuse_batch_function, refuse_batch_target, refuse_task
from ._typing import CacheInfo
from .store import MemoKey

__all__ = ["AsyncBatchLoader", "BatchLoader", "request_batch"]

K = TypeVar("K")
V = TypeVar("V")
K_contra = TypeVar("K_contra", contravariant=True)

_OPTIONS = ("max_batch_size", "key", "max_entries", "outside_scope")
_ABSENT: Any = object()  # pop()'s default: MISSING there means "no default"


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
        """Store ``value`` for ``key`` unless it has one or is being loaded (outside: nothing)."""

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
        """Store ``value`` for ``key`` unless it has one or is being loaded (outside: nothing)."""

    def clear(self, key: K_contra, /) -> bool:
        """Drop the stored value of ``key``; whether there was one."""

    def cache_clear(self) -> None:
        """Drop every value of this loader from the active store."""

    def cache_info(self) -> CacheInfo:
        """Hits and misses (keys), bound and entries in the active store."""


class _Loader:
    """A decorated batch function: ``load`` and ``load_many`` are closures (no binding)."""

    load: Callable[[Any], Any]
    load_many: Callable[[Iterable[Any]], Any]

    def __init__(self, spec: _BatchSpec) -> None:
        self._spec = spec
        if spec.is_async:
            self.load = _async_load(spec)
            self.load_many = functools.partial(load_many, spec)
        else:
            self.load = _sync_load(spec)
            self.load_many = spec.load_many
        # Named as called: Python's argument errors name it (users.load() takes ...).
        self.load.__qualname__ = f"{getattr(spec.fn, '__qualname__', spec.name)}.load"

    def __call__(self, keys: Iterable[Any], /) -> Any:
        """``load_many(keys)``: existing calls of the batch function gain the cache."""
        return self.load_many(keys)

    def __repr__(self) -> str:
        return f"<request_batch loader {self._spec.name}>"

    def __reduce__(self) -> str:  # by name: copies are itself (a copied spec lost clear())
        return str(getattr(self, "__qualname__", self._spec.name))

    def prime(self, key: Any, value: Any, /) -> None:
        spec = self._spec
        if isinstance(value, BaseException):
            raise TypeError(
                f"{spec.name}.prime({key!r}, {value!r}): failures are never cached, so an "
                "exception cannot be primed. Prime values only (a load asks the batch function)."
            )
        _, (ck,) = spec.keys_of([key])
        store = active_store()
        counter = spec.counter_in(store)
        if store is None or counter is None:
            return
        with store._lock:
            if store._lookup((spec, ck), touch=False) is not MISSING:
                return
            # Not while the key is loaded (a thread's fetch; a batch of the running loop),
            # as DataLoader's: the load would replace the value with one perhaps older.
            if spec.is_async:
                loading = in_flight(spec, store, ck)
            else:
                fetch = store._flights.get((spec, ck))
                loading = fetch is not None and not fetch.ended
            if not loading:
                store._fill((spec, ck), value, counter, None)

    def clear(self, key: Any, /) -> bool:
        _, (cache_key,) = self._spec.keys_of([key])
        store, entry = active_store(), MemoKey(self._spec, cache_key)
        return store is not None and store.pop(entry, _ABSENT) is not _ABSENT

    def cache_clear(self) -> None:
        store = active_store()
        if store is not None:
            store._remove_owner(self._spec)

    def cache_info(self) -> CacheInfo:
        spec, store = self._spec, active_store()
        hits, misses, currsize = (0, 0, 0) if store is None else store._info(spec, spec.name)
        return CacheInfo(hits, misses, spec.max_entries, currsize)


def _sync_load(spec: _BatchSpec) -> Callable[[Any], Any]:
    """A sync ``load(key)``: a hit is two lookups; a miss, ``load_many([key])[0]``."""
    get_store, key_fn, load_many = _current.get, spec.key_fn, spec.load_many
    bounded = spec.max_entries is not None

    def load(key: Any) -> Any:
        store = get_store()
        if store is not None:
            ck = key if key_fn is None else key_fn(key)
            try:
                sub = store._subs[spec]
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


def _async_load(spec: _BatchSpec) -> Callable[[Any], Any]:
    """An async ``load(key)``: a hit is two lookups and returns the finished future kept
    with the value. ``load`` is ``load_keyed`` without ``key=`` or a bound of its own."""
    get_store, key_fn, thread = _current.get, spec.key_fn, THREAD
    bounded = spec.max_entries is not None

    def load(key: Any) -> Any:
        store = get_store()
        if store is None:
            return outside_one(spec, key)
        try:
            entry = store._subs[spec].get(key)
            if entry is not None:
                store._order.move_to_end(entry[2])  # KeyError: evicted by another thread
        except (KeyError, TypeError, AttributeError):  # a miss; no store yet; unhashable
            entry = None
        if entry is None:
            return miss(spec, store, key, key)
        entry[1].hits += 1
        anchor = entry[3]
        # (loop, its finished future, its thread's dict) while that loop runs here: another loop's
        # gather() and wait_for() refuse it (a later asyncio.run; another thread's loop).
        if anchor is not None and anchor[2] is thread.__dict__ and anchor[0].is_running():
            return anchor[1]
        return ready(store, spec, key, entry)

    def load_keyed(key: Any) -> Any:
        store = get_store()
        if store is None:
            return outside_one(spec, key)
        ck = key if key_fn is None else key_fn(key)
        try:
            sub = store._subs[spec]
            entry = sub.get(ck)
            if entry is not None:
                store._order.move_to_end(entry[2])
                if bounded:
                    sub.move_to_end(ck)
        except (KeyError, TypeError, AttributeError):
            entry = None
        if entry is None:
            return miss(spec, store, key, ck)
        entry[1].hits += 1
        anchor = entry[3]
        if anchor is not None and anchor[2] is thread.__dict__ and anchor[0].is_running():
            return anchor[1]
        return ready(store, spec, ck, entry)

    spec.load = load if key_fn is None and not bounded else load_keyed
    return spec.load


class _Decorator(Protocol):  # sync first: a function returning Any is a sync loader
    @overload
    def __call__(
        self, fn: Callable[[list[K]], Sequence[V | Exception] | Mapping[K, V | Exception]], /
    ) -> BatchLoader[K, V]: ...
    @overload
    def __call__(
        self,
        fn: Callable[[list[K]], Awaitable[Sequence[V | Exception] | Mapping[K, V | Exception]]],
        /,
    ) -> AsyncBatchLoader[K, V]: ...


@overload
def request_batch(
    fn: Callable[[list[K]], Sequence[V | Exception] | Mapping[K, V | Exception]], /
) -> BatchLoader[K, V]: ...


@overload
def request_batch(
    fn: Callable[[list[K]], Awaitable[Sequence[V | Exception] | Mapping[K, V | Exception]]], /
) -> AsyncBatchLoader[K, V]: ...


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

    The batch function takes a list of keys and returns their values: a sequence in the
    same order (an ``Exception`` instance in it fails that key alone) or a mapping from
    key to value (a key it lacks fails with ``KeyError``). Async: the loads made in one
    event-loop tick within a scope share one call; keys cached or in flight are not
    asked for again. Sync: ``load_many`` asks for the keys it lacks in one call. Values
    live in the request store; failures are not cached. Outside any scope nothing is
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
        TypeError: A generator, a method, a function that cannot take one argument
            (the keys), or a bad option value or name (``ValueError`` for a value out of
            range).
    """
    if unknown:
        raise TypeError(unknown_option("request_batch()", next(iter(unknown)), _OPTIONS))
    max_batch_size = check_max_entries(max_batch_size, "request_batch(max_batch_size=...)")
    if key is not None and (  # takes: False if it cannot take one argument
        not callable(key) or is_async_callable(key) or _checks.takes(key, (0,), {}) is False
    ):
        raise TypeError(
            "request_batch(key=...) must be a plain (sync) function of one load key returning "
            f"a hashable cache key, not {type(key).__name__} {key!r}"
        )
    max_entries = check_max_entries(max_entries, "request_batch(max_entries=...)")
    if outside_scope not in ("warn", "call", "raise"):
        raise ValueError(
            f"request_batch(outside_scope=...) must be 'warn' (call uncached, log once), "
            f"'call' (call uncached) or 'raise' (raise NoActiveScope), not {outside_scope!r}"
        )

    def decorate(target: Any) -> Any:
        refuse_task(target, "@request_batch")  # first: a check by isinstance evaluates a proxy
        if isinstance(target, staticmethod):
            target = target.__func__
        refuse_batch_target(target)
        refuse_batch_function(target)
        spec = _BatchSpec(target, max_batch_size, key, max_entries, outside_scope)
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
