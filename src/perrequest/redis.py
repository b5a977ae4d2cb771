"""``RedisCache``: a ``shared=`` tier across processes and machines, on Redis or Valkey.

``@request_memo(shared=RedisCache(client, ttl=60, namespace="shop"))`` puts
Redis behind the request store: a request-store miss reads Redis, and a Redis
miss is computed once across every process that shares the server (a lock
taken with ``SET NX PX``), written with a TTL, and copied into the request
store, so reads within a request stay repeatable. Redis down, slow or full
never fails a request: the value is then computed here (fail open).

Needs the ``redis`` package: ``pip install 'perrequest[redis]'``.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import math
import os
import threading
import time
import weakref
from typing import Any, NamedTuple

from . import _redis_io as io
from ._checks import explains_options
from ._records import FLIGHTS
from ._redis_io import Codec
from ._redis_tier import RedisCacheInfo, RedisTier
from ._typing import RedisMemoizedFunction

__all__ = ["RedisCache", "RedisCacheInfo", "RedisMemoizedFunction", "RedisStats"]

logger = logging.getLogger("perrequest")
_now = time.monotonic


class RedisStats(NamedTuple):
    """A ``RedisCache``'s counters in this process, summed over its functions."""

    hits: int  # values read from Redis, or waited for in this process
    misses: int  # values computed in this process
    errors: int  # Redis operations that failed (the value was computed here)
    lock_waits: int  # misses that waited for another caller's lock
    lock_timeouts: int  # waits that gave up after lock_timeout and computed
    too_large: int  # values over max_value_bytes: computed, not stored
    bad_values: int  # values that did not verify or decode: treated as misses


# The most each option may be, and why: beyond, Redis (or the socket) refuses every
# command at run time, and the tier would be silently off.
_MOST = {
    "ttl": (365 * 86400, "seconds, a year: longer is as good as no expiry"),
    "lock_timeout": (3600, "seconds, an hour: a request may wait this long for a value"),
    "op_timeout": (60, "seconds: a cache must answer fast or not at all"),
    "max_value_bytes": (512 * 1024 * 1024, "bytes, 512 MiB: the largest value Redis stores"),
}


def _number(name: str, value: object, *, zero: bool = False) -> float:
    """A finite number of seconds (or bytes), positive (or zero if ``zero``), at most
    what ``_MOST`` says."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"RedisCache({name}=...) must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "zero or more" if zero else "more than zero"
        raise ValueError(f"RedisCache({name}=...) must be finite and {least}, not {value!r}")
    most, why = _MOST.get(name, (math.inf, ""))
    if value > most:
        raise ValueError(f"RedisCache({name}=...) must be at most {most} ({why}), not {value!r}")
    return value


def _check_ttl(ttl: object) -> float:
    if ttl is None or ttl == 0:
        raise ValueError(
            f"RedisCache(ttl={ttl!r}): every entry needs an expiry. An entry without one "
            "stays in Redis until evicted, and the set of keys only grows: the leak "
            "perrequest exists to prevent. Give ttl= in seconds (e.g. ttl=300), and set a "
            "maxmemory and an eviction policy on the server as a second bound."
        )
    ttl = _number("ttl", ttl)
    if ttl < 0.001:
        raise ValueError(f"RedisCache(ttl={ttl!r}): Redis expiries are in milliseconds")
    return ttl


def _code(fn: object) -> object:
    """The code behind ``fn`` (through ``functools.wraps``), or None if it has none."""
    return getattr(inspect.unwrap(fn), "__code__", None)  # type: ignore[arg-type]


def _name_problem(fn: object) -> str | None:
    """Why ``fn`` cannot name its Redis keys, or None. The keys hold ``module.qualname``,
    so a callable whose name others share would share their values: every lambda is
    ``<lambda>``; a partial or a callable object has only its class's name."""
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        return f"a {type(fn).__name__} object has no __qualname__ of its own"
    if "<lambda>" in qualname:
        return "every lambda is named <lambda>"
    return None


def _state_problem(fn: object) -> str | None:
    """Why ``fn``'s values depend on more than its name and arguments, or None: a bound
    method's instance is not in the key, so one instance would read another's values."""
    if inspect.ismethod(fn):
        return (
            "a bound method's instance is not in its Redis keys. Give key=, a function of "
            "the same arguments returning what tells instances apart too"
        )
    return None


def check_version(version: object, where: str) -> str | int:
    if isinstance(version, bool) or not isinstance(version, (str, int)) or version == "":
        raise TypeError(f"{where} must be a non-empty str or an int, not {version!r}")
    if ":" in str(version) or any(c.isspace() for c in str(version)):
        raise ValueError(f"{where} must not contain ':' or spaces, not {version!r}")
    return version


