"""One function's Redis tier: a request-store miss read from Redis, or computed once
across processes under a Redis lock (``_redis_lock``).

A request-store miss goes through its single-flight, then GETs Redis; a Redis miss
through this process's single-flight, then ``_redis_lock.fetch`` (so is a key of another
Redis type, which the CLAIM replaces). On a Redis error the value is computed here (fail
open). Callers get the bytes, each decoding its own copy.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _flight, _shared_errors
from . import _redis_io as io
from . import _redis_lock as lock
from ._flight import MISSING
from ._records import FLIGHTS
from ._redis_lock import Late
from ._results import is_lazy, refuse_memoized_result
from ._shared_errors import Args, Call, Fn, Kwargs, Raised, computed, computed_async
from ._signals import is_time_limit
from ._stats import Counter
from ._waits import Waited
from .errors import UnhashableArguments

if TYPE_CHECKING:
    from .redis import RedisCache

# This process's single-flight needs a counter; the tier counts for itself.
UNCOUNTED = Counter(timed=False)


class RedisCacheInfo(NamedTuple):
    """A memo's counters in the Redis tier, in this process (``shared_info()``): ``hits``,
    values read from Redis, or got from another caller in this process; ``misses``, values
    computed here; ``errors``, failed Redis operations; ``lock_waits``, misses that waited
    for another caller's lock."""

    hits: int
    misses: int
    errors: int
    lock_waits: int


