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
    """A computation in progress in some task; waiters await ``future``."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()


class SingleFlight:
    """The in-progress computations of one cache, guarded by that cache's lock.

    ``lookup(key)`` returns the cached value or ``MISSING`` and is called with
    the lock held; ``fill(key, value)`` stores a computed value. A waiter counts
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

    def _finish(self, key: Hashable, flight: _ThreadFlight | _AsyncFlight) -> None:
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]

    def run(
        self,
        key: Hashable,
        lookup: Callable[[Hashable], Any],
        fill: Callable[[Hashable, Any], None],
        compute: Callable[[], Any],
        counters: Counters,
    ) -> Any:
        """The value at ``key``, computed by ``compute()`` at most once at a time."""
        with self._lock:
            value = lookup(key)
            if value is not MISSING:
                counters.hits += 1
                return value
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = _ThreadFlight()
                counters.misses += 1
                owns = True
            elif isinstance(flight, _ThreadFlight) and flight.thread != threading.get_ident():
                counters.hits += 1
                owns = False
            else:
                # This thread re-entered its own computation (recursion), or an
                # async computation holds the key: compute without deduplication.
                counters.misses += 1
                flight = None
                owns = True
        if flight is None:
            value = compute()
            fill(key, value)
            return value
        assert isinstance(flight, _ThreadFlight)
        if not owns:
            with flight.done:
                pass
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            value = compute()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            fill(key, value)
            return value
        finally:
            self._finish(key, flight)
            flight.done.release()

    async def run_async(
        self,
        key: Hashable,
        lookup: Callable[[Hashable], Any],
        fill: Callable[[Hashable, Any], None],
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
        while True:
            with self._lock:
                value = lookup(key)
                if value is not MISSING:
                    counters.hits += 1
                    return value
                flight = self._flights.get(key)
                if loop is None or (
                    flight is not None and getattr(flight, "loop", None) is not loop
                ):
                    flight = None  # another loop or a thread holds it: compute here
                    counters.misses += 1
                    owns = True
                elif flight is None:
                    flight = self._flights[key] = _AsyncFlight(loop)
                    counters.misses += 1
                    owns = True
                else:
                    counters.hits += 1
                    owns = False
            if flight is None:
                value = await compute()
                fill(key, value)
                return value
            assert isinstance(flight, _AsyncFlight)
            if owns:
                return await self._own(key, fill, compute, flight)
            outcome = await asyncio.shield(flight.future)
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
        fill: Callable[[Hashable, Any], None],
        compute: Callable[[], Awaitable[Any]],
        flight: _AsyncFlight,
    ) -> Any:
        outcome: Any = _RESTART  # if cancelled, waiters restart the computation
        try:
            value = await compute()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            outcome = (False, exc)
            raise
        else:
            outcome = (True, value)
            fill(key, value)
            return value
        finally:
            self._finish(key, flight)
            if not flight.future.done():
                flight.future.set_result(outcome)
