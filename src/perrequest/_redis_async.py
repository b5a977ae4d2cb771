"""The Redis tier of one ``async def`` memoized function: ``RedisTier``'s steps, awaited.

Each Redis command runs under ``asyncio.timeout(op_timeout)``, on the connections
of the running event loop; lock waits sleep with ``asyncio.sleep``. Without an
asyncio loop (trio) the value is computed here, as when Redis is down.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from . import _flight
from ._flight import MISSING
from ._redis_io import exhausted
from ._redis_tier import FIRST_PAUSE, MAX_PAUSE, UNCOUNTED, RedisTier, now
from ._shared_errors import Call, Raised, computed_async


class AsyncRedisTier(RedisTier):
    """``RedisTier`` for ``async def`` functions, on a ``redis.asyncio`` client."""

    __slots__ = ()

    async def run_async(
        self,
        store: Any,
        where: Hashable,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        counter: Any,
        anchor: Any,
    ) -> Any:
        key = self.redis_key(where[1], args, kwargs)  # type: ignore[index]
        return await _flight.run_async(
            store, where, self._get_async, (key, fn, args, kwargs), {}, counter, anchor
        )

    async def _get_async(
        self,
        key: str,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        cache, conn = self.cache, None
        step: Callable[..., Awaitable[Any]] = self._claim_async
        if cache._down_until > now():
            step = self._local_async
        elif (conn := cache._async_conn()) is None:
            step = self._local_async
            self._no_asyncio()
        else:
            try:
                async with asyncio.timeout(cache.op_timeout):
                    raw = await conn.client.get(key)
            except Exception as exc:
                step = self._replace_async if self._wrong(key, exc) else self._local_async
            else:
                if raw is not None:
                    value = self._decoded(raw, key)
                    if value is not MISSING:
                        self.count("hits")
                        return value
                    step = self._replace_async
        call = Call()
        payload = await _flight.run_async(
            self, key, computed_async, (call, step, (conn, key, fn, args, kwargs), {}), {},
            UNCOUNTED, None,
        )  # fmt: skip
        if not call.ran:  # a waiter: another caller read or computed it (a hit)
            self.count("hits")
        if type(payload) is Raised:
            payload = payload.error_for(call)
            raise payload
        return cache._codec.loads(payload, key)  # a copy of its own for each caller

    def _no_asyncio(self) -> None:
        """No asyncio event loop runs (trio): redis.asyncio cannot either. Fail open."""
        self.count("errors")
        self.cache._warn(
            "no_asyncio",
            "perrequest: %r is on a redis.asyncio client, which needs an asyncio event "
            "loop, and %s was awaited under another (trio): computed in this request, "
            "never shared through Redis. Under trio, give it the in-process tier "
            "(shared=cachetools.TTLCache(...)), or run on asyncio (anyio's asyncio backend).",
            self.cache,
            self.name,
        )

    async def _local_async(
        self,
        conn: Any,
        key: str,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        return await self._compute_async(None, key, "", fn, args, kwargs)

    async def _replace_async(
        self,
        conn: Any,
        key: str,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        return await self._compute_async(conn, key, "", fn, args, kwargs)

    async def _claim_async(
        self,
        conn: Any,
        key: str,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        cache, token = self.cache, os.urandom(9).hex()
        deadline, pause = now() + cache.lock_timeout, FIRST_PAUSE
        while True:
            try:
                reply = await cache._claim_async(conn, key, token)
            except Exception as exc:
                mine = conn if self._wrong(key, exc) else None  # overwrite a wrong type
                return await self._compute_async(mine, key, "", fn, args, kwargs)
            if reply[0] >= 2:  # the lock is ours (3: taken over a bad one)
                self._bad_lock(key, reply[0])
                return await self._compute_async(conn, key, token, fn, args, kwargs)
            if reply[0] == 1:
                if self._decoded(reply[1], key) is MISSING:
                    return await self._compute_async(conn, key, "", fn, args, kwargs)
                self.count("hits")
                return reply[1]
            left = self._waited(deadline, pause)
            if left <= 0:
                return await self._compute_async(conn, key, "", fn, args, kwargs)
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, MAX_PAUSE)

    async def _compute_async(
        self,
        conn: Any,
        key: str,
        token: str,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        self.count("misses")
        payload = b""
        try:
            payload = self._encoded(await fn(*args, **kwargs), key)
        finally:
            stored = payload if payload and self._fits(payload) else b""
            if conn is not None and (stored or token):
                try:
                    await self._store_async(conn, key, stored, token)
                except Exception as exc:
                    self._wrong(key, exc)
        return payload

    async def _store_async(self, conn: Any, key: str, stored: bytes, token: str) -> None:
        """``RedisTier._store``, awaited: with a lock, a busy pool is waited for."""
        deadline, pause = now() + self.cache.op_timeout, FIRST_PAUSE
        while True:
            try:
                return await self.cache._store_async(conn, key, stored, token)
            except Exception as exc:
                if not (token and exhausted(exc)) or now() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
