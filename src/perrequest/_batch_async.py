"""The async path of ``@request_batch``: the loads of one event-loop tick share one call.

``load`` and ``load_many`` are plain functions that return an awaitable, as
DataLoader's do: a hit returns a finished future kept with the value; a miss,
the caller's own future, so that cancelling one caller cancels nobody else's
wait. Each loader has a ``_State`` per store and event loop, in the store's
``_flights`` while it has work: the keys in flight with who waits for each, and
the pending batch, which every key missing before it starts joins. The batch
runs in a task of its own and settles every key it took in a ``finally``,
whatever happened to the scope: each waiter gets the value, the key's
exception, or (the batch was cancelled or interrupted) a place in the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable, Iterable
from typing import Any

from ._active import _current, here
from ._batching import _BatchSpec, now
from ._flight import MISSING
from ._stats import Counter
from .errors import ScopeClosed
from .store import MemoStore

# Marks a failed key in _settle: its value is not stored.
_FAILED: Any = object()
# Batch tasks while they run (the event loop keeps only weak references to tasks).
_running: set[asyncio.Task[None]] = set()
_Future = asyncio.Future


class _State:
    """One loader's work in one store on one event loop. ``inflight`` maps a cache key
    to who waits for it: a future (one ``load``), a ``(_Waiter, index)`` pair (one
    ``load_many``), or a list of those once several wait."""

    __slots__ = ("cks", "counter", "inflight", "keys", "loop", "spec", "store", "where")

    def __init__(self, spec: _BatchSpec, store: MemoStore, loop: asyncio.AbstractEventLoop) -> None:
        self.spec, self.store, self.loop = spec, store, loop
        self.counter: Counter = store._counter(spec.name)  # ScopeClosed once closed
        self.inflight: dict[Hashable, Any] = {}
        self.keys: list[Any] | None = None  # the pending batch: its load keys,
        self.cks: list[Hashable] | None = None  # and their cache keys (same list if no key=)
        self.where = (spec, loop)

    def join(self, key: Any, ck: Hashable, who: Any) -> None:
        """Wait for ``ck``: with its flight, or in the pending batch (misses are counted
        when it starts)."""
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
        else:
            if type(other) is list:
                other.append(who)
            else:
                inflight[ck] = [other, who]
            self.counter.hits += 1


def _state(spec: _BatchSpec, store: MemoStore, loop: asyncio.AbstractEventLoop) -> _State | None:
    """The loader's state in ``store`` on ``loop``; None once the scope has ended."""
    if store._closed:
        return None
    try:
        state: _State | None = store._flights.get((spec, loop))
    except AttributeError:  # nothing written to the store yet
        state = None
    if state is None:
        try:
            state = _State(spec, store, loop)
        except ScopeClosed:
            return None
        with store._lock:
            store._flights[state.where] = state
            store._reserve(spec)  # lookups of keys in flight now miss without raising
    return state


class _Waiter:
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


def make_load(spec: _BatchSpec) -> Callable[[Any], Any]:
    """``load(key)``: a hit is the store's two lookups and returns the finished future
    kept with the value; anything else is ``_load_slow``'s."""
    get_store, key_fn, owner = _current.get, spec.key_fn, spec
    bounded = spec.max_entries is not None
    get_loop = asyncio.get_running_loop

    if key_fn is None and not bounded:  # the common case, with nothing to decide

        def load(key: Any) -> Any:
            store = get_store()
            if store is not None:
                try:
                    entry = store._subs[owner].get(key)
                except (KeyError, TypeError, AttributeError):  # a miss; or no store yet
                    entry = None
                if entry is not None:
                    store._order.move_to_end(entry[2])
                    entry[1].hits += 1
                    return entry[3] or _ready(store, owner, key, entry)
                loop = get_loop()  # a miss, inline: a batch of 100 loads makes 100 of them
                try:
                    state = store._flights.get((owner, loop))
                except AttributeError:  # nothing written to the store yet
                    state = None
                if state is None or store._closed:
                    return _load_slow(spec, store, key, key)
                future = loop.create_future()
                state.join(key, key, future)
                return future
            return _outside_one(spec, key)

        spec.load = load
        return load

    def load_keyed(key: Any) -> Any:
        store = get_store()
        if store is not None:
            ck = key if key_fn is None else key_fn(key)
            try:
                sub = store._subs[owner]
                entry = sub.get(ck)
            except (KeyError, TypeError, AttributeError):
                entry = None
            if entry is not None:
                store._order.move_to_end(entry[2])
                if bounded:
                    sub.move_to_end(ck)
                entry[1].hits += 1
                return entry[3] or _ready(store, owner, ck, entry)
            return _load_slow(spec, store, key, ck)
        return _outside_one(spec, key)

    spec.load = load_keyed
    return load_keyed


