"""Single-flight: each key of one cache is computed at most once at a time.

Used by the request store and by the shared tier. Threads that find a key
being computed block until it is done; asyncio tasks await it. The value or
the exception reaches every waiter; exceptions are never cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import sys
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

MISSING: Any = object()
_RESTART: Any = object()


class Counters(Protocol):
    hits: int
    misses: int


class _ThreadFlight:
    """A computation in progress in some thread.

    ``done`` is made by the first waiter (most computations have none) and
    released by the computing thread when it finishes; both under the cache's lock.
    """

    __slots__ = ("done", "error", "thread", "value")

    def __init__(self, thread: int) -> None:
        self.thread = thread
        self.done: threading.Lock | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    def finish(self) -> None:
        """Wake the waiters; call with the lock held."""
        if self.done is not None:
            self.done.release()


class _AsyncFlight:
    """A computation in progress in some task; waiters park until ``finish``.

    Waiters can be asyncio tasks of any event loop, in any thread, or trio
    tasks: each brings its own way to be woken (``_asyncio_waiter``,
    ``_trio_waiter``), so no waiter needs to know which library computes.
    """

    __slots__ = ("outcome", "task", "waiters")

    def __init__(self, task: object) -> None:
        self.task = task
        self.outcome: Any = None
        self.waiters: list[Callable[[], None]] = []

    def finish(self, outcome: Any) -> None:
        """Record the outcome and wake every waiter; call with the lock held."""
        self.outcome = outcome
        for wake in self.waiters:
            # A waiter whose event loop (or trio run) has ended raises here: it will
            # never resume, and must not fail this task nor keep the others asleep.
            with contextlib.suppress(Exception):
                wake()


def _current_task() -> tuple[str, object] | None:
    """The async library running this code and its current task, if it is one we know."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "asyncio", asyncio.current_task()
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return "trio", trio.lowlevel.current_task()
        except RuntimeError:
            pass
    return None


def _asyncio_waiter() -> tuple[Callable[[], None], Callable[[], Awaitable[None]]]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    thread = threading.get_ident()

    def resolve() -> None:
        if not future.done():  # a cancelled waiter's future is done already
            future.set_result(None)

    def wake() -> None:
        if threading.get_ident() == thread:
            resolve()
        else:  # computed in another thread's loop
            loop.call_soon_threadsafe(resolve)

    async def wait() -> None:
        await future

    return wake, wait


def _trio_waiter() -> tuple[Callable[[], None], Callable[[], Awaitable[None]]]:
    trio = sys.modules["trio"]
    event = trio.Event()
    token = trio.lowlevel.current_trio_token()
    thread = threading.get_ident()

    def wake() -> None:
        if threading.get_ident() == thread:
            event.set()
        else:
            token.run_sync_soon(event.set)

    async def wait() -> None:
        await event.wait()

    return wake, wait


_WAITERS = {"asyncio": _asyncio_waiter, "trio": _trio_waiter}


