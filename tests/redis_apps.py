"""What the Redis tier's cross-process tests run in their child processes (spawned, so
each child imports everything afresh, as a separate server process would).

Every child memoizes functions of the same ``module.qualname`` as the others and the
test process, so that they share keys in Redis. Computations are recorded in Redis
itself (``RPUSH``), the one place every process can see.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from typing import Any

import redis
import redis.asyncio

from perrequest import request_memo, request_scope
from perrequest.redis import RedisCache

HOST = "127.0.0.1"
HOLD = False  # set in the child that holds the lock and is killed


def _record(port: int, name: str) -> None:
    with redis.Redis(host=HOST, port=port) as client:
        client.rpush(name, f"{time.time()!r} {os.getpid()}")


def _sync_hot(port: int, compute_s: float) -> dict[str, Any]:
    _record(port, "computations")
    time.sleep(compute_s)
    return {"hot": True}


async def _async_hot(port: int, compute_s: float) -> dict[str, Any]:
    _record(port, "computations")
    await asyncio.sleep(compute_s)
    return {"hot": True}


# One function for Redis, whatever the process's flavour: the same module.qualname.
_sync_hot.__qualname__ = _async_hot.__qualname__ = "hot"


def stampede(
    port: int, kind: str, ttl: float, compute_s: float, seconds: float, barrier: Any, out: Any
) -> None:
    """20 threads (``kind="sync"``) or 20 tasks (``"async"``) calling ``hot`` in fresh
    requests for ``seconds``; reports how many calls it made."""
    if kind == "sync":
        cache = RedisCache(
            redis.Redis(host=HOST, port=port), ttl=ttl, namespace="stampede", op_timeout=5
        )
        hot = request_memo(shared=cache)(_sync_hot)
        calls = []

        def worker() -> None:
            n = 0
            while time.monotonic() < deadline:
                with request_scope():
                    assert hot(port, compute_s) == {"hot": True}
                n += 1
                time.sleep(0.002)
            calls.append(n)

        barrier.wait(60)
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=worker) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out.put(sum(calls))
        return

    async def main() -> int:
        # op_timeout: 20 tasks open 20 connections at once on a loaded machine.
        client = redis.asyncio.Redis(host=HOST, port=port)
        cache = RedisCache(client, ttl=ttl, namespace="stampede", op_timeout=5)
        hot = request_memo(shared=cache)(_async_hot)

        async def worker() -> int:
            n = 0
            while time.monotonic() < deadline:
                async with request_scope():
                    assert await hot(port, compute_s) == {"hot": True}
                n += 1
                await asyncio.sleep(0.002)
            return n

        return sum(await asyncio.gather(*(worker() for _ in range(20))))

    barrier.wait(60)
    deadline = time.monotonic() + seconds
    out.put(asyncio.run(main()))


def held(n: int) -> str:
    """In the holding child: announce, then compute for far longer than the lock lasts."""
    if HOLD:
        with redis.Redis(host=HOST, port=PORT) as client:
            client.set("holding", os.getpid())
        time.sleep(60)
    return f"computed by {os.getpid()}"


PORT = 0


def hold_the_lock(port: int, lock_timeout: float) -> None:
    """Take ``held(1)``'s lock in Redis and never finish (the test kills this process)."""
    global HOLD, PORT
    HOLD, PORT = True, port
    cache = RedisCache(
        redis.Redis(host=HOST, port=port), ttl=60, namespace="held", lock_timeout=lock_timeout
    )
    with request_scope():
        request_memo(shared=cache)(held)(1)


def compute(port: int, n: int) -> int:
    """``square(n)`` through Redis in this process: the id of the process that computed it."""
    cache = RedisCache(redis.Redis(host=HOST, port=port), ttl=60, namespace="shared")
    with request_scope():
        value = request_memo(shared=cache)(_square)(n)
    assert value["square"] == n * n
    return value["pid"]


def _square(n: int) -> dict[str, int]:
    return {"square": n * n, "pid": os.getpid()}


_square.__qualname__ = "square"


def _unique(n: int) -> str:
    return "v" * 40


_unique.__qualname__ = "unique"


def many_keys(port: int, start: int, count: int, out: Any) -> None:
    """``count`` distinct keys through the Redis tier, 1,000 per request; reports this
    process's counters."""
    # op_timeout: four processes writing at once into an evicting server, on a loaded
    # machine (a read over 0.25 s is an error, which this test does not look for).
    cache = RedisCache(redis.Redis(host=HOST, port=port), ttl=3600, namespace="many", op_timeout=5)
    unique = request_memo(shared=cache)(_unique)
    for first in range(start, start + count, 1000):
        with request_scope():
            for n in range(first, min(first + 1000, start + count)):
                unique(n)
    out.put(cache.stats()._asdict())


def _priced(port: int, sku: str) -> int:
    """Read the row; the old one (1): say so, then wait for the test's word, a
    computation in flight."""
    with redis.Redis(host=HOST, port=port) as client:
        price = int(client.get("row") or 0)
        if price == 1:
            client.set("computing", os.getpid())
            deadline = time.monotonic() + 10
            while not client.exists("release") and time.monotonic() < deadline:
                time.sleep(0.01)
    return price


_priced.__qualname__ = "priced"


def price_slowly(port: int, lock_timeout: float) -> int:
    """``priced("a")`` through Redis in this process, as a request would."""
    cache = RedisCache(
        redis.Redis(host=HOST, port=port), ttl=60, namespace="stale", lock_timeout=lock_timeout
    )
    with request_scope():
        return int(request_memo(shared=cache, key=lambda port, sku: sku)(_priced)(port, "a"))


class SlowLink:
    """A TCP relay to the redis-server on 127.0.0.1 that holds back, for ``delay``
    seconds, every write of the client's that holds ``marker`` (a slow link for one
    command). Its threads end with the connections."""

    def __init__(self, port: int, marker: bytes, delay: float) -> None:
        self.upstream, self.marker, self.delay = port, marker, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(conn, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, conn, False), daemon=True).start()

    def _pump(self, source: Any, sink: Any, slow: bool) -> None:
        try:
            while data := source.recv(65536):
                if slow and self.marker in data:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(2)

    def close(self) -> None:
        self.listener.close()
