"""The batch side of an async ``@request_batch``: the tasks that call the batch function.

Each loader has a ``State`` per store and event loop, in the store's
``_flights`` while it has work: the keys in flight with who waits for each, and
the pending batch, which every key missing before it starts joins. Each call of
the batch function runs in a task of its own (held in ``_running``), whose
done-callback settles every key it took, whatever happened to the task or the
scope: each waiter gets the value or the key's exception; if the task was
cancelled, a place in the next batch. A batch function that loads a key of its
own batch gets it fetched by itself (waiting for the batch would wait for itself).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Hashable
from contextvars import ContextVar
from typing import Any

from ._batching import _BatchSpec, now
from ._stats import Counter
from .errors import ScopeClosed
from .store import MemoStore

# Marks a failed key in _settle: its value is not stored.
_FAILED: Any = object()
_Future = asyncio.Future
# In a batch's tasks: its state and the cache keys of the whole batch, every chunk's (a
# load of one of them from inside the batch function would wait for itself).
_fetching: ContextVar[tuple[Any, list[Hashable]] | None] = ContextVar(
    "perrequest.batch", default=None
)
# Batch tasks while they run, by event loop (a loop keeps only weak references to its
# tasks), with their states. A loop that closed with tasks it never finished (a shutdown)
# leaves them here until the next batch task starts, which drops them and their states.
_running: dict[asyncio.AbstractEventLoop, dict[asyncio.Task[Any], State]] = {}


class State:
    """One loader's work in one store on one event loop. ``inflight`` maps a cache key
    to who waits for it: a future (one ``load``), a ``(Waiter, index)`` pair (one
    ``load_many``), or a list of those once several wait."""

    __slots__ = ("cks", "counter", "inflight", "keys", "loop", "spec", "store", "where")

    def __init__(self, spec: _BatchSpec, store: MemoStore, loop: asyncio.AbstractEventLoop) -> None:
        self.spec, self.store, self.loop = spec, store, loop
        self.counter: Counter = store._counter(spec.name)  # ScopeClosed once closed
        self.inflight: dict[Hashable, Any] = {}
        self.keys: list[Any] | None = None  # the pending batch: its load keys,
        self.cks: list[Hashable] | None = None  # and their cache keys (same list if no key=)
        self.where = (spec, loop)

    def join(self, key: Any, ck: Hashable, who: Any, again: bool = False) -> None:
        """Wait for ``ck``: with its flight (a hit), or in the pending batch (misses are
        counted when it starts). ``again``: a wait put back after a cancelled batch."""
        inflight = self.inflight
        try:
            other = inflight.get(ck)
        except TypeError:
            raise self.spec.unhashable([key], [ck]) from None
        if other is None:
            inflight[ck] = who
            keys = self.keys
            if keys is None:
                keys = self.keys = []
                self.cks = keys if self.spec.key_fn is None else []
                self.loop.call_soon(_start, self)
            keys.append(key)
            if self.cks is not keys:
                self.cks.append(ck)  # type: ignore[union-attr]
        elif (
            not again
            and (fetching := _fetching.get())
            and fetching[0] is self
            and ck in fetching[1]
        ):
            self.counter.misses += 1  # its own batch loads it: waiting would wait for itself
            _spawn(self, [key], [ck], fetching[1], who)
        else:
            if type(other) is list:
                other.append(who)
            else:
                inflight[ck] = [other, who]
            self.counter.hits += not again


def state_of(spec: _BatchSpec, store: MemoStore, loop: asyncio.AbstractEventLoop) -> State | None:
    """The loader's state in ``store`` on ``loop``; None once the scope has ended."""
    if store._closed:
        return None
    state: State | None = store._flights.get((spec, loop))
    if state is None:
        try:
            state = State(spec, store, loop)
        except ScopeClosed:
            return None
        with store._lock:
            store._flights[state.where] = state
            store._reserve(spec)  # lookups of keys in flight now miss without raising
    return state


class Waiter:
    """A ``load_many`` waiting for keys: its future and the values it fills in."""

    __slots__ = ("failed", "future", "remaining", "values")

    def __init__(self, future: asyncio.Future[list[Any]], values: list[Any]) -> None:
        self.future = future
        self.values = values
        self.remaining = 0
        self.failed = False

    def put(self, i: int, value: Any, failed: bool) -> None:
        self.values[i] = value
        self.failed |= failed
        self.remaining -= 1
        if not self.remaining:
            if self.failed:
                _fail(self.future, next(v for v in self.values if isinstance(v, Exception)))
            else:
                self.future.set_result(self.values)


def _start(state: State) -> None:
    """Take the pending batch and start its calls, a task each of at most
    ``max_batch_size`` keys; first drop what loops that have closed left (no lock is held
    here, so taking their stores' locks cannot deadlock)."""
    for closed in [loop for loop in list(_running) if loop.is_closed()]:
        for left in _running.pop(closed, {}).values():
            _drop(left)
    keys, cks = state.keys, state.cks
    state.keys = state.cks = None
    assert keys is not None and cks is not None
    state.counter.misses += len(keys)
    size = state.spec.max_batch_size or len(keys)
    for i in range(0, len(keys), size):
        _spawn(state, keys[i : i + size], cks[i : i + size], cks)


def _spawn(
    state: State, keys: list[Any], cks: list[Hashable], batch: list[Hashable], who: Any = None
) -> None:
    """Call the batch function for ``keys`` in a task, held in ``_running`` while it runs
    (a loop keeps only weak references). Its done-callback hands the outcome over, which
    also covers a task cancelled before its first step (a shutdown cancelling every task),
    whose body never ran."""
    task = state.loop.create_task(_call(state, keys, cks, batch))
    _running.setdefault(state.loop, {})[task] = state
    task.add_done_callback(functools.partial(_ended, state, keys, cks, batch, who))