def _ready(store: MemoStore, spec: _BatchSpec, ck: Hashable, entry: tuple[Any, ...]) -> Any:
    """A finished future for a value stored without one (``prime``, ``load_many``)."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(entry[0])
    with store._lock:
        if store._lookup((spec, ck), touch=False) is entry[0]:
            store._fill((spec, ck), entry[0], entry[1], future)
    return future


def _load_slow(spec: _BatchSpec, store: Any, key: Any, ck: Hashable) -> Any:
    if type(store) is list:  # a scope's cell (scope.open_request): make its store, load again
        here()
        return spec.load(key)
    loop = asyncio.get_running_loop()
    state = _state(spec, store, loop)
    if state is None:  # the scope has ended: outside any scope now
        return _outside_one(spec, key)
    future = loop.create_future()
    state.join(key, ck, future)
    return future


async def _outside_one(spec: _BatchSpec, key: Any) -> Any:
    return (await load_many(spec, [key]))[0]


def load_many(spec: _BatchSpec, keys: Iterable[Any]) -> Any:
    """``load_many(keys)``: a future of the values in order, or of the first key's failure."""
    keys, cache_keys = spec.keys_of(keys)
    store = here()
    state = None if store is None else _state(spec, store, asyncio.get_running_loop())
    if state is None:
        return spec.outside_async(keys, cache_keys)
    values = [state.store._lookup((spec, ck)) for ck in cache_keys]
    waiter = _Waiter(state.loop.create_future(), values)
    found = len(values)
    for i, value in enumerate(values):
        if value is MISSING:
            state.join(keys[i], cache_keys[i], (waiter, i))
            found -= 1
    waiter.remaining = len(values) - found
    state.counter.hits += found
    if not waiter.remaining:
        waiter.future.set_result(values)
    return waiter.future


def _start(state: _State) -> None:
    _spawn(state.loop, _run, state)


def _spawn(
    loop: asyncio.AbstractEventLoop, run: Callable[..., Coroutine[Any, Any, None]], *args: Any
) -> None:
    """Run ``run(*args, started)`` in a task. One cancelled before its first step (a
    shutdown cancelling every task) runs neither its body nor its ``finally``: its batch
    is started again, or its keys go in the next batch."""
    started: list[bool] = []
    task = loop.create_task(run(*args, started))
    _running.add(task)

    def ended(task: asyncio.Task[None]) -> None:
        _running.discard(task)
        if not started:
            (_start if run is _run else _restart)(*args)

    task.add_done_callback(ended)


async def _run(state: _State, started: list[bool]) -> None:
    """Take the pending batch and fetch it, in calls of at most ``max_batch_size`` keys."""
    started.append(True)
    keys, cks = state.keys, state.cks
    state.keys = state.cks = None
    assert keys is not None and cks is not None
    state.counter.misses += len(keys)
    size = state.spec.max_batch_size
    if size is not None and len(keys) > size:
        for i in range(size, len(keys), size):
            _spawn(state.loop, _run_chunk, state, keys[i : i + size], cks[i : i + size])
        keys, cks = keys[:size], cks[:size]
    await _run_chunk(state, keys, cks, started)


async def _run_chunk(
    state: _State, keys: list[Any], cks: list[Hashable], started: list[bool]
) -> None:
    """One call of the batch function; each value is stored (scope open) and handed over."""
    started.append(True)
    spec, counter = state.spec, state.counter
    start = now() if counter.timed else 0.0
    values: list[Any] | None = None
    try:
        values = spec.spread(keys, cks, await spec.fn(keys))
    except Exception as exc:  # the whole batch failed: so does every key
        values = [exc] * len(keys)
    finally:  # cancelled or interrupted (values is None): the waiters go in the next batch
        if start:
            counter.compute_s += now() - start
        if values is None:
            _restart(state, keys, cks)
        else:
            _settle(state, cks, values)


def _settle(state: _State, cks: list[Hashable], values: list[Any]) -> None:
    spec, store, inflight = state.spec, state.store, state.inflight
    anchors: list[Any] = []
    failures = False
    with store._lock:
        for ck, value in zip(cks, values, strict=True):
            who = inflight.pop(ck)
            if isinstance(value, Exception):
                for one in who if type(who) is list else (who,):
                    _deliver(one, value, True)
                anchors.append(_FAILED)
                failures = True
            elif type(who) is _Future:  # the common case: one load
                try:
                    who.set_result(value)  # runs no code now: it schedules the wake-up
                except asyncio.InvalidStateError:  # that caller was cancelled
                    who = None
                anchors.append(who)  # a finished future of the value, for later hits
            else:
                kept = None
                for one in who if type(who) is list else (who,):
                    kept = _deliver(one, value, False) or kept
                anchors.append(kept)
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


def _restart(state: _State, keys: list[Any], cks: list[Hashable]) -> None:
    """The batch ended without values: the keys somebody still waits for go in the next."""
    with state.store._lock:
        for key, ck in zip(keys, cks, strict=True):
            who = state.inflight.pop(ck)
            for one in who if type(who) is list else (who,):
                if not (one[0].future if type(one) is tuple else one).done():
                    state.join(key, ck, one)
        _release(state)


def _release(state: _State) -> None:
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
