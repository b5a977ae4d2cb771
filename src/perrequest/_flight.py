"""Single-flight: a key is computed by one caller at a time; the others wait for the outcome.

One mechanism for threads and tasks. The computing caller registers itself in
the cache's ``_flights``; the first caller to wait replaces that with a
``concurrent.futures.Future`` (threads: ``result()``; tasks of any loop:
``asyncio.wrap_future``). Only the computing caller removes its record and
resolves the future, whatever happened to the cache meanwhile, so no waiter is
ever stranded; a miss nobody waits for costs one dict insert and one pop.
Under trio, tasks compute without sharing: correct, only not deduplicated.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, Protocol

from ._checks import LAZY, refuse_memoized_result

MISSING: Any = object()
_RESTART: Any = object()  # the computing caller was interrupted: waiters try again

Fn = Callable[..., Any]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
_now = time.perf_counter
_thread_id = threading.get_ident

# Who waits for whose single-flight computation (threads by id, tasks): a caller never
# waits for one that waits for it (two threads fetching each other's keys).
_waits: dict[object, object] = {}
_waits_lock = threading.Lock()


def may_wait(me: object, owner: object) -> bool:
    """Record that ``me`` waits for ``owner``, unless that closes a cycle (then False)."""
    with _waits_lock:
        who: object = owner
        for _ in range(len(_waits) + 1):
            if who == me:
                return False
            who = _waits.get(who)
            if who is None:
                break
        _waits[me] = owner
        return True


def done_waiting(me: object) -> None:
    _waits.pop(me, None)


class Counter(Protocol):  # a store's _stats.Counter, or a shared tier's own counts
    hits: int
    misses: int
    compute_s: float
    timed: bool  # whether to read the clock around computations


class Cache(Protocol):
    """Lookup and fill are called with the lock held. A closed cache looks up and fills
    nothing, so a computation that outlives it still ends well."""

    _lock: Any  # a threading lock: there before any computation starts
    _flights: dict[Hashable, Any]

    def _lookup(self, key: Any) -> Any: ...

    def _fill(self, key: Any, value: Any, counter: Any, extra: Any) -> None: ...


class Waited:
    """A computation that somebody waits for."""

    __slots__ = ("future", "owner")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.future: Future[Any] = Future()
        # Running, so that a waiter's cancelled wrap_future cannot cancel it for all.
        self.future.set_running_or_notify_cancel()


def _outcome(cache: Cache, counter: Counter, result: Any) -> Any:
    """What a waiter returns or raises; MISSING to try again (not counted as a hit)."""
    if result is _RESTART:
        with cache._lock:
            counter.hits -= 1  # it computes after all
        return MISSING
    ok, value = result
    if ok:
        return value
    raise value  # a shared tier hands its errors over as values (_shared_errors)


def failed(
    cache: Cache, key: Hashable, me: object, counter: Counter, start: float, exc: BaseException
) -> None:
    """The computing caller raised: its waiters get the error or, for cancellation and
    other BaseExceptions (its own business), the turn to compute."""
    if start:
        counter.compute_s += _now() - start
    with cache._lock:
        try:
            record = cache._flights.pop(key, None)
        except BaseException:  # the key's __hash__/__eq__ raised this time
            return forget(cache, me)
        if record is not me and not (type(record) is Waited and record.owner is me):
            _put_back(cache, key, record)  # invalidated: its waiters restarted then
            return
    if type(record) is Waited:
        record.future.set_result((False, exc) if isinstance(exc, Exception) else _RESTART)


_UNKNOWN: Any = object()  # what ``finish`` unregistered, until it knows


def finish(
    cache: Cache, key: Hashable, me: object, value: Any, counter: Counter, extra: Any
) -> Any:
    """Unregister, store ``value``, hand it to the waiters (written out in _wrappers)."""
    lock = cache._lock
    lock.acquire()  # not `with`: on CPython 3.11 that costs twice as much
    record = _UNKNOWN
    try:
        record = cache._flights.pop(key, None)
        if record is me:  # nobody waited: the common miss
            cache._fill(key, value, counter, extra)
            return value
        return end(cache, key, me, record, value, counter, extra)
    except BaseException:
        if record is _UNKNOWN:  # the key's __hash__/__eq__ raised this time
            forget(cache, me)
        raise
    finally:
        lock.release()


def end(
    cache: Cache, key: Hashable, me: object, record: Any, value: Any, counter: Counter, extra: Any
) -> Any:
    """``finish`` when somebody waits or a delete invalidated the record. Lock held.
    If storing raises (a key's ``__eq__``) the waiters get that error, as their own
    lookup would; on an interrupt, the value."""
    if not (type(record) is Waited and record.owner is me):  # invalidated: not stored
        _put_back(cache, key, record)
        return value
    try:
        cache._fill(key, value, counter, extra)
    except BaseException as exc:
        if type(record) is Waited:
            record.future.set_result((False, exc) if isinstance(exc, Exception) else (True, value))
        raise
    if type(record) is Waited:
        record.future.set_result((True, value))
    return value


def invalidate(cache: Cache, key: Hashable) -> None:
    """``key`` was deleted: its computation in flight stores nothing and is not joined any
    more (read your writes); its waiters start again. Lock held."""
    record = cache._flights.pop(key, None)
    if type(record) is Waited and not record.future.done():
        record.future.set_result(_RESTART)


def _put_back(cache: Cache, key: Hashable, record: Any) -> None:
    """An invalidated computation ended and popped what another caller registered
    since: put that back. Lock held."""
    if record is not None:
        try:
            cache._flights[key] = record
        except BaseException:  # its key's __hash__ raised: that computation's waiters retry
            if type(record) is Waited:
                record.future.set_result(_RESTART)


def forget(cache: Cache, me: object) -> None:
    """Unregister ``me``'s records by identity (``popitem`` hashes nothing) when a key's
    ``__hash__``/``__eq__`` raised; their waiters retry."""
    flights = cache._flights
    records = []
    while flights:
        records.append(flights.popitem())
    for key, record in reversed(records):
        try:
            if not (record is me or (type(record) is Waited and record.owner is me)):
                flights[key] = record
                continue
        except BaseException:
            pass
        if type(record) is Waited:
            record.future.set_result(_RESTART)


def run(
    cache: Cache, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Counter, extra: Any
) -> Any:
    """The value at ``key``, computed by ``fn(*args, **kwargs)`` at most once at a time."""
    me = _thread_id()
    # Registered without the lock (setdefault is atomic). A value filled since the
    # caller looked is computed again: "at most once at a time" still holds.
    record = cache._flights.setdefault(key, me)
    while record is not me:
        step = _next_step(cache, key, me, counter)
        if step is True:
            break
        if type(step) is tuple:
            return step[0]
        if step is not False:
            try:
                value = _outcome(cache, counter, step.future.result())
            finally:
                done_waiting(me)
            if value is MISSING:  # its caller was interrupted: look, join or compute
                continue
            return value
        # Recursion, or a cycle of waiters: compute without sharing, timed all the same.
        start = _now() if counter.timed else 0.0
        try:
            value = fn(*args, **kwargs)
        finally:
            if start:
                counter.compute_s += _now() - start
        if type(value) in LAZY:
            refuse_memoized_result(fn, value)
        with cache._lock:
            cache._fill(key, value, counter, extra)
        return value
    counter.misses += 1
    start = _now() if counter.timed else 0.0
    try:
        value = fn(*args, **kwargs)
        if type(value) in LAZY:
            refuse_memoized_result(fn, value)
    except BaseException as exc:
        failed(cache, key, me, counter, start, exc)
        raise
    if start:
        counter.compute_s += _now() - start
    return finish(cache, key, me, value, counter, extra)


def _next_step(cache: Cache, key: Hashable, me: object, counter: Counter) -> Any:
    """Somebody registered ``key``: a ``Waited`` to wait on (then ``done_waiting``),
    ``True``: registered after all, ``False``: compute without sharing, ``(value,)``."""
    with cache._lock:
        value = cache._lookup(key)
        if value is not MISSING:
            counter.hits += 1
            return (value,)
        record = cache._flights.get(key)
        if record is None:
            cache._flights[key] = me
            return True
        computing = record.owner if type(record) is Waited else record
        if computing is me or computing == me:  # recursion: this very caller computes it
            counter.misses += 1
            return False
        if type(record) is not Waited:
            record = cache._flights[key] = Waited(computing)
        counter.hits += 1
    if record.future.done() or may_wait(me, record.owner):
        return record
    with cache._lock:  # a cycle of waiters: counted as a hit, it computes after all
        counter.hits -= 1
        counter.misses += 1
    return False


async def run_async(
    cache: Cache, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Counter, extra: Any
) -> Any:
    """``run`` for tasks; if the computing task is cancelled, a live waiter computes."""
    try:
        me: object = asyncio.current_task()
    except RuntimeError:
        me = None
    if me is None:  # not asyncio (trio): compute without sharing
        counter.misses += 1
        return await _unshared_async(cache, key, fn, args, kwargs, counter, extra)
    record = cache._flights.setdefault(key, me)
    while record is not me:
        step = _next_step(cache, key, me, counter)
        if step is True:
            break
        if type(step) is tuple:
            return step[0]
        if step is not False:
            try:
                value = _outcome(cache, counter, await asyncio.wrap_future(step.future))
            finally:
                done_waiting(me)
            if value is MISSING:  # its caller was cancelled: look, join or compute
                continue
            return value
        return await _unshared_async(cache, key, fn, args, kwargs, counter, extra)
    counter.misses += 1
    start = _now() if counter.timed else 0.0
    try:
        value = await fn(*args, **kwargs)
    except BaseException as exc:  # cancellation too: a waiter computes instead
        failed(cache, key, me, counter, start, exc)
        raise
    if start:
        counter.compute_s += _now() - start
    return finish(cache, key, me, value, counter, extra)


async def _unshared_async(
    cache: Cache, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Counter, extra: Any
) -> Any:
    """Compute without registering (trio, recursion, a cycle of waiters), timed all the same."""
    start = _now() if counter.timed else 0.0
    try:
        value = await fn(*args, **kwargs)
    finally:
        if start:
            counter.compute_s += _now() - start
    with cache._lock:
        cache._fill(key, value, counter, extra)
    return value
