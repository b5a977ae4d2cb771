"""Each event-loop tick's batches: a task per call of the batch function, whose
done-callback hands each caller (a future, or a ``load_many``'s place) its value,
whatever happened to the task or the scope."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Hashable
from contextvars import ContextVar
from typing import Any

from ._active import logger
from ._batch_waiters import hand, joined, unfiled
from ._batching import THREAD, _BatchSpec, now
from ._stats import Counter
from .errors import ScopeClosed
from .store import MemoStore

_Future = asyncio.Future
# In a batch's tasks and theirs: the state whose batches they must not wait for.
_fetching: ContextVar[_State | None] = ContextVar("perrequest.batch", default=None)
# Batch tasks while they run, with their states, by loop (a loop holds its tasks weakly);
# a loop closed with tasks unfinished (a shutdown) leaves them until the next batch starts.
_running: dict[asyncio.AbstractEventLoop, dict[asyncio.Task[Any], _State]] = {}


class _State:
    """One loader's batches in one store on one loop, in ``store._flights`` while it has
    work: each key in flight's slot (its waiters), the pending batch (``cks`` is ``keys``
    without ``key=``; ``slots`` theirs), a batch apart of keys its own batch functions
    load (``own``, ``own_keys``), keys asked again after a cancel (``again``), the calls
    of the batch function running (``parts``: a key may be in flight but in no slot)."""

    __slots__ = (
        "again", "cks", "counter", "inflight", "keys", "loop", "own", "own_keys", "parts",
        "slots", "spec", "store",
    )  # fmt: skip

    def __init__(self, spec: _BatchSpec, store: MemoStore, loop: asyncio.AbstractEventLoop) -> None:
        self.spec, self.store, self.loop = spec, store, loop
        self.counter: Counter = store._counter(spec.name)  # ScopeClosed once closed
        self.inflight: dict[Hashable, list[Any]] = {}
        self.keys: list[Any] | None = None
        self.cks: list[Hashable] | None = None
        self.slots: list[list[Any]] = []
        self.own: dict[Hashable, list[Any]] | None = None
        self.own_keys: list[tuple[Any, Hashable, list[Any]]] = []
        self.again: set[Hashable] = set()
        self.parts = 0

    def join(self, key: Any, ck: Hashable, who: Any) -> None:
        """Wait for ``ck``: with its flight (a hit), or in the pending batch. A batch function
        of this loader never waits for a batch that has started (its own, or one that may
        wait for it): it loads apart."""
        inflight = self.inflight
        try:
            slot = inflight.get(ck)
        except TypeError:
            raise self.spec.unhashable([key], [ck]) from None
        if slot is None:
            inflight[ck] = slot = [who]
            keys = self.keys
            if keys is None:  # the first: the batch's start is scheduled unless own's is
                keys = self.keys = []
                self.cks = keys if self.spec.key_fn is None else []
                if self.own is None:
                    _schedule(self)
            keys.append(key)
            if self.cks is not keys:
                self.cks.append(ck)  # type: ignore[union-attr]
            self.slots.append(slot)
        elif _fetching.get() is self and (self.cks is None or ck not in self.cks):
            self.join_own(key, ck, who)
        else:
            joined(slot, who)
            self.counter.hits += 1

    def join_own(self, key: Any, ck: Hashable, who: Any) -> None:
        own = self.own
        if own is None:
            own = self.own = {}
            if self.keys is None:
                _schedule(self)
        slot = own.get(ck)
        if slot is None:
            own[ck] = slot = [who]
            self.own_keys.append((key, ck, slot))
        else:
            joined(slot, who)
            self.counter.hits += 1


def state_of(spec: _BatchSpec, store: MemoStore, loop: asyncio.AbstractEventLoop) -> _State | None:
    """The loader's state in ``store`` on ``loop``; None once the scope has ended."""
    if store._closed:
        return None
    state: _State | None = store._flights.get((spec, loop))
    if state is None:
        try:
            state = _State(spec, store, loop)
        except ScopeClosed:
            return None
        with store._lock:
            store._flights[(spec, loop)] = state
            store._reserve(spec)  # lookups of keys in flight now miss without raising
    return state


