"""Async loads: a cached ``load`` answered from the store, a miss joining the batch of
its event-loop tick (``_batch_tasks``), ``load_many``, and loads outside any scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ._active import _current, here
from ._batch_tasks import fail, state_of
from ._batching import UNTIMED, _BatchSpec, missing_keys, now, settled
from ._flight import MISSING
from ._stats import Counter
from .store import MemoStore


def make_load(spec: _BatchSpec) -> Callable[[Any], Any]:
    """An async loader's ``load(key)``: a hit is the store's two lookups and returns the
    finished future kept with the value; anything else is ``_miss``'s."""
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
    except AttributeError:  # a middleware's scope, its store not made yet
        state = None
    if state is None or store._closed:
        if type(store) is list:  # make it, and load again
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
    """An async loader's ``load_many(keys)``: a future of the values in order, or of the
    first failing key's exception."""
    keys, cks = spec.keys_of(keys)
    store = here()
    if store is None or store._closed:
        return _outside(spec, keys, cks)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _unbatched(spec, keys, cks)
    values = [store._lookup((spec, ck)) for ck in cks]
    missing = [i for i, value in enumerate(values) if value is MISSING]
    state = state_of(spec, store, loop) if missing else None  # none made for hits alone
    counter = spec.counter_in(store) if state is None else state.counter
    if counter is None:  # the scope has ended meanwhile
        return _outside(spec, keys, cks)
    many = _Many(loop.create_future(), values, len(missing))
    for i in missing:
        state.join(keys[i], cks[i], (many, i))  # type: ignore[union-attr]
    counter.hits += len(values) - len(missing)
    if not missing:
        many.future.set_result(values)
    return many.future


async def _outside(spec: _BatchSpec, keys: list[Any], cks: list[Hashable]) -> list[Any]:
    """Outside any scope: called directly (per ``max_batch_size``), nothing cached."""
    spec.refuse_or_warn()
    out: dict[Hashable, Any] = {}
    await fetch_async(spec, UNTIMED, missing_keys(keys, cks), out)
    return settled([out[ck] for ck in cks])


async def _unbatched(
    spec: _BatchSpec, keys: list[Any], cks: list[Hashable], single: bool = False
) -> Any:
    """With no asyncio loop running (trio): what the store lacks is fetched by this call
    (per ``max_batch_size``) and cached; loads are not batched across calls."""
    store = here()
    counter = spec.counter_in(store)
    if store is None or counter is None:
        values = await _outside(spec, keys, cks)
    else:
        values, wanted = spec.look(store, counter, keys, cks)
        counter.misses += len(wanted)
        got: dict[Hashable, Any] = {}
        await fetch_async(spec, counter, wanted, got)
        with store._lock:  # a value stored meanwhile (prime) stays: loads may have seen it
            new = {ck: v for ck, v in got.items() if store._lookup((spec, ck), False) is MISSING}
            spec.keep(store, counter, new)
        values = settled(
            [got[ck] if v is MISSING else v for ck, v in zip(cks, values, strict=True)]
        )
    return values[0] if single else values


async def fetch_async(
    spec: _BatchSpec, counter: Counter, wanted: dict[Hashable, Any], out: dict[Hashable, Any]
) -> None:
    """``spec.fetch`` of an async batch function."""
    for cks in spec.chunks(list(wanted)):
        keys = [wanted[ck] for ck in cks]
        start = now() if counter.timed else 0.0
        try:
            values = spec.spread(keys, cks, await spec.fn(keys))
        except Exception as exc:
            values = [exc] * len(keys)
        finally:
            if start:
                counter.compute_s += now() - start
        out.update(zip(cks, values, strict=True))


class _Many:
    """A ``load_many`` waiting for keys: its future, its values, how many are to come."""

    __slots__ = ("failed", "future", "remaining", "values")

    def __init__(self, future: asyncio.Future[list[Any]], values: list[Any], remaining: int):
        self.future, self.values, self.remaining = future, values, remaining
        self.failed = False

    def put(self, i: int, value: Any, failed: bool) -> None:
        self.values[i] = value
        self.failed |= failed
        self.remaining -= 1
        if not self.remaining:
            if self.failed:
                fail(self.future, next(v for v in self.values if isinstance(v, Exception)))
            else:
                self.future.set_result(self.values)