class SingleFlight:
    """The in-progress computations of one cache, guarded by that cache's lock.

    ``lookup()`` returns the cached value or ``MISSING``; ``fill(value)``
    stores a computed one. Both are called with the lock held. A waiter counts
    as a hit, a caller that computes as a miss.
    """

    __slots__ = ("_detach", "_flights", "_lock")

    def __init__(self, lock: threading.RLock | threading.Lock, *, detach: bool = False) -> None:
        self._lock = lock
        self._flights: dict[Hashable, int | _ThreadFlight | _AsyncFlight] = {}
        # Waiters may be other requests (the shared tier): give them a copy of
        # an exception, without the computing request's frames and locals.
        self._detach = detach

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
        """The value at ``key``, computed by ``compute()`` at most once at a time.

        A computation with no waiter is registered as its thread's id alone; the
        first thread that comes to wait replaces that with a ``_ThreadFlight``,
        which the computing thread then fills in and releases. Most misses have
        no waiter, and so make no object.
        """
        flights = self._flights
        thread = threading.get_ident()
        while True:
            wait: _ThreadFlight | None = None
            own = dedup = True
            with self._lock:
                value = lookup()
                if value is not MISSING:
                    counters.hits += 1
                    return value
                flight = flights.get(key)
                if flight is None:
                    flights[key] = thread
                    counters.misses += 1
                elif type(flight) is int and flight != thread:
                    wait = flights[key] = _ThreadFlight(flight)
                elif type(flight) is _ThreadFlight and flight.thread != thread:
                    wait = flight
                else:
                    # This thread re-entered its own computation (recursion), or an
                    # async computation holds the key: compute without deduplication.
                    counters.misses += 1
                    own = dedup = False
                if wait is not None:
                    counters.hits += 1
                    own = False
                    if wait.done is None:
                        wait.done = threading.Lock()
                        wait.done.acquire()
            if wait is None:
                break
            assert wait.done is not None
            with wait.done:  # until the computing thread releases it
                pass
            error = wait.error
            if error is None:
                return wait.value
            if isinstance(error, Exception):
                raise self._for_waiter(error)
            # KeyboardInterrupt, SystemExit...: the computing thread's own business.
            with self._lock:
                counters.hits -= 1  # it is about to compute after all
        if not dedup:
            value = compute()
            with self._lock:
                fill(value)
            return value
        assert own
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                self._finish(key, thread, None, exc)
            raise
        with self._lock:
            try:
                fill(value)
            except BaseException as exc:
                self._finish(key, thread, None, exc)
                raise
            self._finish(key, thread, value, None)
        return value

    def _finish(self, key: Hashable, thread: int, value: Any, error: BaseException | None) -> None:
        """Unregister this thread's computation and release its waiters; lock held."""
        flights = self._flights
        flight = flights.get(key)
        if type(flight) is _ThreadFlight and flight.thread == thread:
            del flights[key]
            flight.value, flight.error = value, error
            flight.finish()
        elif flight == thread:
            del flights[key]
        # else: a closing store cleared its flights meanwhile

    async def run_async(
        self,
        key: Hashable,
        lookup: Callable[[], Any],
        fill: Callable[[Any], None],
        compute: Callable[[], Awaitable[Any]],
        counters: Counters,
    ) -> Any:
        """The async twin of ``run``, for asyncio (any loop, any thread) and trio.

        The computation runs in the first caller's task. If that caller is
        cancelled, a waiter that is still alive restarts it; if every waiter
        is cancelled, nothing runs on and nothing is cached.
        """
        running = _current_task()
        flights = self._flights
        while True:
            wait: Callable[[], Awaitable[None]] | None = None
            with self._lock:
                value = lookup()
                if value is not MISSING:
                    counters.hits += 1
                    return value
                flight = flights.get(key)
                if running is None or (
                    flight is not None
                    and (not isinstance(flight, _AsyncFlight) or flight.task is running[1])
                ):
                    # An unknown async library, a thread holding the key, or this very
                    # task re-entering its own computation: compute without deduplication.
                    counters.misses += 1
                    flight = None
                elif flight is None:
                    flight = flights[key] = _AsyncFlight(running[1])
                    counters.misses += 1
                else:
                    assert isinstance(flight, _AsyncFlight)
                    counters.hits += 1
                    wake, wait = _WAITERS[running[0]]()
                    flight.waiters.append(wake)
            if flight is None:
                value = await compute()
                with self._lock:
                    fill(value)
                return value
            assert isinstance(flight, _AsyncFlight)
            if wait is None:
                return await self._own(key, fill, compute, flight)
            try:
                await wait()
            finally:
                if flight.outcome is None:  # this waiter was cancelled: stop waking it
                    with self._lock:
                        flight.waiters.remove(wake)
            outcome = flight.outcome
            if outcome is _RESTART:
                with self._lock:
                    counters.hits -= 1  # it is about to compute after all
                continue
            ok, result = outcome
            if ok:
                return result
            raise self._for_waiter(result)

    def _for_waiter(self, error: BaseException) -> BaseException:
        if not self._detach:
            return error
        try:
            clone = copy.copy(error)
        except Exception:  # an exception that cannot be rebuilt from its args
            return error
        if type(clone) is not type(error) or clone.args != error.args:
            return error
        clone.__notes__ = [
            *getattr(error, "__notes__", ()),
            "perrequest: raised by the same computation in another request",
        ]
        return clone

    async def _own(
        self,
        key: Hashable,
        fill: Callable[[Any], None],
        compute: Callable[[], Awaitable[Any]],
        flight: _AsyncFlight,
    ) -> Any:
        # Cancellation (asyncio's CancelledError, trio's Cancelled) and other
        # BaseExceptions belong to this task alone: the waiters restart instead.
        outcome: Any = _RESTART
        try:
            value = await compute()
        except Exception as exc:
            outcome = (False, exc)
            raise
        else:
            outcome = (True, value)
            with self._lock:
                fill(value)
            return value
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.finish(outcome)
