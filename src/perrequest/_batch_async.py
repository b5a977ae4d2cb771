"""The callers' side of an async ``@request_batch``: the loads of one event-loop tick
share one call.

``load`` and ``load_many`` are plain functions that return an awaitable, as
DataLoader's do: a hit returns a finished future kept with the value (made
again on another event loop); a miss, the caller's own future, so that
cancelling one caller cancels nobody else's wait. The batch itself, and how
its outcome reaches the callers, is ``_batch_tasks``'s. With no asyncio loop
running (trio), each call fetches what the store lacks by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ._active import _current, here
from ._batch_tasks import Waiter, state_of
from ._batching import _BatchSpec, now, settled
from ._flight import MISSING
from .errors import ScopeClosed
from .store import MemoStore


def make_load(spec: _BatchSpec) -> Callable[[Any], Any]:
    """``load(key)``: a hit is the store's two lookups and returns the finished future
    kept with the value; anything else is ``_miss``'s."""
    get_store, key_fn, owner = _current.get, spec.key_fn, spec
    bounded = spec.max_entries is not None

    def load(key: Any) -> Any:
        store = get_store()
        if store is None:
            return _outside_one(spec, key)
        try:
            entry = store._subs[owner].get(key)
            if entry is not None:
                store._order.move_to_end(entry[2])  # KeyError: evicted by another thread
        except (KeyError, TypeError, AttributeError):  # a miss; no store yet; unhashable
            entry = None
        if entry is None:
            return _miss(spec, store, key, key)
        entry[1].hits += 1
        anchor = entry[3]
        # (loop, its finished future) while that loop runs: after asyncio.run or
        # async_to_sync, the next loop's gather() and wait_for() would refuse it.
        if anchor is not None and anchor[0].is_running():
            return anchor[1]
        return _ready(store, owner, key, entry)

    def load_keyed(key: Any) -> Any:  # with key= or a bound of its own
        store = get_store()
        if store is None:
            return _outside_one(spec, key)
        ck = key if key_fn is None else key_fn(key)
        try:
            sub = store._subs[owner]
            entry = sub.get(ck)
            if entry is not None:
                store._order.move_to_end(entry[2])
                if bounded:
                    sub.move_to_end(ck)
        except (KeyError, TypeError, AttributeError):
            entry = None
        if entry is None:
            return _miss(spec, store, key, ck)
        entry[1].hits += 1
        anchor = entry[3]
        if anchor is not None and anchor[0].is_running():
            return anchor[1]
        return _ready(store, owner, ck, entry)

    spec.load = load if key_fn is None and not bounded else load_keyed
    return spec.load


def _miss(spec: _BatchSpec, store: Any, key: Any, ck: Hashable) -> Any:
    """The key joins this tick's batch (a batch of 100 loads makes 100 of these)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _unbatched(spec, [key], [ck], single=True)
    try:
        state = store._flights.get((spec, loop))
    except AttributeError:  # a scope's cell
        state = None
    if state is None or store._closed:
        if type(store) is list:  # a scope's cell (scope.open_request): make its store, load again
            here()
            return spec.load(key)
        try:
            hash(ck)
        except TypeError:  # refused before any bookkeeping is made for it
            raise spec.unhashable([key], [ck]) from None
        state = state_of(spec, store, loop)
        if state is None:  # the scope has ended: outside any scope now
            return _outside_one(spec, key)
    future = loop.create_future()
    state.join(key, ck, future)
    return future


def _ready(store: MemoStore, spec: _BatchSpec, ck: Hashable, entry: tuple[Any, ...]) -> Any:
    """A finished future of a stored value, on this loop, kept for later hits: for a value
    stored without one (``prime``, ``load_many``) or with a loop's that has stopped."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _value(entry[0])
    future = loop.create_future()
    future.set_result(entry[0])
    with store._lock:
        if store._lookup((spec, ck), touch=False) is entry[0]:
            store._fill((spec, ck), entry[0], entry[1], (loop, future))
    return future


async def _value(value: Any) -> Any:
    return value


async def _outside_one(spec: _BatchSpec, key: Any) -> Any:
    return (await load_many(spec, [key]))[0]


def load_many(spec: _BatchSpec, keys: Iterable[Any]) -> Any:
    """``load_many(keys)``: a future of the values in order, or of the first key's failure."""
    keys, cache_keys = spec.keys_of(keys)
    store = here()
    if store is None or store._closed:
        return _outside(spec, keys, cache_keys)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _unbatched(spec, keys, cache_keys)
    values = [store._lookup((spec, ck)) for ck in cache_keys]
    if all(value is not MISSING for value in values):  # no bookkeeping made for a hit
        try:
            store._counter(spec.name).hits += len(values)
        except ScopeClosed:  # closed since
            return _outside(spec, keys, cache_keys)
        future = loop.create_future()
        future.set_result(values)
        return future
    state = state_of(spec, store, loop)
    if state is None:
        return _outside(spec, keys, cache_keys)
    waiter = Waiter(loop.create_future(), values)
    found = len(values)
    for i, value in enumerate(values):
        if value is MISSING:
            state.join(keys[i], cache_keys[i], (waiter, i))
            found -= 1
    waiter.remaining = len(values) - found  # at least one: all hits went to _hits
    state.counter.hits += found
    return waiter.future


async def _outside(spec: _BatchSpec, keys: list[Any], cache_keys: list[Hashable]) -> list[Any]:
    """Outside any scope: called directly (per ``max_batch_size``), nothing cached."""
    spec.refuse_or_warn()
    values: list[Any] = []
    for chunk, cks in zip(spec.chunks(keys), spec.chunks(cache_keys), strict=True):
        values += spec.spread(chunk, cks, await spec.fn(chunk))
    return settled(values)


async def _unbatched(
    spec: _BatchSpec, keys: list[Any], cache_keys: list[Hashable], single: bool = False
) -> Any:
    """With no asyncio loop running (trio): what the store lacks is fetched in this
    call (per ``max_batch_size``) and cached; loads are not batched across calls."""
    store = here()
    try:
        counter = None if store is None else store._counter(spec.name)
    except ScopeClosed:
        counter = None
    if store is None or counter is None:
        values = await _outside(spec, keys, cache_keys)
        return values[0] if single else values
    values = [store._lookup((spec, ck)) for ck in cache_keys]
    wanted = {ck: key for key, ck, v in zip(keys, cache_keys, values, strict=True) if v is MISSING}
    counter.hits += len(values) - len(wanted)
    counter.misses += len(wanted)
    got: dict[Hashable, Any] = {}
    start = now() if counter.timed else 0.0
    for chunk in spec.chunks(list(wanted)) if wanted else ():
        load_keys = [wanted[ck] for ck in chunk]
        try:
            got.update(
                zip(chunk, spec.spread(load_keys, chunk, await spec.fn(load_keys)), strict=True)
            )
        except Exception as exc:
            got.update(dict.fromkeys(chunk, exc))
    if start:
        counter.compute_s += now() - start
    with store._lock:
        for ck, value in got.items():
            if not isinstance(value, Exception):
                store._fill((spec, ck), value, counter, None)
    values = settled(
        [got[ck] if v is MISSING else v for ck, v in zip(cache_keys, values, strict=True)]
    )
    return values[0] if single else values