def _schedule(state: _State) -> None:
    """Start the batch two loop iterations on, as DataLoader does (its dispatch is a task
    made on the next one): keys loaded one iteration apart (a GraphQL list of one item
    resolved before its sibling of two) join one call, not two."""
    state.loop.call_soon(state.loop.call_soon, _start, state)


def _start(state: _State) -> None:
    """Start the pending batches; first drop what closed loops left (no lock is held
    here, so taking their stores' locks cannot deadlock)."""
    for closed in [loop for loop in list(_running) if loop.is_closed()]:
        for left in _running.pop(closed, {}).values():
            with left.store._lock:  # nobody waits for a closed loop's work any more
                left.inflight.clear()
                left.keys = left.cks = left.own = None
                left.slots, left.own_keys, left.parts = [], [], 0
                _release(left)
    # All taken before any task exists: under an eager task factory (3.12+) a batch
    # function runs inside create_task, where its loads start the next batches.
    keys, cks, slots, own, pending = state.keys, state.cks, state.slots, state.own, state.own_keys
    state.keys = state.cks = state.own = None
    state.slots, state.own_keys = [], []
    if keys is not None:
        _spawn(state, keys, cks, slots, state.inflight)  # type: ignore[arg-type]
    if own is not None:  # (pending: the (key, cache key, slot) of each of own's keys)
        own_keys, own_cks, own_slots = (list(column) for column in zip(*pending, strict=True))
        _spawn(state, own_keys, own_cks, own_slots, own)


def _spawn(
    state: _State, keys: list[Any], cks: list[Hashable], slots: list[list[Any]],
    waiters: dict[Hashable, Any],
) -> None:  # fmt: skip
    """A task per call, held in ``_running``; its done-callback hands the values to the
    keys' ``slots`` and takes them out of ``waiters`` (a callback: a task cancelled before
    its first step runs no code)."""
    state.counter.misses += len(keys)
    size = state.spec.max_batch_size or len(keys)
    for i in range(0, len(keys), size):
        part, part_cks = keys[i : i + size], cks[i : i + size]
        ended = functools.partial(_ended, state, part, part_cks, slots[i : i + size], waiters)
        call = _call(state, part, part_cks)
        try:
            task = state.loop.create_task(call)
        except Exception as exc:  # a task factory that raises: the part fails, as a call would
            call.close()  # (never started)
            task = state.loop.create_future()  # type: ignore[assignment]
            task.set_result([exc] * len(part))
        _running.setdefault(state.loop, {})[task] = state
        state.parts += 1
        task.add_done_callback(ended)


async def _call(state: _State, keys: list[Any], cks: list[Hashable]) -> Any:
    """One call of the batch function: a value (or an ``Exception``) per key."""
    _fetching.set(state)
    spec, counter = state.spec, state.counter
    start = now() if counter.timed else 0.0
    try:
        return spec.spread(keys, cks, await spec.fn(passed := list(keys)), passed)
    except Exception as exc:  # the whole call failed: so does every key
        return [exc] * len(keys)
    except asyncio.CancelledError as exc:  # (a collected coroutine gets GeneratorExit)
        task = asyncio.current_task()  # a batch runs in a task of its running loop
        if task is None or task.cancelling():  # the task's, not the batch function's own
            raise
        return [_interrupted(spec, exc)] * len(keys)
    finally:
        if start:
            counter.compute_s += now() - start


