"""The shared tier: a bounded process-wide cache behind the request store.

``@request_memo(shared=cache)`` looks in the request store first, then in
``cache``, and only then computes, filling both. The request store makes
reads repeatable within a request even if the shared entry expires meanwhile.
An unbounded mapping is refused: that is the leak this library prevents.

A computation's error reaches waiters in other requests as a copy, never as the
original object (``_shared_errors``).

A backend that is not a mapping (``perrequest.redis.RedisCache``) brings its
own tier: an object with ``_make_tier(spec, version)`` returning a ``Tier``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from typing import Any, Protocol, TypeVar

from . import _flight
from ._flight import MISSING
from ._records import FLIGHTS
from ._shared_errors import Args, Call, Fn, Kwargs, Raised, computed, computed_async
from ._shared_errors import SharedComputationError as SharedComputationError
from ._signals import is_time_limit
from ._typing import SharedCacheInfo

_C = TypeVar("_C")
_R = TypeVar("_R")
logger = logging.getLogger("perrequest")

# The in-process shared caches in use, by id, each with its own lock: functions sharing a
# cache share its lock (cachetools caches are not thread-safe), and a slow operation on
# one cache (a TTLCache expiring many entries as it stores) never holds up the others.
# Its functions' tiers hold an entry, which holds its cache: an id here is always its
# cache's, and the entry goes with the last of them, whether the cache has weak
# references or not.
_guarded: weakref.WeakValueDictionary[int, _Guarded] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()
_held: list[_Guarded] = []  # during a fork


def _forking() -> None:
    """Before a fork: wait for the cache operations in progress (never a computation), so
    that the child gets every cache whole, not halfway through another thread's store."""
    _registry_lock.acquire()
    _held[:] = _guarded.values()
    for guarded in _held:
        guarded._lock.acquire()


def _forked_parent() -> None:
    for guarded in _held:
        guarded._lock.release()
    _held.clear()
    _registry_lock.release()


