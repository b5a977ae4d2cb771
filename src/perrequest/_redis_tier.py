"""One function's Redis tier: a request-store miss read from Redis, or computed once
across processes under a Redis lock.

A miss in the request store goes through its single-flight, then GETs Redis. A
Redis miss goes through this process's single-flight, then CLAIM: a script that
returns the value or takes the lock (``SET NX PX``). The holder computes, then
stores the value and releases the lock in one script; the others CLAIM again
until the value is there, the lock is free (its holder died: one takes it) or
``lock_timeout`` has passed (they compute too). On a Redis error the value is
computed here (fail open). Single-flight hands its callers the bytes, and each
decodes a copy of its own, so no two requests ever hold the same object.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _flight
from . import _redis_io as io
from ._checks import LAZY, refuse_memoized_result
from ._flight import MISSING, Waited
from ._redis_io import BadValue, digest, key_problem
from ._shared_errors import Args, Call, Fn, Kwargs, Raised, computed
from ._stats import Counter
from .errors import UnhashableArguments

if TYPE_CHECKING:
    from .redis import RedisCache

# This process's single-flight needs a counter; the tier counts for itself.
UNCOUNTED = Counter(timed=False)
FIRST_PAUSE, MAX_PAUSE = 0.002, 0.05  # seconds between looks at another's lock
now = time.monotonic
_thread_id = threading.get_ident


class RedisCacheInfo(NamedTuple):
    """``CacheInfo`` plus the Redis tier's counters in this process, for one function.

    ``shared_hits``: values read from Redis, or got from another caller in this
    process; ``shared_misses``: values computed here; ``shared_errors``: failed
    Redis operations; ``shared_lock_waits``: misses that waited for another
    caller's lock. Zeros outside a scope, as every ``cache_info()``.
    """

    hits: int
    misses: int
    maxsize: int | None
    currsize: int
    shared_hits: int
    shared_misses: int
    shared_errors: int
    shared_lock_waits: int


class RedisTier:
    """The Redis tier of one sync memoized function (``_shared.Tier``)."""

    __slots__ = (
        "__weakref__", "_flights", "_lock", "bad_values", "base", "cache", "errors", "fn", "hits",
        "lock_timeouts", "lock_waits", "misses", "name", "prefix", "too_large",
    )  # fmt: skip

    def __init__(self, cache: RedisCache, spec: Any, version: str | int) -> None:
        self.cache, self.fn, self.name = cache, spec.fn, spec.name
        self.base = f"{cache.namespace}:{spec.name}:"  # every version's keys start so
        self.prefix = f"{self.base}{version}:"
        self._flights: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.errors = self.lock_waits = 0
        self.lock_timeouts = self.too_large = self.bad_values = 0

    def count(self, field: str) -> None:
        """One more of ``field``, here and in the cache's totals (which outlive us), under
        the cache's lock: threads count at once."""
        with self.cache._lock:
            setattr(self, field, getattr(self, field) + 1)
            self.cache._totals[field] += 1

    # This process's single-flight (_flight's cache protocol): nothing is kept here.
    def _lookup(self, key: Hashable) -> Any:
        return MISSING

    def _fill(self, key: Hashable, value: Any, counter: Any, extra: Any) -> None:
        pass

    def redis_key(self, call_key: object, args: Args, kwargs: Kwargs) -> str:
        """``namespace:module.qualname:version:sha256``; ``UnhashableArguments`` when the
        arguments have no canonical JSON form."""
        try:
            return self.prefix + digest(call_key)
        except (TypeError, ValueError, RecursionError) as exc:
            raise self._unencodable(args, kwargs, exc) from None

    def _unencodable(self, args: Args, kwargs: Kwargs, exc: Exception) -> UnhashableArguments:
        fix = (
            "Redis keys are built from the arguments' JSON form (str, int, float, bool, "
            "None and tuples of them). Give the decorator key=, a function of the same "
            "arguments returning such a value (e.g. key=lambda day: day.isoformat())."
        )
        try:
            bound = inspect.signature(self.fn).bind(*args, **kwargs).arguments.items()
        except (TypeError, ValueError):
            bound = {}.items()
        for name, value in bound:
            problem = key_problem(value)
            if problem is not None:
                return UnhashableArguments(
                    f"@request_memo {self.name}: argument {name!r} ({problem}) cannot be part "
                    f"of a Redis key. {fix}"
                )
        return UnhashableArguments(
            f"@request_memo {self.name}: the call's key cannot be encoded for Redis ({exc}). {fix}"
        )

    def _decoded(self, raw: Any, key: str) -> Any:
        """The value in ``raw``, or MISSING (logged, counted) if it does not verify or decode."""
        try:
            return self.cache._codec.loads(raw, key)
        except Exception as exc:  # a bad signature, or not JSON (or pickle) at all
            self._refused(key, exc)
            return MISSING

    def _refused(self, key: str, exc: Exception) -> None:
        self.count("bad_values")
        said = isinstance(exc, BadValue) or io.wrong_type(exc)
        self.cache._warn(
            "bad_value",
            "perrequest: the value in Redis at %s was refused (%s); treated as a miss "
            "and computed again. Another writer uses this namespace, or the secret or "
            "serializer changed.",
            key,
            exc if said else f"it does not decode: {type(exc).__name__}",
        )

    def _claimed(self, reply: Any, key: str) -> bool | None:
        """What a CLAIM reply means: True, the lock is ours; False, the value is there but
        bad (compute, overwrite); None, the value is there (counted) or another holds the
        lock (``reply[0] == 0``)."""
        if reply[0] == 3:  # taken over a bad lock: a bad value
            self._refused(key + io.LOCK, BadValue("a lock of another type, or without expiry"))
        if reply[0] >= 2:
            return True
        if reply[0] == 1:
            if self._decoded(reply[1], key) is MISSING:
                return False
            self.count("hits")
        return None

    def _wrong(self, key: str, exc: Exception) -> bool:
        """Whether a failed command failed for this key alone (it holds another type: a
        bad value, to overwrite); if not, Redis failed (counted, and left alone a while)."""
        if io.wrong_type(exc):
            self._refused(key, exc)
            return True
        self.cache._failed(self, exc)
        return False

    def _encoded(self, value: Any, key: str) -> bytes:
        """The value's bytes, which every caller decodes (they are checked to decode)."""
        cache = self.cache
        if type(value) in LAZY:
            refuse_memoized_result(self.fn, value)
        try:
            payload = cache._codec.dumps(value, key)
        except (TypeError, ValueError, RecursionError) as exc:  # the last: nested too deep
            raise TypeError(
                f"@request_memo {self.name} returned a {type(value).__name__} that the "
                f"RedisCache serializer {cache._codec.name!r} cannot store ({exc}). Return "
                "JSON types (dict, list, str, int, float, bool, None), or use "
                "serializer='pickle' with a secret."
            ) from None
        cache._codec.loads(payload, key)  # a pickle that cannot load fails here, not stored
        return payload

    def _stored(self, payload: bytes) -> bytes:
        """``payload`` if it may be stored; b"" if over ``max_value_bytes`` (counted, logged)."""
        cache = self.cache
        if payload and len(payload) > cache.max_value_bytes:
            self.count("too_large")
            cache._warn(
                "too_large",
                "perrequest: %s returned %d bytes, over max_value_bytes=%d: computed, not "
                "stored in Redis.",
                self.name,
                len(payload),
                cache.max_value_bytes,
            )
            return b""
        return payload

    def _waited(self, deadline: float, pause: float) -> float:
        """Seconds left to wait for another caller's lock; counts waits and timeouts."""
        if pause == FIRST_PAUSE:
            self.count("lock_waits")
        left = deadline - now()
        if left <= 0:
            self.count("lock_timeouts")
        return left

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
        key = self.redis_key(where[1], args, kwargs)  # type: ignore[index]
        return _flight.run(store, where, self._get, (key, fn, args, kwargs), {}, counter, anchor)

    def _get(self, key: str, fn: Fn, args: Args, kwargs: Kwargs) -> Any:
        """Read Redis; what is not there is computed once in this process (its single-flight)."""
        cache, claim, store = self.cache, True, True
        if cache._down_until and cache._down_until > now():  # no clock read while up
            claim = store = False
        else:
            try:
                raw = cache._client.get(key)
            except Exception as exc:
                claim, store = False, self._wrong(key, exc)
            else:
                if raw is not None:
                    value = self._decoded(raw, key)
                    if value is not MISSING:
                        self.count("hits")
                        return value
                    claim = False
        call, fetch = Call(), (claim, store, key, fn, args, kwargs)
        payload = _flight.run(
            self, key, computed, (call, self._fetch, fetch, {}), {}, UNCOUNTED, None
        )
        if not call.ran:  # another caller in this process read or computed it: a hit,
            self.count("hits")  # as the in-process tier counts its waiters
        if type(payload) is Raised:
            payload = payload.error_for(call)  # a copy for another request's waiter
            raise payload
        return cache._codec.loads(payload, key)  # a copy of its own for each caller

    def _fetch(
        self,
        claim: bool,
        store: bool,
        key: str,
        fn: Fn,
        args: Args,
        kwargs: Kwargs,
    ) -> Any:
        """The value's bytes: under the lock if ``claim``, stored in Redis if ``store``."""
        cache, token = self.cache, os.urandom(9).hex()
        deadline, pause = now() + cache.lock_timeout, FIRST_PAUSE
        while claim:
            try:
                reply = cache._sync.claim(keys=[key, key + io.LOCK], args=[token, cache._lease_ms])
                if reply[0] >= 2 and cache._lease_ms < cache._lock_ms:  # ours: a lease
                    cache._sync.extend(keys=[key + io.LOCK], args=[token, cache._lock_ms])
            except Exception as exc:
                store = self._wrong(key, exc)
                break
            ours = self._claimed(reply, key)
            if ours is not None:
                return self._compute(True, token if ours else "", key, fn, args, kwargs)
            if reply[0] == 1:
                return reply[1]
            left = self._waited(deadline, pause)
            if left <= 0:
                break
            time.sleep(min(pause, left))
            pause = min(pause * 2, MAX_PAUSE)
        return self._compute(store, "", key, fn, args, kwargs)

    def _compute(
        self,
        store: bool,
        token: str,
        key: str,
        fn: Fn,
        args: Args,
        kwargs: Kwargs,
    ) -> Any:
        """Compute here, store the value (if ``store``) and release the lock (``token``)."""
        self.count("misses")
        payload = b""
        try:
            payload = self._encoded(fn(*args, **kwargs), key)
        finally:
            stored = self._stored(payload)
            if stored and store and not self._current(key, _thread_id()):
                stored = b""  # invalidated meanwhile: the lock is released all the same
            if store and (stored or token):
                try:
                    self._store(key, stored, token)
                except Exception as exc:
                    self._wrong(key, exc)
        return payload

    def _current(self, key: str, me: object) -> bool:
        """Whether ``me`` still computes ``key`` for this process: after a cache_delete
        or cache_clear (``_flight.invalidate``), its value, maybe computed from old data,
        is not stored (its lock is released all the same)."""
        record = self._flights.get(key)
        return record == me or (type(record) is Waited and record.owner == me)

    def _store(self, key: str, stored: bytes, token: str) -> None:
        """Store the value and release our lock. A lock left behind would make the key's
        next miss, in any process, wait ``lock_timeout``: so with a lock, a busy pool is
        waited for, up to ``op_timeout`` more."""
        cache, keys = self.cache, [key, key + io.LOCK]
        deadline, pause = now() + cache.op_timeout, FIRST_PAUSE
        while True:
            try:
                return cache._sync.store(keys=keys, args=[stored, cache._ttl_ms, token])  # type: ignore[no-any-return]
            except Exception as exc:
                if not (token and io.exhausted(exc)) or now() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)

    def clear(self, spec: object) -> None:
        """Delete this function's keys in the namespace, every version (SCAN, never KEYS),
        and their locks: as ``delete``, for every key."""
        with self._lock:
            for key in list(self._flights):
                _flight.invalidate(self, key)
        self.cache._clear(self, self.base)

    def delete(self, where: Hashable) -> bool:
        """Whether Redis had the entry (and Redis answered). A computation of it in flight
        here is not joined any more and stores nothing (``_current``); its lock goes with
        the entry, so that the next miss, anywhere, does not wait for it."""
        key = self.redis_key(where[1], (), {})  # type: ignore[index]
        with self._lock:
            _flight.invalidate(self, key)
        return self.cache._delete(self, key)

    def info(
        self, hits: int, misses: int, maxsize: int | None, currsize: int, in_scope: bool
    ) -> RedisCacheInfo:
        if not in_scope:
            return RedisCacheInfo(hits, misses, maxsize, 0, 0, 0, 0, 0)
        return RedisCacheInfo(
            hits, misses, maxsize, currsize, self.hits, self.misses, self.errors, self.lock_waits
        )
