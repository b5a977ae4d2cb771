"""The Redis tier of one ``async def`` memoized function: ``RedisTier``'s steps, awaited.

Each Redis command runs under ``asyncio.timeout(op_timeout)``, on the connections
of the running event loop. Without an asyncio loop (trio) the value is computed
here, as when Redis is down.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Hashable
from typing import Any

from . import _flight
from ._flight import MISSING
from ._redis_io import LOCK, Conn, exhausted
from ._redis_tier import FIRST_PAUSE, MAX_PAUSE, UNCOUNTED, RedisTier, now
from ._shared_errors import Args, Call, Fn, Kwargs, Raised, computed_async

# Stores that a cancelled caller left to finish, while they run (a loop keeps only weak
# references to its tasks).
_finishing: set[asyncio.Task[None]] = set()


class AsyncRedisTier(RedisTier):
    """``RedisTier`` for ``async def`` functions, on a ``redis.asyncio`` client."""

    __slots__ = ()

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
        key = self.redis_key(where[1], args, kwargs)  # type: ignore[index]
        return await _flight.run_async(
            store, where, self._get_async, (key, fn, args, kwargs), {}, counter, anchor
        )

    async def _get_async(
        self,
        key: str,
        fn: Fn,
        args: Args,
        kwargs: Kwargs,
    ) -> Any:
        cache, claim, conn = self.cache, True, None
        if cache._down_until and cache._down_until > now():
            claim = False
        elif (conn := cache._async.current()) is None:  # type: ignore[union-attr]
            claim = False
            self._no_asyncio()
        else:
            try:
                async with asyncio.timeout(cache.op_timeout):
                    raw = await conn.client.get(key)
            except Exception as exc:
                claim, conn = False, conn if self._wrong(key, exc) else None
            else:
                if raw is not None:
                    value = self._decoded(raw, key)
                    if value is not MISSING:
                        self.count("hits")
                        return value
                    claim = False
        call, fetch = Call(), (claim, conn, key, fn, args, kwargs)
        payload = await _flight.run_async(
            self, key, computed_async, (call, self._fetch_async, fetch, {}), {}, UNCOUNTED, None
        )
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

    async def _fetch_async(
        self,
        claim: bool,
        conn: Conn | None,
        key: str,
        fn: Fn,
        args: Args,
        kwargs: Kwargs,
    ) -> Any:
        """``RedisTier._fetch``, awaited; stored through ``conn`` unless it is None."""
        cache, token = self.cache, os.urandom(9).hex()
        deadline, pause = now() + cache.lock_timeout, FIRST_PAUSE
        while claim and conn is not None:
            try:
                async with asyncio.timeout(cache.op_timeout):
                    reply = await conn.claim(keys=[key, key + LOCK], args=[token, cache._lease_ms])
                if reply[0] >= 2 and cache._lease_ms < cache._lock_ms:  # ours: a lease
                    async with asyncio.timeout(cache.op_timeout):
                        await conn.extend(keys=[key + LOCK], args=[token, cache._lock_ms])
            except Exception as exc:
                conn = conn if self._wrong(key, exc) else None  # overwrite a wrong type
                break
            ours = self._claimed(reply, key)
            if ours is not None:
                return await self._compute_async(conn, token if ours else "", key, fn, args, kwargs)
            if reply[0] == 1:
                return reply[1]
            left = self._waited(deadline, pause)
            if left <= 0:
                break
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, MAX_PAUSE)
        return await self._compute_async(conn, "", key, fn, args, kwargs)

    async def _compute_async(
        self,
        conn: Conn | None,
        token: str,
        key: str,
        fn: Fn,
        args: Args,
        kwargs: Kwargs,
    ) -> Any:
        self.count("misses")
        payload = b""
        try:
            payload = self._encoded(await fn(*args, **kwargs), key)
        finally:
            stored = self._stored(payload)
            if stored and conn is not None and not self._current(key, asyncio.current_task()):
                stored = b""  # invalidated meanwhile: the lock is released all the same
            if conn is not None and (stored or token):
                try:
                    await self._store_async(conn, key, stored, token)
                except asyncio.CancelledError:  # cancelled again: anyio's cancel scopes
                    self._finish_later(conn, key, stored, token)  # cancel every await
                    raise
                except Exception as exc:
                    self._wrong(key, exc)
        return payload

    def _finish_later(self, conn: Conn, key: str, stored: bytes, token: str) -> None:
        """Store and release in a task of its own (STORE can run twice): a lock left
        behind would hold the key's next miss, in every process, for ``lock_timeout``."""
        task = asyncio.get_running_loop().create_task(self._store_quietly(conn, key, stored, token))
        _finishing.add(task)
        task.add_done_callback(_finishing.discard)

    async def _store_quietly(self, conn: Conn, key: str, stored: bytes, token: str) -> None:
        try:
            await self._store_async(conn, key, stored, token)
        except Exception as exc:
            self._wrong(key, exc)

    async def _store_async(self, conn: Conn, key: str, stored: bytes, token: str) -> None:
        """``RedisTier._store``, awaited: with a lock, a busy pool is waited for."""
        cache = self.cache
        deadline, pause = now() + cache.op_timeout, FIRST_PAUSE
        while True:
            try:
                async with asyncio.timeout(cache.op_timeout):
                    return await conn.store(  # type: ignore[no-any-return]
                        keys=[key, key + LOCK], args=[stored, cache._ttl_ms, token]
                    )
            except Exception as exc:
                if not (token and exhausted(exc)) or now() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