def _forked() -> None:
    """In a child made by fork: the threads computing values stayed in the parent, so
    their records go (a waiter would wait for them forever); the locks are new."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for guarded in _held:
        guarded._lock, guarded._flights, guarded._flights_cap = threading.RLock(), {}, FLIGHTS
    _held.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(before=_forking, after_in_parent=_forked_parent, after_in_child=_forked)


# What a tier's run/run_async are: _flight.run's signature.
_Run = Callable[[Any, Hashable, Fn, Args, Kwargs, Any, Any], _R]


class Tier(Protocol):
    """A ``shared=`` memo's tier: ``run``/``run_async`` compute a request-store miss
    (``_flight.run``'s signature); ``info`` is the memo's ``shared_info()``."""

    @property
    def run(self) -> _Run[Any]: ...
    @property
    def run_async(self) -> _Run[Awaitable[Any]]: ...
    def clear(self, spec: object) -> None: ...
    def delete(self, where: Hashable) -> bool: ...  # whether the shared tier had it
    def info(self) -> tuple[Any, ...]: ...


def make_tier(shared: object, spec: Any, version: str | int | None) -> Tier:
    """The tier of one function: the backend's own, or ``SharedTier`` for a mapping
    (which starts empty in every process, so it has no use for a version)."""
    if spec.is_method and spec.key_fn is None:
        raise TypeError(
            f"@request_memo(shared=...) on method {spec.name} needs key=: instances are "
            "keyed by identity within a request, which means nothing across requests. "
            "Give key=, a function of (self, ...) returning a hashable key that "
            "identifies the instance's data, e.g. key=lambda self, x: (self.id, x)."
        )
    factory = getattr(shared, "_make_tier", None)
    if factory is not None:
        return factory(spec, version)  # type: ignore[no-any-return]
    return SharedTier(shared)  # type: ignore[arg-type]


def _check_version(version: object, shared: object) -> str | int | None:
    """``request_memo(version=...)``: a str or int naming the shape of the function's
    values in a shared cache, and only with a ``RedisCache``."""
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, (str, int)) or version == "":
        raise TypeError(
            f"request_memo(version=...) must be a non-empty str or an int, not {version!r}. "
            "Change it when the function's values change shape, so that processes running "
            "the new code never read values the old code wrote."
        )
    if shared is None:
        raise TypeError(
            "request_memo(version=...) versions the function's entries in a shared cache, "
            "and this memo has none: add shared=RedisCache(...), or drop version=."
        )
    if not hasattr(shared, "_make_tier"):
        raise TypeError(
            f"request_memo(version=...) versions the function's entries in Redis, which "
            f"outlive the code that wrote them; this memo's {type(shared).__name__} lives in "
            "one process and starts empty with the new code, so version= would do nothing. "
            "Drop version=, or use shared=RedisCache(...)."
        )
    return version


_BOUNDED = "cachetools.LRUCache(maxsize=10_000) or cachetools.TTLCache(maxsize=10_000, ttl=60)"


def check_shared(cache: _C, version: object = None) -> tuple[_C, str | int | None]:
    """``request_memo(shared=..., version=...)``: a backend with a tier of its own
    (``RedisCache``), a bounded mapping (a cachetools cache, or any mapping with a
    ``maxsize``), or None; and its version."""
    if isinstance(cache, type):  # a class's unbound _make_tier is callable too
        redis = "RedisCache(client, ttl=300, namespace='shop')"
        example = redis if hasattr(cache, "_make_tier") else _BOUNDED
        raise TypeError(
            f"request_memo(shared={cache.__qualname__}) got the class, not a cache: shared= "
            f"needs an instance, made once and given to every function that shares it, e.g. "
            f"shared={example}."
        )
    version = _check_version(version, cache)
    if cache is None or callable(getattr(cache, "_make_tier", None)):
        return cache, version
    fix = f"Use a bounded cache with an eviction policy, such as {_BOUNDED}."
    if not isinstance(cache, MutableMapping):
        raise TypeError(
            f"request_memo(shared=...) needs a mutable mapping with a maxsize, or a "
            f"perrequest.redis.RedisCache, not {type(cache).__name__}. {fix} Across "
            "processes: perrequest.redis.RedisCache(client, ttl=..., namespace=...)."
        )
    try:
        maxsize = getattr(cache, "maxsize", None)
    except Exception as exc:  # a property of its own that fails: say which
        raise TypeError(
            f"request_memo(shared=...): reading {type(cache).__name__}.maxsize "
            f"raised {exc!r}, so its bound is unknown. {fix}"
        ) from exc
    if maxsize is None:
        raise TypeError(
            f"request_memo(shared=...) refuses {type(cache).__name__}: it has no "
            "maxsize, so nothing would ever be removed from it and it would grow for the "
            f"life of the process (the leak perrequest exists to prevent). {fix}"
        )
    number = isinstance(maxsize, (int, float)) and not isinstance(maxsize, bool)
    if not number or not 1 <= maxsize <= sys.maxsize:  # NaN and infinity too
        raise ValueError(
            f"request_memo(shared=...): maxsize must be a finite number from 1 (below it "
            f"the cache refuses every value, and nothing is shared) to sys.maxsize (a bound "
            f"some process could reach), not {maxsize!r}. {fix}"
        )
    return cache, version


class _Guarded:
    """One in-process shared cache, its lock and what is computing for it
    (``_flight.Cache``), for every function using it. The lock is held for one cache
    operation at a time, never while computing."""

    __slots__ = ("__weakref__", "_deletes", "_flights", "_flights_cap", "_lock", "cache")
    _values_only = True  # its function's errors reach waiters as values (_waits.outcome_of)

    def __init__(self, cache: MutableMapping[Hashable, Any]) -> None:
        self.cache = cache
        self._lock = threading.RLock()
        self._flights: dict[Hashable, Any] = {}
        self._flights_cap = FLIGHTS  # _records.drop_dead
        self._deletes = 0  # for computations not in _flights (trio: _flight._keep)

    def _lookup(self, key: Hashable) -> Any:
        try:
            return self.cache[key]  # not .get(): cachetools' get looks the key up twice
        except KeyError:
            return MISSING
        except Exception as exc:  # a colliding key's __eq__ raising: a miss (waiters in
            if is_time_limit(exc):  # other requests must never get this error:
                raise  # it holds this frame); a soft time limit is the task's
            return MISSING

    def _fill(self, key: Hashable, value: Any, counter: SharedTier, extra: object) -> None:
        if type(value) is Raised:  # exceptions are not cached
            return
        try:
            self.cache[key] = value
        except ValueError:  # cachetools refuses a value larger than the whole cache
            pass
        except Exception as exc:  # its waiters are in other requests: never hand them this
            if is_time_limit(exc):  # error; a soft time limit is the task's
                raise
            if not counter.refused:  # the cache's own fault (a getsizeof that raises): say so
                counter.refused = True
                logger.exception(
                    "perrequest: the shared cache %r could not store a value (logged once "
                    "per function); the value was returned uncached. A KeyError or TypeError "
                    "here is most often a key whose hash changed after it was stored (a model "
                    "instance saved, its pk assigned): the cache cannot evict it any more. "
                    "Key such functions by an immutable value: key=lambda obj: obj.pk",
                    type(self.cache).__name__,
                )


class SharedTier:
    """One function's view of a shared cache: thread-safe, single-flight, counted
    (process-wide, like the cache itself)."""

    __slots__ = ("_guarded", "compute_s", "hits", "maxsize", "misses", "refused")

    timed = False  # nobody reads the shared tier's compute time

    def __init__(self, cache: MutableMapping[Hashable, Any]) -> None:
        self.maxsize = int(cache.maxsize)  # type: ignore[attr-defined]
        with _registry_lock:
            guarded = _guarded.get(id(cache))
            if guarded is None:
                guarded = _guarded[id(cache)] = _Guarded(cache)
        self._guarded = guarded
        self.hits = self.misses = 0
        self.compute_s, self.refused = 0.0, False

    def get(self, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs) -> Any:
        """The shared value at ``key``, computed once across requests and threads."""
        value = self._hit(key)
        if value is MISSING:
            call = Call()
            value = _flight.run(
                self._guarded, key, computed, (call, fn, args, kwargs), {}, self, None
            )
            if type(value) is Raised:
                value = value.error_for(call)  # no frame of a waiter holds the original
                try:
                    raise value
                finally:  # this frame, in the error's traceback: a reference cycle
                    value = None
        return value

    def _hit(self, key: Hashable) -> Any:
        guarded = self._guarded
        with guarded._lock:  # cachetools caches reorder on reads: never read without it
            value = guarded._lookup(key)
            if value is not MISSING:
                self.hits += 1
            return value

    async def get_async(self, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs) -> Any:
        """The async twin of ``get``."""
        value = self._hit(key)
        if value is MISSING:
            call = Call()
            value = await _flight.run_async(
                self._guarded, key, computed_async, (call, fn, args, kwargs), {}, self, None
            )
            if type(value) is Raised:
                value = value.error_for(call)
                try:
                    raise value
                finally:  # as in get
                    value = None
        return value

    def run(
        self,
        store: Any,
        where: Hashable,
        fn: Fn,
        args: Args,
        kwargs: Kwargs,
        counter: Any,
        anchor: Any,
    ) -> Any:
        """A request-store miss: single-flight in the request store, computed through
        this cache, once across requests (``_flight.run``'s signature)."""
        return _flight.run(store, where, self.get, (where, fn, args, kwargs), {}, counter, anchor)

    async def run_async(
        self,
        store: Any,
        where: Hashable,
        fn: Fn,
        args: Args,
        kwargs: Kwargs,
        counter: Any,
        anchor: Any,
    ) -> Any:
        return await _flight.run_async(
            store, where, self.get_async, (where, fn, args, kwargs), {}, counter, anchor
        )

    def clear(self, spec: object) -> None:
        """Drop one function's entries (their keys are ``(spec, key)``), and what is in
        flight for them: it stores nothing (``_flight.invalidate``). Other functions may
        use the cache: the lock is held for single steps, a copy of the keys, then one
        removal at a time."""
        guarded, cache = self._guarded, self._guarded.cache
        with guarded._lock:
            guarded._deletes += 1
            # A generator, not a list comprehension (inlined): 3.13 skipped the with for a
            # signal at its back edge (python/cpython#130279), the lock held for good.
            mine = (k for k in list(guarded._flights) if type(k) is tuple and k[0] is spec)
            for where in mine:
                _flight.invalidate(guarded, where)
            keys = list(cache)
        for key in keys:
            if type(key) is tuple and key and key[0] is spec:
                with guarded._lock, contextlib.suppress(Exception):  # a key whose hash changed
                    cache.pop(key, None)

    def delete(self, key: Hashable) -> bool:
        guarded = self._guarded
        with guarded._lock:
            guarded._deletes += 1
            _flight.invalidate(guarded, key)
            return guarded.cache.pop(key, MISSING) is not MISSING

    def info(self) -> SharedCacheInfo:
        guarded = self._guarded
        with guarded._lock:  # a TTLCache's len() removes the expired entries first
            size = len(guarded.cache)
        return SharedCacheInfo(self.hits, self.misses, self.maxsize, size)