def _ended(
    state: _State, keys: list[Any], cks: list[Hashable], slots: list[list[Any]],
    waiters: dict[Hashable, Any], task: Any,
) -> None:  # fmt: skip
    """Hand each key's value to its waiters and store it; a cancelled call's keys go in
    the next batch (``_again``)."""
    state.parts -= 1
    tasks = _running.get(state.loop, {})
    tasks.pop(task, None)
    if not tasks:
        _running.pop(state.loop, None)
    if task.cancelled():
        values = None
    else:
        exc = task.exception()  # KeyboardInterrupt, SystemExit: every key fails
        values = task.result() if exc is None else [_interrupted(state.spec, exc)] * len(keys)
    store, loop = state.store, state.loop
    with store._lock:
        unfiled(waiters, cks, slots)
        if values is None:
            own = waiters is not state.inflight
            for key, ck, slot in zip(keys, cks, slots, strict=True):
                try:
                    _again(state, key, ck, slot, own)
                except Exception as exc:  # the batch function broke its hash or __eq__
                    hand(slot, exc, True)  # so it cannot be asked for again
            _release(state)
            return
        values = _firsts(store, state.spec, cks, values)
        anchors: list[Any] = []
        failures, here = False, THREAD.__dict__  # the loop's thread
        for value, slot in zip(values, slots, strict=True):
            failed = issubclass(type(value), Exception)  # type(): runs no code of the value
            if len(slot) == 1 and type(who := slot[0]) is _Future and not failed:  # one load
                try:
                    who.set_result(value)  # runs no code now: it schedules the wake-up
                    anchors.append((loop, who, here))  # a finished future of it, for later hits
                except asyncio.InvalidStateError:  # that caller was cancelled
                    anchors.append(None)
            else:
                kept = hand(slot, value, failed)
                anchors.append(_FAILED if failed else None if kept is None else (loop, kept, here))
                failures |= failed
        try:
            if state.again:  # asked again, and answered this time (failures too)
                state.again.difference_update(cks)
            if failures:  # failures are not stored
                kept_at = [i for i, anchor in enumerate(anchors) if anchor is not _FAILED]
                cks, values = [cks[i] for i in kept_at], [values[i] for i in kept_at]
                anchors = [anchors[i] for i in kept_at]
            store._fill_many(state.spec, cks, values, anchors, state.counter)
        except Exception:  # a key that cannot be hashed any more: its value was handed
            logger.exception("perrequest: @request_batch %s could not store", state.spec.name)
        _release(state)


_FAILED: Any = object()  # an anchor's place for a failed key: it is not stored


def _firsts(store: MemoStore, spec: _BatchSpec, cks: list[Hashable], values: list[Any]) -> Any:
    """A value stored since the batch started (its key fetched twice: by another loop's
    batch, or apart for its own batch function) stays, and is what its loads get: one
    value per key. Lock held."""
    sub = (store._subs or {}).get(spec)
    if not sub:
        return values
    try:
        pairs = zip(cks, values, strict=True)
        got = [None if issubclass(type(v), Exception) else sub.get(ck) for ck, v in pairs]
    except Exception:  # a key that cannot be hashed any more: handed what was fetched
        return values
    return [v if entry is None else entry[0] for v, entry in zip(values, got, strict=True)]


def _again(state: _State, key: Any, ck: Hashable, slot: list[Any], own: bool) -> None:
    """Put the waits of a key whose call was cancelled in the next batch (cancel them once
    the scope has ended); fail them if it is cancelled again (it would be, for ever)."""
    if ck in state.again and not state.store._closed:
        state.again.discard(ck)
        hand(slot, _cancelled_again(state.spec), True)
        return
    for one in slot:
        future = one[0].future if type(one) is tuple else one
        if future.done():
            continue
        if state.store._closed:
            future.cancel()
            continue
        waiting = state.own if own else state.inflight
        if waiting is not None and ck in waiting:  # put back already, for its other waiters
            joined(waiting[ck], one)  # (no second hit)
        elif own:
            state.join_own(key, ck, one)
        else:
            state.join(key, ck, one)
        state.again.add(ck)  # asked again only for somebody: marked until answered


def _cancelled_again(spec: _BatchSpec) -> RuntimeError:
    return RuntimeError(
        f"@request_batch {spec.name}: the batch's task was cancelled again when its keys "
        "were asked again, so they fail instead of being asked forever. Something cancels "
        "the batch's task each time it runs (asyncio.current_task().cancel() in the batch "
        "function?): let the batch function return, or raise an Exception."
    )


def _interrupted(spec: _BatchSpec, exc: BaseException) -> RuntimeError:
    error = RuntimeError(
        f"@request_batch {spec.name}: the batch function raised {exc!r} without its task "
        "being cancelled, so every key of the batch fails. Let it return or raise an Exception."
    )
    error.__cause__ = exc
    return error


def _release(state: _State) -> None:
    """Drop the state from the store once nothing is in flight, pending or running."""
    if not state.inflight and state.keys is None and state.own is None and not state.parts:
        flights, where = state.store._flights, (state.spec, state.loop)
        if flights.get(where) is state:
            del flights[where]
            state.store._unreserve(state.spec)
