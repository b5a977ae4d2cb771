"""Single-flight: each key of one cache is computed at most once at a time.

Used by the request store and by the shared tier. Threads that find a key
being computed block until it is done; asyncio tasks await it. The value or
the exception reaches every waiter; exceptions are never cached.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

MISSING: Any = object()
_RESTART: Any = object()


class Counters(Protocol):
    hits: int
    misses: int


class _ThreadFlight:
    """A computation in progress in some thread; waiters block on ``done``."""

    __slots__ = ("done", "error", "thread", "value")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.done = threading.Lock()
        self.done.acquire()
        self.value: Any = None
        self.error: BaseException | None = None


class _AsyncFlight:
    """A computation in progress in some task; waiters await ``future``.

    The future is made by the first waiter: most computations have none.
    """

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] | None = None


class SingleFlight:
    """The in-progress computations of one cache, guarded by that cache's lock.

    ``lookup()`` returns the cached value or ``MISSING``; ``fill(value)``
    stores a computed one. Both are called with the lock held. A waiter counts
    as a hit, a caller that computes as a miss.
    """

    __slots__ = ("_flights", "_lock")

    def __init__(self, lock: threading.RLock | threading.Lock) -> None:
        self._lock = lock
        self._flights: dict[Hashable, _ThreadFlight | _AsyncFlight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def clear(self) -> None:
        self._flights.clear()

    def run(
        self,
        key: Hashable,
        lookup: Callable[[], Any],
        fill: Callable[[Any], None],
        compute: Callable[[], Any],
        counters: Counters,
    ) -> Any:
        """The value at ``key``, computed by ``compute()`` at most once at a time."""
        flights = self._flights
        wait: _ThreadFlight | None = None
        with self._lock:
            value = lookup()
            if value is not MISSING:
                counters.hits += 1
                return value
            flight = flights.get(key)
            if flight is None:
                flight = flights[key] = _ThreadFlight()
                counters.misses += 1
            elif isinstance(flight, _ThreadFlight) and flight.thread != threading.get_ident():
                counters.hits += 1
                wait, flight = flight, None
            else:
                # This thread re-entered its own computation (recursion), or an
                # async computation holds the key: compute without deduplication.
                counters.misses += 1
                flight = None
        if wait is not None:
            with wait.done:
                pass
            if wait.error is not None:
                raise wait.error
            return wait.value
        if flight is None:
            value = compute()
            with self._lock:
                fill(value)
            return value
        try:
            value = compute()
        except BaseException as exc:
            flight.error = exc
            with self._lock:
                if flights.get(key) is flight:
                    del flights[key]
            flight.done.release()
            raise
        flight.value = value
        with self._lock:
            fill(value)
            if flights.get(key) is flight:
                del flights[key]
        flight.done.release()
        return value

    async def run_async(
        self,
        key: Hashable,
        lookup: Callable[[], Any],
        fill: Callable[[Any], None],
        compute: Callable[[], Awaitable[Any]],
        counters: Counters,
    ) -> Any:
        """The async twin of ``run``.

        The computation runs in the first caller's task. If that caller is
        cancelled, a waiter that is still alive restarts it; if every waiter
        is cancelled, nothing runs on and nothing is cached.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): cache, but without single-flight
            loop = None
        flights = self._flights
        while True:
            with self._lock:
                value = lookup()
                if value is not MISSING:
                    counters.hits += 1
                    return value
                flight = flights.get(key)
                if loop is None or (
                    flight is not None and getattr(flight, "loop", None) is not loop
                ):
                    flight = None  # another loop or a thread holds it: compute here
                    counters.misses += 1
                    future = None
                elif flight is None:
                    flight = flights[key] = _AsyncFlight(loop)
                    counters.misses += 1
                    future = None
                else:
                    assert isinstance(flight, _AsyncFlight)
                    counters.hits += 1
                    future = flight.future
                    if future is None:
                        future = flight.future = loop.create_future()
            if flight is None:
                value = await compute()
                with self._lock:
                    fill(value)
                return value
            assert isinstance(flight, _AsyncFlight)
            if future is None:
                return await self._own(key, fill, compute, flight)
            outcome = await asyncio.shield(future)
            if outcome is _RESTART:
                with self._lock:
                    counters.hits -= 1  # it is about to compute after all
                continue
            ok, result = outcome
            if ok:
                return result
            raise result

    async def _own(
        self,
        key: Hashable,
        fill: Callable[[Any], None],
        compute: Callable[[], Awaitable[Any]],
        flight: _AsyncFlight,
    ) -> Any:
        outcome: Any = _RESTART  # if cancelled, waiters restart the computation
        flights = self._flights
        try:
            value = await compute()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            outcome = (False, exc)
            raise
        else:
            outcome = (True, value)
            with self._lock:
                fill(value)
            return value
        finally:
            with self._lock:
                if flights.get(key) is flight:
                    del flights[key]
            future = flight.future
            if future is not None and not future.done():
                future.set_result(outcome)
