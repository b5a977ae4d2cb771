"""A Redis miss: CLAIM the value or the key's lock, compute, STORE and release.

A CLAIM takes the lock (``SET NX PX``) for ``op_timeout`` (a lease), which the
holder extends to ``lock_timeout`` once it has the reply, so a CLAIM that runs after
its caller gave up on it holds the key's other misses for ``op_timeout`` at most.
The others CLAIM again until the value is there, the lock is free (its holder died:
one takes it) or ``lock_timeout`` has passed (they compute too). The steps are
written once, as generators (``_claim``, ``_store``) yielding the commands to send
(or a pause), which ``_run`` and ``_run_async`` send on sync or asyncio
connections, handing back each reply or error.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

from . import _redis_io as io
from ._flight import MISSING
from ._redis_io import BadValue, Conn
from ._redis_scripts import GEN, LAST, LOCK
from ._shared_errors import Args, Fn, Kwargs

if TYPE_CHECKING:
    from ._redis_tier import RedisTier

# Commands to send, ``(script, keys, args)``, or a pause in seconds; each gets back
# the command's reply, or the exception it raised.
Steps = Generator[Any, Any, Any]
FIRST_PAUSE, MAX_PAUSE = 0.002, 0.05  # seconds between looks at another's lock
now = time.monotonic


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Late(bytes):
    """A value whose computation lost its lock to a delete (in any process): its waiters
    in this process, which may have come after the delete, try once more (the next
    computation begins after they came)."""


def fetch(
    tier: RedisTier, conn: Conn | None, key: str, fn: Fn, bad: Any, args: Args, kwargs: Kwargs
) -> Any:
    """The value's bytes: read, or computed under the lock (over ``bad``, a value that did
    not decode, if not None) and stored, through ``conn``; computed only if it is None."""
    token, deletes = "", -1
    if conn is not None:
        mine = os.urandom(9).hex()
        try:
            found, conn, token, deletes = _run(conn, _claim(tier, conn, key, mine, bad))
        except BaseException:  # a signal's (SystemExit, KeyboardInterrupt): the lock
            _run(conn, _store(tier, key, b"", mine))  # may be ours; release it
            raise
        if found is not None:
            return found
    payload, late = b"", None
    try:
        tier.count("misses")
        payload = tier._encoded(fn(*args, **kwargs), key)
    finally:
        try:
            stored = tier._storable(conn, payload, key, threading.get_ident(), deletes)
            if token:  # our lock to release (with our value, if stored)
                late = _run(conn, _store(tier, key, stored, token))
        except BaseException:  # a signal's: the lock released all the same (STORE runs twice)
            if token:
                _run(conn, _store(tier, key, b"", token))
            raise
    return Late(payload) if late == 2 else payload


async def fetch_async(
    tier: RedisTier, conn: Conn | None, key: str, fn: Fn, bad: Any, args: Args, kwargs: Kwargs
) -> Any:
    """``fetch``, awaited. A claim or a store cancelled (anyio's cancel scopes cancel
    every await) releases the lock in a task of its own: a lock left behind (its EXTEND
    on the way) would hold the key's next miss, in every process, for ``lock_timeout``."""
    token, deletes, timeout = "", -1, tier.cache.op_timeout
    if conn is not None:
        mine = os.urandom(9).hex()
        try:
            claimed = await _run_async(conn, _claim(tier, conn, key, mine, bad), timeout)
        except BaseException:  # cancelled, or a signal's: the lock may be ours: release it
            await finish(lambda: _run_async(conn, _store(tier, key, b"", mine), timeout))
            raise
        found, conn, token, deletes = claimed
        if found is not None:
            return found
    payload, late, stored = b"", None, b""
    try:
        tier.count("misses")
        payload = tier._encoded(await fn(*args, **kwargs), key)
    finally:
        try:
            # The task is not kept in this frame, which the error's traceback holds: a cycle.
            task = None if conn is None else asyncio.current_task()
            stored = tier._storable(conn, payload, key, task, deletes)
            task = None
            if token:
                late = await _run_async(conn, _store(tier, key, stored, token), timeout)
        except BaseException:  # cancelled, or a signal's: STORE can run twice
            task = None
            if token:  # once more here (asyncio.run ending waits for it), else in a task
                await finish(lambda: _run_async(conn, _store(tier, key, stored, token), timeout))
            raise
    return Late(payload) if late == 2 else payload