class RedisTier:
    """The Redis tier of one memoized function, sync or async (``_shared.Tier``)."""

    __slots__ = (
        "__weakref__", "_deletes", "_flights", "_flights_cap", "_lock", "base", "cache",
        "counts", "fn", "keyed", "name", "prefix",
    )  # fmt: skip
    _values_only = True  # as _shared._Guarded's

    def __init__(self, cache: RedisCache, spec: Any, version: str | int) -> None:
        self.cache, self.fn, self.name = cache, spec.fn, spec.name
        self.keyed = spec.key_fn is not None  # the key is key='s value, not the arguments
        self.base = f"{cache.namespace}:{spec.name}:"  # every version's keys start so
        self.prefix = f"{self.base}{version}:"
        self._flights: dict[Hashable, Any] = {}
        self._flights_cap = FLIGHTS  # _records.drop_dead
        self._lock = threading.RLock()  # reentrant, as _flight's caches' (finish, abandon)
        self._deletes = 0  # this process's deletes and clears so far (``_storable``)
        self.counts = dict.fromkeys(cache._totals, 0)  # RedisStats' fields

    def count(self, field: str) -> None:
        """One more of ``field``, here and in the cache's totals (which outlive us)."""
        with self.cache._lock:
            self.counts[field] += 1
            self.cache._totals[field] += 1

    # This process's single-flight (_flight's cache protocol): nothing is kept here (its
    # fills store nothing: _get writes Redis, after _storable).
    def _lookup(self, key: Hashable) -> Any:
        return MISSING

    def _fill(self, key: Hashable, value: Any, counter: Any, extra: Any) -> None:
        pass

    # -- a request-store miss: GET, then this process's single-flight ----------------------

    def run(
        self, store: Any, where: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Any,
        anchor: Any,
    ) -> Any:  # fmt: skip
        key = self.redis_key(where[1], args, kwargs)  # type: ignore[index]
        return _flight.run(store, where, self._get, (key, fn, args, kwargs), {}, counter, anchor)

    async def run_async(
        self, store: Any, where: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Any,
        anchor: Any,
    ) -> Any:  # fmt: skip
        key = self.redis_key(where[1], args, kwargs)  # type: ignore[index]
        return await _flight.run_async(
            store, where, self._get_async, (key, fn, args, kwargs), {}, counter, anchor
        )

    def _get(self, key: str, fn: Fn, args: Args, kwargs: Kwargs) -> Any:
        """Read Redis; what is not there is computed once in this process (its single-flight)."""
        cache, raw = self.cache, None
        conn: io.Conn | None = None if cache._down_until and cache._down() else cache._sync
        if conn is not None:
            try:
                raw = conn.client.get(key)
            except io.FAILURES as exc:
                conn = conn if self._wrong(key, exc) else None  # another type: CLAIMed over
            else:
                value = MISSING if raw is None else self._decoded(raw, key)
                if value is not MISSING:
                    self.count("hits")
                    return value
        call = Call()
        fetch = (self, conn, key, _shared_errors.own(call, fn, False), raw, args, kwargs)
        # No local holds what it computed: an error raised from it, for another
        # request's caller, must not reach the original (``_copy``).
        join: Args = (call, lock.fetch, fetch, {})
        return self._copy(
            call,
            self._again(
                call, _flight.run(self, key, computed, join, {}, UNCOUNTED, None), key, join
            ),
            key,
        )

    async def _get_async(self, key: str, fn: Fn, args: Args, kwargs: Kwargs) -> Any:
        """``_get`` on the running event loop's connections."""
        cache, raw = self.cache, None
        conn = None if cache._down_until and cache._down() else self._loop_conn()
        if conn is not None:
            try:
                async with asyncio.timeout(cache.op_timeout):
                    raw = await conn.client.get(key)
            except io.FAILURES as exc:
                conn = conn if self._wrong(key, exc) else None  # another type: CLAIMed over
            else:
                value = MISSING if raw is None else self._decoded(raw, key)
                if value is not MISSING:
                    self.count("hits")
                    return value
        call = Call()
        fetch = (self, conn, key, _shared_errors.own(call, fn, True), raw, args, kwargs)
        join: Args = (call, lock.fetch_async, fetch, {})
        return self._copy(
            call,
            await self._again_async(
                call,
                await _flight.run_async(self, key, computed_async, join, {}, UNCOUNTED, None),
                key,
                join,
            ),
            key,
        )

    def _again(self, call: Call, got: Any, key: str, join: Args) -> Any:
        """``got``; for a waiter given a ``Late`` value (it may have come after the delete),
        this process's single-flight once more (its next computation began after it came)."""
        if type(got) is not Late or call.ran:
            return got
        return _flight.run(self, key, computed, join, {}, UNCOUNTED, None)

    async def _again_async(self, call: Call, got: Any, key: str, join: Args) -> Any:
        if type(got) is not Late or call.ran:
            return got
        return await _flight.run_async(self, key, computed_async, join, {}, UNCOUNTED, None)

    def _copy(self, call: Call, payload: Any, key: str) -> Any:
        """``call``'s own copy of what this process's single-flight gave (the raiser: its error)."""
        if not call.ran:  # another caller in this process read or computed it: a hit,
            self.count("hits")  # as the in-process tier counts its waiters
        if type(payload) is Raised:
            payload = payload.error_for(call)  # no frame of a waiter holds the original
            try:
                raise payload
            finally:  # this frame, in the error's traceback: a reference cycle
                payload = None
        return self.cache._codec.loads(payload, key)

    def _loop_conn(self) -> io.Conn | None:
        """This event loop's connections (a pool per loop); None under trio (fail open)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.count("errors")
            self.cache._warn(
                "no_asyncio",
                "perrequest: %r is on a redis.asyncio client, which needs an asyncio event "
                "loop, and %s was awaited under another (trio): computed in this request, "
                "never shared through Redis. Under trio, give it the in-process tier "
                "(shared=cachetools.TTLCache(...)), or run on asyncio (anyio's asyncio "
                "backend).",
                self.cache,
                self.name,
            )
            return None
        loops = self.cache._loops
        conn = loops.get(loop)
        if conn is None:  # its connections hold the loop: the closed ones' go now
            for closed in [old for old in list(loops) if old.is_closed()]:
                loops.pop(closed, None)
            conn = loops[loop] = io.Conn(self.cache._client, self.cache.op_timeout, False)
        return conn

    # -- keys, values, and what went wrong ---------------------------------------------------

    def redis_key(self, call_key: object, args: Args, kwargs: Kwargs) -> str:
        """``namespace:module.qualname:version:sha256``, or ``UnhashableArguments``."""
        try:
            return self.prefix + io.digest(call_key)
        except (TypeError, ValueError, RecursionError) as exc:
            raise self._unencodable(args, kwargs, exc) from None

    def _unencodable(self, args: Args, kwargs: Kwargs, exc: Exception) -> UnhashableArguments:
        if self.keyed:  # the arguments are fine: key= returned what has no JSON form
            return UnhashableArguments(
                f"@request_memo {self.name}: its key= function returned a value that cannot be "
                f"part of a Redis key ({exc}): make key= return str, int, float, bool, None or "
                "tuples of them (e.g. key=lambda tags: tuple(sorted(tags)))."
            )
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
            problem = io.key_problem(value)
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
            if is_time_limit(exc):  # a soft time limit: the task's
                raise
            self._refused(key, exc)
            return MISSING

    def _refused(self, key: str, exc: Exception) -> None:
        self.count("bad_values")
        said = isinstance(exc, io.BadValue) or io.wrong_type(exc)
        self.cache._warn(
            "bad_value",
            "perrequest: the value in Redis at %s was refused (%s); treated as a miss "
            "and computed again. Another writer uses this namespace, or the secret or "
            "serializer changed.",
            key,
            exc if said else f"it does not decode: {type(exc).__name__}",
        )

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
        codec = self.cache._codec
        if is_lazy(value):
            refuse_memoized_result(self.fn, value)
        try:  # any error of the value's own code too (a __reduce__, an __init__ unpickling)
            payload = codec.dumps(value, key)
            codec.loads(payload, key)  # a pickle that cannot load fails here, not stored
        except Exception as exc:
            if is_time_limit(exc) or isinstance(exc, MemoryError):  # not the value's
                raise
            fix = "Return a value pickle can store and load (no lambdas, local classes, locks)."
            if codec.name == "json":
                fix = "Return JSON types (dict, list, str, int, float, bool, None), or use "
                fix += "serializer='pickle' with a secret."
            raise TypeError(
                f"@request_memo {self.name} returned a {type(value).__name__} that the RedisCache "
                f"serializer {codec.name!r} cannot store ({exc}). {fix}"
            ) from None
        return payload

    def _storable(
        self, conn: io.Conn | None, payload: bytes, key: str, me: object, deletes: int
    ) -> bytes:
        """``payload`` if it is to be stored; b"" if over ``max_value_bytes`` (counted,
        logged), or if a cache_delete or cache_clear here (``_flight.invalidate``) took
        ``key`` from ``me`` and came after its CLAIM (``deletes``, the count then): maybe
        computed from old data (its lock goes all the same; one before it left it newer)."""
        cache = self.cache
        if len(payload) > cache.max_value_bytes:
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
        if conn is None:
            return b""
        record = self._flights.get(key)
        current = record == me or (type(record) is Waited and record.owner == me)
        return payload if current or deletes == self._deletes else b""

    # -- the memo's cache_clear(), cache_delete(), shared_info() ------------------------------

    def clear(self, spec: object) -> None:
        """``delete`` of every key of this function, every version (SCAN, never KEYS)."""
        with self._lock:
            self._deletes += 1
            for key in list(self._flights):
                _flight.invalidate(self, key)
        self._admin(lambda conn: io.scan_delete(conn, self.base))

    def delete(self, where: Hashable) -> bool:
        """Whether Redis had the entry (and Redis answered). A computation of it in flight
        here is not joined any more and stores nothing (``_storable``); its lock goes with
        the entry, so that the next miss, anywhere, does not wait for it."""
        key = self.redis_key(where[1], (), {})  # type: ignore[index]
        with self._lock:
            self._deletes += 1
            _flight.invalidate(self, key)
        return bool(self._admin(lambda conn: io.unlink(conn, key, self.cache._lock_ms)))

    def _admin(self, command: Any) -> int:
        """``command(conn)`` on the sync pool, sync or async; 0 if Redis failed (counted)."""
        try:
            return int(command(self.cache._sync))
        except io.FAILURES as exc:
            self.cache._failed(self, exc)
            return 0

    def info(self) -> RedisCacheInfo:
        n = self.counts
        return RedisCacheInfo(n["hits"], n["misses"], n["errors"], n["lock_waits"])