def _forked() -> None:
    """In a child made by fork: the threads computing values stayed in the parent, so
    their records go (a waiter would wait for them forever), with the locks they may
    have held."""
    for cache in list(_caches):
        cache._lock = threading.RLock()  # (no loop's connections: asyncio runs none here)
        for tier in list(cache._tiers):
            tier._lock, tier._flights, tier._flights_cap = threading.RLock(), {}, FLIGHTS


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forked)


class RedisCache:
    """A ``shared=`` backend on Redis: bounded (``ttl``), safe (JSON, or signed pickle),
    computed once per expiry across processes, and never the cause of a failed request.

    Redis keys are ``namespace:module.qualname:version:sha256(arguments as JSON)``, so
    a function's name must be its own: lambdas, partials, callable objects and another
    live function of that name and code in one cache are refused at decoration time.
    The cache sends its commands through a connection pool of its own, with the
    client's connection settings but without retries, bounded by ``op_timeout``.
    After a Redis error the value is computed here, a WARNING logged (at most
    once per ``log_interval``), and Redis left alone for ``retry_after``.

    Args:
        client: A ``redis.Redis`` (for sync functions) or a ``redis.asyncio.Redis``
            (for async ones) on a plain connection pool: where Redis is, and who
            connects.
        ttl: Seconds every value lives in Redis; required and positive.
        namespace: This application's keys, the start of every key.
        serializer: ``"json"`` (loading runs no code) or ``"pickle"`` (needs a
            secret).
        secret: Signs every value (HMAC-SHA256 over its key and bytes); a value
            that does not verify is a miss. Required for pickle; 16 bytes or more.
        version: Part of every key (default ``1``); ``request_memo(version=...)``
            overrides it per function.
        lock_timeout: Seconds a miss's lock lives, and the longest another caller
            waits for it before computing itself.
        op_timeout: Seconds each Redis operation may take, start to finish.
        max_value_bytes: Larger values are returned, not stored.
        retry_after: Seconds Redis is left alone after an error (0: never).
        log_interval: Seconds between two WARNINGs of the same kind.
    """

    @explains_options("RedisCache()")
    def __init__(
        self,
        client: Any,
        *,
        ttl: float,
        namespace: str,
        serializer: str = "json",
        secret: str | bytes | None = None,
        version: str | int = 1,
        lock_timeout: float = 5.0,
        op_timeout: float = 0.5,
        max_value_bytes: int = 1_048_576,
        retry_after: float = 1.0,
        log_interval: float = 60.0,
    ) -> None:
        self.is_async: bool = io.check_client(client)
        self.ttl: float = _check_ttl(ttl)
        if not isinstance(namespace, str) or not namespace.strip():
            raise TypeError(
                f"RedisCache(namespace=...) must be a non-empty str naming your application's "
                f"keys (e.g. 'shop'), not {namespace!r}"
            )
        self.namespace: str = namespace
        self._codec = Codec(serializer, secret)
        self.serializer: str = serializer
        self.version: str | int = check_version(version, "RedisCache(version=...)")
        self.lock_timeout: float = _number("lock_timeout", lock_timeout)
        self.op_timeout: float = _number("op_timeout", op_timeout)
        if self.op_timeout < 0.001:
            raise ValueError(
                f"RedisCache(op_timeout={op_timeout!r}): op_timeout is in seconds, and no "
                "Redis command answers in less than a millisecond: every read would fail open "
                "and the tier would be silently off (e.g. op_timeout=0.05)"
            )
        if isinstance(max_value_bytes, bool) or not isinstance(max_value_bytes, int):
            raise TypeError(
                f"RedisCache(max_value_bytes=...) must be an int, not {max_value_bytes!r}"
            )
        self.max_value_bytes: int = int(_number("max_value_bytes", max_value_bytes))
        self.retry_after: float = _number("retry_after", retry_after, zero=True)
        self.log_interval: float = _number("log_interval", log_interval, zero=True)
        self._ttl_ms = max(1, round(self.ttl * 1000))
        self._lock_ms = max(1, round(self.lock_timeout * 1000))
        # A miss's lock lives this long until its holder says it got the CLAIM's reply:
        # a CLAIM its caller gave up on holds the key's other misses no longer.
        self._lease_ms = min(self._lock_ms, max(1, round(self.op_timeout * 1000)))
        # A sync cache's commands, and any cache's cache_clear() and cache_delete(), which
        # sync code may call (an async cache's too, from inside or outside a loop).
        self._sync = io.Conn(client, self.op_timeout, True)
        self._client = client  # what each event loop's pool is made like
        self._loops: dict[asyncio.AbstractEventLoop, io.Conn] = {}
        self._down_until = 0.0
        self._tiers: weakref.WeakSet[RedisTier] = weakref.WeakSet()
        self._totals = dict.fromkeys(RedisStats._fields, 0)  # functions gone still count
        # For counts and logs; reentrant: a collection starting in it (3.12+: at an eval-breaker
        # check) may run a cleanup whose memo on this cache fails and logs, in this thread.
        self._lock = threading.RLock()
        self._logged: dict[str, float] = {}
        self._quiet: dict[str, int] = {}
        _caches.add(self)

    def __repr__(self) -> str:
        kind = "async " if self.is_async else ""
        return f"<{kind}RedisCache namespace={self.namespace!r} ttl={self.ttl:g}>"

    def _make_tier(self, spec: Any, version: str | int | None) -> RedisTier:
        """The tier of one decorated function (called by ``request_memo``)."""
        if spec.is_async != self.is_async:
            want = "redis.asyncio.Redis" if spec.is_async else "redis.Redis"
            raise TypeError(
                f"@request_memo(shared={self!r}) on {'async' if spec.is_async else 'sync'} "
                f"function {spec.name} needs a RedisCache on a {want} client. Make one "
                "RedisCache per kind of client; they can share the namespace."
            )
        if version is not None:
            version = check_version(version, "request_memo(version=...)")
        self._check_name(spec)
        tier = RedisTier(self, spec, self.version if version is None else version)
        self._tiers.add(tier)
        return tier

    def _check_name(self, spec: Any) -> None:
        """Refuse a function whose ``module.qualname`` is not its own in this cache: the
        name is its keys' identity, so two live functions with one name would share values.
        One of another code is a redefinition (a reload, a notebook cell run again): it
        replaces the old one, which the name's global still holds while this runs."""
        problem = _name_problem(spec.fn)
        if problem is not None:
            raise TypeError(
                f"@request_memo(shared={self!r}) cannot key {spec.name} in Redis: {problem}, "
                "and Redis keys hold the function's module.qualname. Decorate a def with a "
                "name of its own (for a partial: a def calling it)."
            )
        if (state := None if spec.key_fn else _state_problem(spec.fn)) is not None:
            raise TypeError(f"@request_memo(shared={self!r}) cannot key {spec.name}: {state}.")
        self._tiers -= {t for t in self._named(spec) if _code(t.fn) is not _code(spec.fn)}
        if self._named(spec):  # the same code: maybe an earlier call's closure, garbage
            gc.collect()  # a closure calling itself is in a cycle: only the GC frees it
        if self._named(spec):
            raise TypeError(
                f"@request_memo(shared={self!r}): another live function is named {spec.name} "
                "on this cache, made by the same code (a factory's closures; a decorator without "
                "functools.wraps): Redis keys hold module.qualname, so the two would read each "
                "other's values. Name each before decorating (fn.__qualname__ = f'scaled_by_{n}'"
                "), or give each a RedisCache with a namespace of its own."
            )

    def _named(self, spec: Any) -> list[RedisTier]:
        return [t for t in list(self._tiers) if t.name == spec.name and t.fn is not spec.fn]

    def stats(self) -> RedisStats:
        """This process's counters for every function that used this cache, gone ones too."""
        return RedisStats(**self._totals)

    def close(self) -> None:
        """Close the sync connections (they reopen if the cache is used again)."""
        self._sync.client.connection_pool.disconnect()

    async def aclose(self) -> None:
        """Close the connections of the running event loop, and the sync ones."""
        self.close()
        conn = self._loops.pop(asyncio.get_running_loop(), None)
        if conn is not None:
            await conn.client.connection_pool.disconnect()

    # -- what the tiers call -------------------------------------------------------------

    def _down(self) -> bool:
        """Whether Redis is left alone after an error (callers look at ``_down_until``
        first: no clock read, nor call, while up)."""
        return self._down_until > _now()

    def _failed(self, tier: RedisTier, exc: BaseException) -> None:
        """A Redis operation failed: count it, leave Redis alone a while, and say so."""
        tier.count("errors")
        if io.exhausted(exc):  # this process is busy; Redis may well be fine
            self._warn(
                "busy",
                "perrequest: %r had no free connection (%s); the value was computed in "
                "this process. Give the client's pool more max_connections, or make it a "
                "redis.BlockingConnectionPool (the cache then waits for a connection).",
                self,
                exc,
            )
            return
        if self.retry_after:
            self._down_until = _now() + self.retry_after
        self._warn(
            "error",
            "perrequest: Redis failed for %r (%s: %s); the values are computed in this "
            "process meanwhile, and Redis tried again after %g s.",
            self,
            type(exc).__name__,
            exc,
            self.retry_after,
        )

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """Log a WARNING of this kind at most once per ``log_interval`` seconds."""
        now = _now()
        with self._lock:
            last = self._logged.get(kind)
            if last is not None and now - last < self.log_interval:
                self._quiet[kind] = self._quiet.get(kind, 0) + 1
                return
            self._logged[kind] = now
            quiet = self._quiet.pop(kind, 0)
        more = f"; {quiet} more since the last" if quiet else ""
        logger.warning(f"{message} (Logged at most once per %g s{more}.)", *args, self.log_interval)


_caches: weakref.WeakSet[RedisCache] = weakref.WeakSet()  # for _forked
