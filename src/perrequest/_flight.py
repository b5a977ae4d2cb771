"""Single-flight: a key is computed by one caller at a time; the others wait for the outcome.

The computing caller, thread or task, registers in ``_flights``; the first to wait replaces
that with a ``Waited`` (threads and tasks wait on its ``Outcome``). Only the
computing caller resolves its record, whatever happened: no waiter is stranded. Under trio
a task registers as its thread but never waits: a key in flight is computed again."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from . import _waits
from ._records import drop_dead, interrupted, resumed, take_out, take_over
from ._results import is_lazy, refuse_memoized_result
from ._signals import is_time_limit
from ._stats import CountsLike as Counter
from ._waits import RESTART, Waited, done_waiting, gone, outcome_of, restart, thread_me

MISSING: Any = object()

Fn = Callable[..., Any]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
_now = time.perf_counter


class Cache(Protocol):
    """Lookup and fill, lock held; closed, it finds and fills nothing (a late end is fine)."""

    _lock: Any  # a reentrant threading lock (abandon), there before any computation starts
    _flights: dict[Hashable, Any]
    _flights_cap: int  # beyond which run_async looks for dead ones (_records.drop_dead)
    _deletes: int  # entries deleted so far, for computations not in _flights (``_keep``)

    def _lookup(self, key: Any) -> Any: ...
    def _fill(self, key: Any, value: Any, counter: Any, extra: Any) -> None: ...


def _outcome(cache: Cache, counter: Counter, result: Any) -> Any:
    """What a waiter returns or raises; MISSING to try again (not counted as a hit)."""
    if result is RESTART:
        with cache._lock:
            counter.hits -= 1  # it computes after all
        return MISSING
    ok, value = result
    if ok:
        return value
    try:
        raise value  # a shared tier hands its errors over as values (_shared_errors)
    finally:
        result = value = None  # this frame, in the error's traceback: a GC cycle


def failed(
    cache: Cache, key: Hashable, me: object, counter: Counter, start: float, exc: BaseException
) -> None:
    """The computing caller raised: its waiters get the error (an Exception) or compute."""
    if start:
        counter.compute_s += _now() - start
    with cache._lock:  # in this frame: at the recursion limit no other is free (thread_me)
        try:
            # Looked at before it goes: another's (a dropped or taken-over task, collected,
            # ends here: its key computed anew meanwhile) is never out, not even for a moment.
            record = cache._flights.get(key)
            if record is me or (type(record) is Waited and record.owner is me):
                del cache._flights[key]
            else:
                record = None
        except Exception as error:  # the key's __hash__/__eq__ raised now: by identity
            if is_time_limit(error):  # a soft time limit: the task's, once its
                restart(_own(cache, key, me, None))  # waiters compute (``run`` ends it again)
                raise
            record = None
        record = _own(cache, key, me, record)  # None: invalidated
    if type(record) is Waited:
        record.future.set_result(outcome_of(cache, exc, RESTART))


_UNKNOWN: Any = object()  # what ``finish`` unregistered, until it knows
_STARTED: Any = object()  # ``run``'s step until it asks ``_next_step`` (see ``interrupted``)


def finish(
    cache: Cache, key: Hashable, me: object, value: Any, counter: Counter, extra: Any
) -> Any:
    """Unregister, store, hand the value to the waiters (written out in _wrappers)."""
    lock, record = cache._lock, _UNKNOWN  # not ``with``: twice the cost on 3.11
    try:
        lock.acquire()  # in the ``try``: an interrupt still releases it
        record = cache._flights.pop(key, None)
        if record is me:  # nobody waited: the common miss
            return _first(cache, key, value, counter, extra)
        return end(cache, key, me, record, value, counter, extra)
    except BaseException as exc:
        abandon(cache, key, me, record, value, exc)
        raise
    finally:
        try:  # noqa: SIM105 (contextlib.suppress: a with statement per miss)
            lock.release()
        except RuntimeError:  # acquire() itself was interrupted: not held
            pass


def end(
    cache: Cache, key: Hashable, me: object, record: Any, value: Any, counter: Counter, extra: Any
) -> Any:
    """``finish`` when somebody waits, a delete invalidated the record, or the key's hash
    changed. Lock held. If storing raises, ``abandon`` hands the waiters the outcome."""
    record = _own(cache, key, me, record)  # None: a delete, a takeover (``resumed``) took it
    value = _first(cache, key, value, counter, extra, record is not None or resumed(cache, key, me))
    if type(record) is Waited:
        record.future.set_result((True, value))
    return value


def abandon(
    cache: Cache, key: Hashable, me: object, record: Any, value: Any, exc: BaseException
) -> None:
    """``finish`` raised (a key's ``__hash__``/``__eq__``, an interrupt): its record not taken,
    waiters retry; else they get the error, or the value on an interrupt. Others' go back."""
    if record is _UNKNOWN:
        with cache._lock:  # held already, unless the interrupt came during acquire()
            restart(_own(cache, key, me, None))  # waiters retry
    elif type(record) is Waited and record.owner is me:
        if not record.future.done():
            record.future.set_result(outcome_of(cache, exc, (True, value)))
    elif record is not me:
        _put_back(cache, key, record)


def invalidate(cache: Cache, key: Hashable) -> None:
    """``key`` was deleted: its computation stores nothing, is joined no more. Lock held."""
    restart(cache._flights.pop(key, None))


def _put_back(cache: Cache, key: Hashable, record: Any) -> None:
    """Put back another's record an invalidated computation popped (not once restarted)."""
    if record is not None and not (type(record) is Waited and record.future.done()):
        try:
            cache._flights[key] = record
        except Exception as error:  # its key's __hash__ raised: that computation's waiters
            restart(record)  # retry; a soft time limit then goes on (the task's)
            if is_time_limit(error):
                raise


def _own(cache: Cache, key: Hashable, me: object, record: Any) -> Any:
    """``me``'s record, given what popping ``key`` found; taken out by identity if the key's
    hash changed (a task is the ``me`` of its nested computations too: by ``key`` then);
    None if a delete took it. Another's goes back. Lock held."""
    if record is me or (type(record) is Waited and record.owner is me):
        return record

    def mine(at: object, rec: Any) -> bool:  # a thread's me is new per call: by it alone
        return (at is key or type(me) is int) and getattr(rec, "owner", rec) is me

    filed = any(mine(*item) for item in list(cache._flights.items()))
    taken = take_out(cache._flights, mine) if filed else []
    _put_back(cache, key, record)
    return taken[0] if taken else None


def run(
    cache: Cache, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Counter, extra: Any
) -> Any:
    """The value at ``key``, computed by ``fn(*args, **kwargs)`` at most once at a time."""
    me, record, step = thread_me(), None, _STARTED
    try:
        # No lock (setdefault is atomic); a value filled since the caller looked is computed again.
        record = cache._flights.setdefault(key, me)
        while record is not me:
            step = None  # until it returns: it may register this call (take_over)
            step = _next_step(cache, key, me, counter)
            if step is True:
                break
            if type(step) is tuple:
                return step[0]
            if step is False:  # recursion, or a cycle of waiters: compute without sharing
                return _unshared(cache, key, fn, args, kwargs, counter, extra)
            try:
                got = _waits.result(step.future, cache._flights, key, step)
                value = _outcome(cache, counter, got)
            finally:
                done_waiting(me, step.future)
                record = step = got = None  # Waited -> error -> traceback -> here: a GC cycle
            if value is not MISSING:  # else its caller was interrupted: look, join, compute
                return value
    except BaseException as exc:  # an interrupt may come as a registering call returns
        interrupted(cache, key, me, exc, None if step is None else record)
        raise
    start = 0.0  # registered: every way out resolves it (no call, no interrupt before)
    try:
        counter.misses += 1
        if counter.timed:
            start = _now()
        value = fn(*args, **kwargs)
        if is_lazy(value):
            refuse_memoized_result(fn, value)
        if start:
            counter.compute_s += _now() - start
            start = 0.0
        return finish(cache, key, me, value, counter, extra)
    except BaseException as exc:  # finish's own failures are handled: this finds no record
        try:
            failed(cache, key, me, counter, start, exc)
        except BaseException:  # a signal as it began: once more (it pops, or finds nothing)
            failed(cache, key, me, counter, 0.0, exc)
            raise
        raise
    finally:
        value = None  # a shared tier's Raised: its error's frames hold this one


def _unshared(
    cache: Cache, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Counter, extra: Any
) -> Any:
    """Compute without registering (recursion, a cycle of waiters), timed all the same."""
    seen, start = _seen(cache, key), _now() if counter.timed else 0.0
    try:
        value = fn(*args, **kwargs)
    finally:
        if start:
            counter.compute_s += _now() - start
    if is_lazy(value):
        refuse_memoized_result(fn, value)
    return _keep(cache, key, value, counter, extra, seen)


def _seen(cache: Cache, key: Hashable) -> tuple[int, Any]:  # what ``_keep`` compares: the
    return cache._deletes, cache._flights.get(key)  # deletes, the key's record (who computes)


def _keep(cache: Cache, key: Hashable, value: Any, counter: Counter, extra: Any, seen: Any) -> Any:
    """``_first`` for an unregistered computation: nothing stored after a delete since ``seen``
    unless the key's registration then holds it still (a task is its own record in each)."""
    with cache._lock:
        now, once = _seen(cache, key), type(seen[1]) is int or type(seen[1]) is Waited
        fill = now[0] == seen[0] or (once and now[1] is seen[1])
        return _first(cache, key, value, counter, extra, fill)


def _first(
    cache: Cache, key: Hashable, value: Any, counter: Counter, extra: Any, fill: bool = True
) -> Any:
    """Fill (if ``fill``), lock held; a value stored since the caller looked (a race, a
    cycle, a later computation) stays, and is what it returns: one value per key."""
    if (stored := cache._lookup(key)) is not MISSING:
        return stored
    if fill:
        cache._fill(key, value, counter, extra)
    return value


def _next_step(cache: Cache, key: Hashable, me: object, counter: Counter, alone: Any = 0) -> Any:
    """Somebody registered ``key``: a ``Waited`` to wait on (then ``done_waiting``),
    ``True``: registered after all, ``False``: compute without sharing, ``(value,)``."""
    with cache._lock:
        value = cache._lookup(key)
        if value is not MISSING:
            counter.hits += 1
            return (value,)
        record = cache._flights.get(key)
        computing = record.owner if type(record) is Waited else record
        if record is None or gone(computing):  # a stopped loop's, or the parent process's
            return take_over(cache, key, computing, me)  # filed anew under this key (_own)
        if alone or computing is me or computing == me:  # recursion: this caller computes it
            counter.misses += 1
            return False
        if type(record) is not Waited:
            record = cache._flights[key] = Waited(computing)
        counter.hits += 1
    if record.future.done() or _waits.may_wait(me, record.owner, record.future):
        return record
    with cache._lock:  # a cycle of waiters: counted as a hit, it computes after all
        counter.hits -= 1
        counter.misses += 1
    return False


async def run_async(
    cache: Cache, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Counter, extra: Any
) -> Any:
    """``run`` for tasks; if the computing task is cancelled, a live waiter computes."""
    trio, record, step = (me := _waits.task_me()) is None, None, _STARTED  # (no local holds it)
    if trio:  # registered as its thread: a delete finds it; nobody else's waited for
        me = thread_me()
    try:
        record = cache._flights.setdefault(key, me)
        while record is not me:
            step = None  # see run
            step = _next_step(cache, key, me, counter, trio)  # trio: another's is not waited for
            if step is True:
                break
            if type(step) is tuple:
                return step[0]
            if step is False:
                return await _unshared_async(cache, key, fn, args, kwargs, counter, extra)
            try:
                got = await _waits.result_async(step.future, cache._flights, key, step)
                value = _outcome(cache, counter, got)
            finally:
                done_waiting(me, step.future)
                record = step = got = None  # as in run
            if value is not MISSING:  # else its caller was cancelled: look, join, compute
                return value
    except BaseException as exc:  # see run
        interrupted(cache, key, me, exc, None if step is None else record)
        me = record = None  # the task, in the frame its error holds: a cycle if it fails
        raise
    start = 0.0
    try:
        if len(cache._flights) > cache._flights_cap:  # tasks of closed loops (a shared tier:
            drop_dead(cache)  # for ever); not in the generated miss: 290 instructions
        counter.misses += 1
        if counter.timed:
            start = _now()
        value = await fn(*args, **kwargs)
        if is_lazy(value):
            refuse_memoized_result(fn, value)
        if start:
            counter.compute_s += _now() - start
            start = 0.0
        return finish(cache, key, me, value, counter, extra)
    except BaseException as exc:  # cancellation too: a waiter computes instead
        try:
            failed(cache, key, me, counter, start, exc)
        except BaseException:  # see run
            failed(cache, key, me, counter, 0.0, exc)
            raise
        raise
    finally:
        # The task, kept by its own error where a frame keeps its caller's (3.12+, f_back).
        value = me = record = None


async def _unshared_async(
    cache: Cache, key: Hashable, fn: Fn, args: Args, kwargs: Kwargs, counter: Counter, extra: Any
) -> Any:
    """Compute without registering (trio, recursion, a cycle of waiters), timed all the same."""
    seen, start = _seen(cache, key), _now() if counter.timed else 0.0
    try:
        value = await fn(*args, **kwargs)
    finally:
        if start:
            counter.compute_s += _now() - start
    if is_lazy(value):
        refuse_memoized_result(fn, value)
    return _keep(cache, key, value, counter, extra, seen)