async def _call(state: State, keys: list[Any], cks: list[Hashable], batch: list[Hashable]) -> Any:
    """One call of the batch function: a value (or an ``Exception``) per key. ``batch``:
    the cache keys of every chunk of its batch, which it cannot wait for (``join``)."""
    _fetching.set((state, batch))
    spec, counter = state.spec, state.counter
    start = now() if counter.timed else 0.0
    try:
        return spec.spread(keys, cks, await spec.fn(keys))
    except Exception as exc:  # the whole call failed: so does every key
        return [exc] * len(keys)
    except asyncio.CancelledError as exc:
        if _cancelled():
            raise
        return [_interrupted(spec, exc)] * len(keys)  # raised by the batch function itself
    finally:
        if start:
            counter.compute_s += now() - start


def _ended(
    state: State,
    keys: list[Any],
    cks: list[Hashable],
    batch: list[Hashable],
    who: Any,
    task: asyncio.Task[list[Any]],
) -> None:
    """Each value is stored (scope open) and handed over: to every waiter (``_settle``),
    or to ``who`` alone for a key loaded by its own batch (the batch stores it). A
    cancelled task's keys go in the next batch (a lone key: in a task again) while the
    scope is open."""
    tasks = _running.get(state.loop, {})
    tasks.pop(task, None)
    if not tasks:
        _running.pop(state.loop, None)
    if task.cancelled():
        if who is None:
            _restart(state, keys, cks)
        elif not state.store._closed:
            _spawn(state, keys, cks, batch, who)
        else:  # as _restart does once the scope has ended: no call after the request
            (who[0].future if type(who) is tuple else who).cancel()
        return
    exc = task.exception()  # KeyboardInterrupt, SystemExit: every key fails
    values = task.result() if exc is None else [_interrupted(state.spec, exc)] * len(keys)
    if who is None:
        _settle(state, cks, values)
    else:
        _deliver(who, values[0], isinstance(values[0], Exception))


def _cancelled() -> bool:
    """Whether the running batch task is being cancelled (rather than its batch function
    raising ``CancelledError`` of its own)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # closed by the garbage collector, outside any loop
        return True
    return task is None or task.cancelling() > 0


def _interrupted(spec: _BatchSpec, exc: BaseException) -> RuntimeError:
    error = RuntimeError(
        f"@request_batch {spec.name}: the batch function raised {exc!r} without its task "
        "being cancelled, so every key of the batch fails. Let it return or raise an "
        "Exception."
    )
    error.__cause__ = exc
    return error


def _settle(state: State, cks: list[Hashable], values: list[Any]) -> None:
    spec, store, inflight = state.spec, state.store, state.inflight
    anchors: list[Any] = []
    failures = False
    with store._lock:
        for ck, value in zip(cks, values, strict=True):
            who = inflight.pop(ck)
            failed = isinstance(value, Exception)
            if type(who) is _Future and not failed:  # the common case: one load
                try:
                    who.set_result(value)  # runs no code now: it schedules the wake-up
                except asyncio.InvalidStateError:  # that caller was cancelled
                    who = None
                # A finished future of the value, for later hits on this loop.
                anchors.append(None if who is None else (state.loop, who))
            else:
                kept = None
                for one in who if type(who) is list else (who,):
                    kept = _deliver(one, value, failed) or kept
                anchors.append(_FAILED if failed else None if kept is None else (state.loop, kept))
                failures |= failed
        if failures:  # failures are not stored
            kept = [i for i, anchor in enumerate(anchors) if anchor is not _FAILED]
            cks, values = [cks[i] for i in kept], [values[i] for i in kept]
            anchors = [anchors[i] for i in kept]
        store._fill_many(spec, cks, values, anchors, state.counter)  # a closed store: nothing
        _release(state)


def _deliver(who: Any, value: Any, failed: bool) -> Any:
    """Hand one waiter its value; the future now holding the value, if any."""
    if type(who) is tuple:
        waiter, i = who
        if not waiter.future.done():
            waiter.put(i, value, failed)
        return None
    if who.done():
        return None
    if failed:
        _fail(who, value)
        return None
    who.set_result(value)
    return who


def _restart(state: State, keys: list[Any], cks: list[Hashable]) -> None:
    """The batch's task was cancelled: the keys somebody still waits for go in the next
    batch, while the scope is open; once it has ended (a shutdown after the request),
    their waits are cancelled rather than the batch function called again."""
    with state.store._lock:
        for key, ck in zip(keys, cks, strict=True):
            who = state.inflight.pop(ck)
            for one in who if type(who) is list else (who,):
                future = one[0].future if type(one) is tuple else one
                if future.done():
                    continue
                if state.store._closed:
                    future.cancel()
                else:
                    state.join(key, ck, one, again=True)
        _release(state)


def _drop(state: State) -> None:
    """Forget the state's work: its loop has closed, so nobody waits for it any more."""
    with state.store._lock:
        state.inflight.clear()
        state.keys = state.cks = None
        _release(state)


def _release(state: State) -> None:
    """Drop the state from the store once it has nothing in flight or pending."""
    if not state.inflight and state.keys is None:
        flights = state.store._flights
        if flights.get(state.where) is state:
            del flights[state.where]
            state.store._unreserve(state.spec)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except TypeError:  # StopIteration cannot travel through a future
        future.set_exception(RuntimeError(f"the batch function's value was {exc!r}"))
