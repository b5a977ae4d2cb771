"""The shared tier: a bounded process-wide cache behind the request store.

``@request_memo(shared=cache)`` looks in the request store first, then in
``cache``, and only then computes, filling both. The request store makes
reads repeatable within a request even if the shared entry expires meanwhile.
An unbounded mapping is refused: that is the leak this library prevents.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from typing import Any

from ._flight import MISSING, SingleFlight

# One lock per shared cache, so functions that share a cache share its lock.
# Caches are mappings, so unhashable: keyed by id, and dropped with the cache.
_locks: dict[int, threading.RLock] = {}
_locks_guard = threading.Lock()
# A cache that cannot be weakly referenced would never be dropped from _locks:
# all such caches share this one lock instead.
_fallback_lock = threading.RLock()


def _lock_for(cache: object) -> threading.RLock:
    with _locks_guard:
        lock = _locks.get(id(cache))
        if lock is None:
            try:
                weakref.finalize(cache, _locks.pop, id(cache), None)
            except TypeError:
                return _fallback_lock
            lock = _locks[id(cache)] = threading.RLock()
        return lock


def check_shared(cache: object) -> MutableMapping[Hashable, Any]:
    """Accept a bounded mapping (a cachetools cache, or any mapping with a ``maxsize``)."""
    fix = (
        "Use a bounded cache with an eviction policy, such as "
        "cachetools.LRUCache(maxsize=10_000) or cachetools.TTLCache(maxsize=10_000, ttl=60)."
    )
    if not isinstance(cache, MutableMapping):
        raise TypeError(
            f"request_memo(shared=...) needs a mutable mapping with a maxsize, not "
            f"{type(cache).__name__}. {fix}"
        )
    maxsize = getattr(cache, "maxsize", None)
    if maxsize is None:
        raise TypeError(
            f"request_memo(shared=...) refuses {type(cache).__name__}: it has no "
            "maxsize, so nothing would ever be removed from it and it would grow for the "
            f"life of the process (the leak perrequest exists to prevent). {fix}"
        )
    if (
        isinstance(maxsize, bool)
        or not isinstance(maxsize, (int, float))
        or not math.isfinite(maxsize)
        or maxsize <= 0
    ):
        raise ValueError(
            f"request_memo(shared=...): maxsize must be a positive finite number, "
            f"not {maxsize!r}. {fix}"
        )
    return cache


class SharedTier:
    """One function's view of a shared cache: thread-safe, single-flight, counted.

    The counters are process-wide, like the cache itself.
    """

    __slots__ = ("_flights", "_lock", "cache", "hits", "misses")

    def __init__(self, cache: MutableMapping[Hashable, Any]) -> None:
        self.cache = cache
        self._lock = _lock_for(cache)
        self._flights = SingleFlight(self._lock, detach=True)
        self.hits = 0
        self.misses = 0

    def _lookup(self, key: Hashable) -> Any:
        return self.cache.get(key, MISSING)

    def _fill(self, key: Hashable, value: Any) -> None:
        # Called with the lock held. cachetools refuses a value larger than the
        # whole cache: skip caching it.
        with contextlib.suppress(ValueError):
            self.cache[key] = value

    def peek(self, key: Hashable) -> Any:
        """The shared value at ``key`` or ``MISSING``, counting a hit only when found."""
        with self._lock:
            try:
                value = self.cache[key]  # not .get(): cachetools' get looks the key up twice
            except KeyError:
                return MISSING
            self.hits += 1
            return value

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The shared value at ``key``, computed once across requests and threads."""
        return self._flights.run(
            key, lambda: self._lookup(key), lambda value: self._fill(key, value), compute, self
        )

    async def get_async(self, key: Hashable, compute: Callable[[], Awaitable[Any]]) -> Any:
        """The async twin of ``get``."""
        return await self._flights.run_async(
            key, lambda: self._lookup(key), lambda value: self._fill(key, value), compute, self
        )

    def clear(self, token: object) -> None:
        """Drop one function's entries (its keys start with ``token``)."""
        with self._lock:
            for key in [k for k in self.cache if type(k) is tuple and k and k[0] is token]:
                self.cache.pop(key, None)