def _claim(tier: RedisTier, conn: Conn, key: str, token: str, bad: bytes | None) -> Steps:
    """CLAIM (our lock: ``token``) until the value is there, the lock is ours or
    ``lock_timeout`` has passed: ``(the value's bytes or None, the connection to store
    through or None, our lock's token or "", this process's deletes before the CLAIM
    that took it)``. A value that does not decode (``bad``) is taken as none: its
    replacement is computed under the lock too."""
    cache, keys = tier.cache, [key, key + LOCK, key + GEN, tier.base + GEN, key + LAST]
    deadline, pause = now() + cache.lock_timeout, FIRST_PAUSE
    over = "" if bad is None else hashlib.sha1(bad, usedforsecurity=False).hexdigest()
    latest_ms = max(cache._ttl_ms, cache._lock_ms)  # how long a holder is known the latest
    while True:
        deletes = tier._deletes  # counted before the CLAIM: a delete from here may predate it
        reply = yield ("claim", keys, [token, cache._lease_ms, over, latest_ms])
        if isinstance(reply, Exception):  # (a key of another type is the script's to replace)
            tier._wrong(key, reply)
            return None, None, "", -1
        if reply[0] == 3:  # taken over a lock no miss would get past: a bad value
            tier._refused(key + LOCK, BadValue("a lock of another type, or without expiry"))
        if reply[0] >= 2:  # ours: for op_timeout, until we have said we got the reply
            if cache._lease_ms < cache._lock_ms:
                got, reply = reply, (yield ("extend", keys[1:2], [token, cache._lock_ms]))
                if isinstance(reply, Exception):  # it may run yet: release it all the
                    tier._wrong(key, reply)  # same once computed
                reply = got
            return None, conn, f"{token}|{_text(reply[1])}", deletes  # and the generations
        if reply[0] == 1:
            if tier._decoded(reply[1], key) is not MISSING:
                tier.count("hits")
                return reply[1], conn, "", -1
            if now() < deadline:  # another bad value: CLAIM again, over it
                over = hashlib.sha1(reply[1], usedforsecurity=False).hexdigest()
                continue
            return None, None, "", -1
        if pause == FIRST_PAUSE:
            tier.count("lock_waits")
        left = deadline - now()
        if left <= 0:  # compute, and store nothing: the holder will, and ours, which
            tier.count("lock_timeouts")  # holds no lock, outlives any cache_clear
            return None, None, "", -1
        yield min(pause, left)
        pause = min(pause * 2, MAX_PAUSE)


def _store(tier: RedisTier, key: str, stored: bytes, token: str) -> Steps:
    """STORE the value (if any) and release our lock (``token``). A lock left behind
    would make the key's next miss, in any process, wait ``lock_timeout``: so a busy
    pool is waited for, up to ``op_timeout`` more."""
    deadline, pause = now() + tier.cache.op_timeout, FIRST_PAUSE
    while True:
        mine, _, gen = token.partition("|")
        keys = [key, key + LOCK, key + GEN, tier.base + GEN, key + LAST]
        args = [stored, tier.cache._ttl_ms]
        reply = yield ("store", keys, [*args, mine, gen or "/"])
        if not isinstance(reply, Exception):
            return reply
        if not io.exhausted(reply) or now() + pause > deadline:
            tier._wrong(key, reply)
            return None
        yield pause
        pause = min(pause * 2, MAX_PAUSE)


def _run(conn: Any, steps: Steps) -> Any:
    """Send ``steps``' commands on the sync connections; what the generator returns."""
    reply = None
    try:
        while True:
            step = steps.send(reply)
            if type(step) is float:
                time.sleep(step)
                reply = None
                continue
            try:
                reply = getattr(conn, step[0])(keys=step[1], args=step[2])
            except io.FAILURES as exc:
                reply = exc
    except StopIteration as done:
        return done.value


async def _run_async(conn: Any, steps: Steps, op_timeout: float) -> Any:
    """``_run`` on an event loop's connections, each command within ``op_timeout``."""
    reply = None
    try:
        while True:
            step = steps.send(reply)
            if type(step) is float:
                await asyncio.sleep(step)
                reply = None
                continue
            try:
                async with asyncio.timeout(op_timeout):
                    reply = await getattr(conn, step[0])(keys=step[1], args=step[2])
            except io.FAILURES as exc:
                reply = exc
    except StopIteration as done:
        return done.value


# Releases a cancelled caller left to finish, while they run (a loop keeps only weak
# references to its tasks).
_finishing: set[asyncio.Task[Any]] = set()


async def finish(make: Callable[[], Awaitable[Any]]) -> None:
    """Await ``make()`` (a STORE: it can run twice) where its caller was cancelled:
    ``asyncio.run`` ending waits for it there (a task made now would be left pending on
    the closed loop); in a task of its own if this await is cancelled too (anyio)."""
    try:
        await make()
    except asyncio.CancelledError:
        finish_later(make)


def finish_later(make: Callable[[], Awaitable[Any]]) -> None:
    """Await ``make()`` (a STORE: it can run twice) in a task of its own, kept until it
    ends; again if that task is cancelled (``asyncio.run`` ending cancels every task
    left), three times at most, each within ``op_timeout``. Tasks left on loops closed
    meanwhile are let go: they never end."""
    for left in [task for task in list(_finishing) if task.get_loop().is_closed()]:  # (threads)
        _finishing.discard(left)

    async def run() -> None:
        for _ in range(3):
            try:
                await make()
                return
            except asyncio.CancelledError:
                continue

    task = asyncio.get_running_loop().create_task(run())
    _finishing.add(task)
    task.add_done_callback(_finishing.discard)
