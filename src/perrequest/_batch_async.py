"""Async misses: the keys missing in one event-loop tick form a batch (``_batch_tick``);
each caller has its own future, a ``load_many`` one for all its keys. Under trio, or
outside any scope, nothing is batched (``unbatched``)."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable
from typing import Any

from ._active import here, is_resolved
from ._batch_outcomes import settled
from ._batch_tick import state_of
from ._batch_waiters import fail
from ._batching import THREAD, UNTIMED, _BatchSpec
from ._flight import MISSING
from .store import MemoStore


def miss(spec: _BatchSpec, store: Any, key: Any, ck: Hashable) -> Any:
    """The key joins this tick's batch (a batch of 100 loads makes 100 of these)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio; or sync code, which must await
        _hashable(spec, key, ck)
        return _named(unbatched(spec, [key], [ck], one=True), spec, "load")
    try:
        state = store._flights.get((spec, loop))
    except AttributeError:  # a middleware's scope, its store not made yet
        state = None
    if state is None or store._closed:
        if not is_resolved(store):
            return spec.load(key)
        _hashable(spec, key, ck)  # refused before any bookkeeping is made for it
        state = state_of(spec, store, loop)
        if state is None:  # the scope has ended: outside any scope now
            return outside_one(spec, key)
    future = loop.create_future()
    state.join(key, ck, future)
    return future


def _hashable(spec: _BatchSpec, key: Any, ck: Hashable) -> None:
    try:
        hash(ck)
    except TypeError:
        raise spec.unhashable([key], [ck]) from None


def ready(store: MemoStore, spec: _BatchSpec, ck: Hashable, entry: tuple[Any, ...]) -> Any:
    """A finished future of a stored value, kept for later hits on this loop (a value
    stored without one, or with a stopped loop's)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _value(entry[0])
    future = loop.create_future()
    future.set_result(entry[0])
    with store._lock:  # in place: another thread's hit refreshes the entry by its id
        sub = None if store._subs is None else store._subs.get(spec)
        now = None if sub is None else sub.get(ck)
        if sub is not None and now is not None and now[0] is entry[0]:
            sub[ck] = (*now[:3], (loop, future, THREAD.__dict__))
    return future


async def _value(value: Any) -> Any:
    return value


def outside_one(spec: _BatchSpec, key: Any) -> Any:
    """``load(key)`` outside any scope: a future where an asyncio loop runs, as in a scope
    (``asyncio.create_task`` refuses it in a unit test as in production); else a coroutine."""
    return _future(_one(spec, key))


async def _one(spec: _BatchSpec, key: Any) -> Any:
    return (await load_many(spec, [key]))[0]


def _future(coroutine: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio: no asyncio loop to run a task
        return coroutine
    return asyncio.ensure_future(coroutine)


def in_flight(spec: _BatchSpec, store: MemoStore, ck: Hashable) -> bool:
    """Whether ``ck`` is in a batch of the running loop's, or of any open loop's from a
    thread where none runs (``asyncio.to_thread``; a closed loop's batch never ends: its
    state stays until the next batch starts); the store's lock held."""
    try:
        states = [store._flights.get((spec, asyncio.get_running_loop()))]
    except RuntimeError:  # no asyncio loop running here
        flights = list(store._flights.items())  # keys by identity: no key's code runs
        mine = [v for k, v in flights if type(k) is tuple and len(k) == 2 and k[0] is spec]
        states = [state for state in mine if not state.loop.is_closed()]
    return any(s is not None and (ck in s.inflight or ck in (s.own or ())) for s in states)


def load_many(spec: _BatchSpec, keys: Iterable[Any]) -> Any:
    """A future of the values in order, or of the first failing key's exception."""
    keys, cks = spec.keys_of(keys)
    store = here()
    if store is None or store._closed:
        return _future(unbatched(spec, keys, cks, outside=True))
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no asyncio loop running: trio
        return _named(unbatched(spec, keys, cks), spec, "load_many")
    values = [store._lookup((spec, ck)) for ck in cks]
    missing = [i for i, value in enumerate(values) if value is MISSING]
    state = state_of(spec, store, loop) if missing else None  # none made for hits alone
    counter = spec.counter_in(store) if state is None else state.counter
    if counter is None:  # the scope has ended meanwhile
        return _future(unbatched(spec, keys, cks, outside=True))
    many = _Many(loop.create_future(), values, len(missing))
    for i in missing:
        state.join(keys[i], cks[i], (many, i))  # type: ignore[union-attr]
    counter.hits += len(values) - len(missing)
    if not missing:
        many.future.set_result(values)
    return many.future


class _Many:
    """A ``load_many`` waiting for keys: its future, its values, how many are to come."""

    __slots__ = ("failed", "future", "remaining", "values")

    def __init__(self, future: asyncio.Future[list[Any]], values: list[Any], remaining: int):
        self.future, self.values, self.remaining = future, values, remaining
        self.failed = False

    def put(self, i: int, value: Any, failed: bool) -> None:
        if self.values[i] is not MISSING:  # handed already (a key failed as it was asked again)
            return
        self.values[i] = value
        self.failed |= failed
        self.remaining -= 1
        if not self.remaining:
            if self.failed:
                fail(self.future, next(v for v in self.values if issubclass(type(v), Exception)))
            else:
                self.future.set_result(self.values)


def _named(coroutine: Any, spec: _BatchSpec, method: str) -> Any:
    """Named after the loader, so that one never awaited (a ``def`` endpoint calling an
    async loader's ``load``) is reported as ``coroutine 'app.users.load' was never
    awaited``, not as this module's ``unbatched``."""
    coroutine.__qualname__ = coroutine.__name__ = f"{spec.name}.{method}"
    return coroutine


async def unbatched(
    spec: _BatchSpec, keys: list[Any], cks: list[Hashable], outside: bool = False, one: bool = False
) -> Any:
    """Async loads with no asyncio loop running (trio), or ``outside`` any scope as found
    when called: what the store lacks is fetched by this call and cached (in a scope).
    ``one``: ``load(key)``'s value, so that a load is one coroutine (one frame per level
    of a batch function loading its own keys; one warning when never awaited)."""
    store = None if outside else here()
    counter = spec.counter_in(store)
    got: dict[Hashable, Any] = {}
    if store is None or counter is None:
        values: list[Any] = [MISSING] * len(cks)
        await spec.fetch_async(UNTIMED, spec.outside(keys, cks), got)
    else:
        values, wanted = spec.look(store, counter, keys, cks)
        try:
            await spec.fetch_async(counter, wanted, got)
        finally:  # cancelled between chunks (trio's move_on_after): what came is kept too
            with store._lock:  # a value stored meanwhile (prime) stays, and is returned
                spec.keep(store, counter, got)
    try:
        values = settled(cks, values, got)
    finally:  # as in _BatchSpec.load_many
        got = None  # type: ignore[assignment]
    return values[0] if one else values
