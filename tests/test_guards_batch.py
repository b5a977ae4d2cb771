"""Guards of @request_batch (_batch_tick, _batch_async, _batching, batch) that no other fast
test needed: each test here fails with its guard deleted (a block-deletion mutation pass of
the batching modules, 5 December 2026)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio
import pytest
from keys import Model

from perrequest import (
    NoActiveScope,
    ScopeStats,
    UnhashableArguments,
    _batch_async,
    _batch_tick,
    bind_scope,
    request_batch,
    request_scope,
)
from perrequest._batching import _BatchSpec

WAIT = 5


async def _batch_started() -> None:
    """Two loop iterations: a batch starts on the second after its first key is loaded
    (``_batch_tick._schedule``, as DataLoader's)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


class SavedKey:
    """A key whose hash changes when the batch function saves it (a model hashed by the
    primary key the save assigns); ``broken``: its hash raises ``error`` (a copy being saved:
    Django's TypeError; a model of another library may raise something else)."""

    error: type[Exception] = TypeError

    def __init__(self, n: int) -> None:
        self.n, self.saved, self.broken = n, False, False

    def __hash__(self) -> int:
        if self.broken:
            raise self.error("Model instances without primary key value are unhashable")
        return hash((self.n, self.saved))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SavedKey) and (other.n, other.saved) == (self.n, self.saved)


def _batch_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_call"]  # type: ignore[union-attr]


async def test_each_load_of_keys_the_batch_function_changes_gets_its_value() -> None:
    """_batch_tick._ended: a key whose hash the batch function changed is no longer found
    under it among the waiters; its batch holds its waiters, so every caller is answered
    (before the waiters were found by identity, the callback raised and its callers hung)."""

    @request_batch
    async def save(keys: list[SavedKey]) -> list[int]:
        for key in keys:
            key.saved = True
        return [key.n * 10 for key in keys]

    async with request_scope() as store:
        keys = [SavedKey(n) for n in range(4)]
        loads = asyncio.gather(*(save.load(k) for k in keys))
        assert await asyncio.wait_for(loads, WAIT) == [0, 10, 20, 30]
        await asyncio.sleep(0)  # the batch's end has run
        assert not store._flights  # nothing left in flight (its keys taken out though moved)


async def test_a_key_loaded_again_after_its_batch_changed_it_answers_both_callers() -> None:
    """_batch_waiters.unfiled: the batch function saves the key (its hash changes) and the
    same object is loaded again while that batch is in flight, so it is filed twice, under
    each hash. Once, the first batch's end took the second waiter in place of the first,
    whose caller was never answered (a hang)."""
    saved, release = asyncio.Event(), asyncio.Event()

    @request_batch
    async def save(keys: list[SavedKey]) -> list[int]:
        for key in keys:
            key.saved = True
        saved.set()
        await release.wait()
        return [key.n * 10 for key in keys]

    async with request_scope():
        key = SavedKey(1)
        first = asyncio.ensure_future(save.load(key))
        await asyncio.wait_for(saved.wait(), WAIT)
        second = asyncio.ensure_future(save.load(key))  # the same object, saved now
        await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(first, second), WAIT) == [10, 10]


async def test_a_cancelled_batch_of_keys_it_changed_asks_for_them_again() -> None:
    """_batch_tick._ended, its cancelled branch: the batch's task is cancelled (a shutdown)
    after the batch function changed its keys; its waiters, held by the batch, are asked
    again and get their values."""
    started = asyncio.Event()
    calls = 0

    @request_batch
    async def save(keys: list[SavedKey]) -> list[int]:
        nonlocal calls
        calls += 1
        for key in keys:
            key.saved = True
        if calls == 1:
            started.set()
            await asyncio.Event().wait()  # until cancelled
        return [key.n * 10 for key in keys]

    async with request_scope():
        loads = asyncio.gather(save.load(SavedKey(1)), save.load(SavedKey(2)))
        await asyncio.wait_for(started.wait(), WAIT)
        (batch,) = _batch_tasks()
        batch.cancel()  # from outside: its waiters are not cancelled
        assert await asyncio.wait_for(loads, WAIT) == [10, 20]
        assert calls == 2


async def test_a_key_in_flight_that_cannot_be_hashed_any_more_still_gets_its_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """_batch_waiters.unfiled and _batch_tick._ended's store: a batch changes its key's hash
    and breaks the hash of a key of another batch in flight. Each caller gets its own
    key's value (its batch holds its waiters; before, the first batch's end failed the
    other key's caller with its hash's error), and storing the other batch's value logs
    perrequest's error rather than escaping the loop's callback."""
    a, b = SavedKey(1), SavedKey(2)
    release = asyncio.Event()

    @request_batch
    async def save(keys: list[SavedKey]) -> list[int]:
        if any(key is b for key in keys):
            await release.wait()
        else:
            a.saved, b.broken = True, True
        return [key.n * 10 for key in keys]

    with caplog.at_level(logging.ERROR):
        async with request_scope():
            second = save.load(b)
            await _batch_started()
            first = save.load(a)
            assert await asyncio.wait_for(first, WAIT) == 10
            release.set()
            assert await asyncio.wait_for(second, WAIT) == 20
    assert any(
        r.name == "perrequest" and "could not store" in r.getMessage() for r in caplog.records
    )


async def test_a_cancelled_batch_of_a_key_it_broke_fails_its_callers_with_the_hash_error() -> None:
    """_batch_tick._again: a batch cancelled from outside after its batch function broke a
    key's hash cannot ask for that key again: its caller fails with the hash's error (before,
    the loop's callback raised it and the caller waited for ever)."""
    broke = asyncio.Event()

    @request_batch
    async def save(keys: list[SavedKey]) -> list[int]:
        for key in keys:
            key.broken = True
        broke.set()
        await asyncio.Event().wait()  # until cancelled
        return [key.n for key in keys]

    async with request_scope():
        load = save.load(SavedKey(1))
        await asyncio.wait_for(broke.wait(), WAIT)
        (batch,) = _batch_tasks()
        batch.cancel()
        with pytest.raises(TypeError, match="unhashable"):
            await asyncio.wait_for(load, WAIT)


async def test_a_cancelled_load_does_not_strand_the_other_keys_of_its_batch() -> None:
    """_batch_tick._ended: handing a value to a load cancelled meanwhile (its future done)
    raises InvalidStateError, which is caught: the batch's other keys get theirs, and the
    values are stored (each key with its own kept future)."""
    release = asyncio.Event()
    calls: list[list[int]] = []

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        await release.wait()
        return [k * 10 for k in keys]

    async with request_scope():
        doomed, other = rows.load(1), rows.load(2)  # one batch, key 1 handed first
        await asyncio.sleep(0)  # the batch has started
        doomed.cancel()
        release.set()
        assert await asyncio.wait_for(other, WAIT) == 20
        assert doomed.cancelled()
        assert await rows.load(1) == 10 and await rows.load(2) == 20
        assert calls == [[1, 2]]


async def test_a_stop_iteration_value_fails_its_key_without_stranding_it() -> None:
    """_batch_waiters.fail: a StopIteration instance (an Exception) fails its key, but cannot
    travel through a future: it fails with a RuntimeError naming it instead."""

    @request_batch
    async def rows(keys: list[int]) -> list[Any]:
        return [StopIteration() if k == 1 else k for k in keys]

    async with request_scope():
        one, two = rows.load(1), rows.load(2)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(one, WAIT)
        assert await asyncio.wait_for(two, WAIT) == 2


async def test_a_batch_whose_task_is_cancelled_each_time_fails_its_keys() -> None:
    """_batch_tick._again: a batch cancelled from outside is asked again once; cancelled
    again, its keys fail with an error saying so instead of being asked for ever."""
    calls = 0

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        await asyncio.sleep(0)
        return keys

    async with request_scope():
        with pytest.raises(RuntimeError, match="cancelled again"):
            await asyncio.wait_for(rows.load(1), WAIT)
        assert calls == 2


async def test_an_unhashable_key_joining_a_pending_batch_raises_unhashable_arguments() -> None:
    """_batch_tick._State.join: a key joining the tick's pending batch is hashed there; an
    unhashable one raises UnhashableArguments, as a load outside a batch does, not a bare
    TypeError."""

    @request_batch
    async def rows(keys: list[Any]) -> list[Any]:
        return keys

    async with request_scope():
        pending = rows.load(1)  # the tick's batch is pending
        with pytest.raises(UnhashableArguments, match="unhashable"):
            rows.load([2])
        assert await asyncio.wait_for(pending, WAIT) == 1


@pytest.mark.parametrize("many", [False, True], ids=["load", "load_many"])
async def test_loads_that_gave_up_on_a_hanging_batch_are_not_all_kept(many: bool) -> None:
    """_batch_waiters.joined: the waiters of a key in flight are pruned of cancelled loads,
    and of the places of ``load_many`` calls that gave up (their future done), as their list
    doubles, so a hanging batch keeps at most about twice as many as wait (a mutation pass
    found the ``load_many`` places unguarded)."""
    release = asyncio.Event()

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        await release.wait()
        return keys

    async with request_scope() as store:
        waiting = rows.load(1)
        await asyncio.sleep(0)  # the batch has started: later loads of 1 join its flight
        for _ in range(300):
            (rows.load_many([1]) if many else rows.load(1)).cancel()  # a caller that gave up
        state = store._flights[(rows._spec, asyncio.get_running_loop())]  # type: ignore[attr-defined]
        assert len(state.inflight[1]) <= 128  # the key's slot: its waiters
        release.set()
        assert await asyncio.wait_for(waiting, WAIT) == 1


async def test_thousands_of_loads_of_one_key_in_flight_are_all_answered() -> None:
    """_batch_waiters.joined: the waiters of a key in flight are one flat list, handed their
    value in a loop; nested one level per caller they would be handed recursively, past
    the recursion limit."""
    release = asyncio.Event()

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        await release.wait()
        return [k * 10 for k in keys]

    async with request_scope():
        first = rows.load(1)
        await asyncio.sleep(0)  # the batch has started: later loads of 1 join its flight
        loads = [first, *(rows.load(1) for _ in range(3000))]
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*loads), WAIT) == [10] * 3001


async def test_a_key_answered_after_a_cancel_may_be_cancelled_once_more_later() -> None:
    """_batch_tick._ended: a key asked again after its batch was cancelled, and answered,
    leaves the set of keys asked again; a later batch of it cancelled once (while the
    loader's other keys keep its state) is asked again, not failed as cancelled twice."""
    hold, started = asyncio.Event(), asyncio.Event()
    tasks: dict[tuple[int, ...], asyncio.Task[Any]] = {}
    cancel = False

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        nonlocal cancel
        tasks[tuple(keys)] = asyncio.current_task()  # type: ignore[assignment]
        if keys == [0]:
            await hold.wait()
        elif cancel:
            cancel = False
            started.set()
            await asyncio.Event().wait()  # until cancelled
        return [k * 10 for k in keys]

    async with request_scope():
        held = rows.load(0)  # in flight throughout: the loader's state stays
        await _batch_started()
        for _ in range(2):
            cancel = True
            started.clear()
            load = rows.load(1)
            await asyncio.wait_for(started.wait(), WAIT)
            tasks[(1,)].cancel()  # from outside, once
            assert await asyncio.wait_for(load, WAIT) == 10
            assert rows.clear(1)
        hold.set()
        assert await asyncio.wait_for(held, WAIT) == 0


def test_a_loop_that_ran_a_batch_is_not_kept_once_closed() -> None:
    """_batch_tick._ended: a loop whose batch tasks have all ended leaves the registry of
    running batches, which holds its loops strongly: asyncio.run's loop is freed."""

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    async def main() -> weakref.ref[asyncio.AbstractEventLoop]:
        async with request_scope():
            assert await rows.load(1) == 10
        return weakref.ref(asyncio.get_running_loop())

    loop = asyncio.run(main())
    gc.collect()
    assert loop() is None


async def test_a_load_after_its_scope_ended_is_outside_even_with_a_batch_in_flight() -> None:
    """_batch_tick.state_of: a task outliving its scope loads as outside any scope (here:
    NoActiveScope), even while the ended scope's batch is still in flight; it does not
    join that batch."""
    release = asyncio.Event()

    @request_batch(outside_scope="raise")
    async def rows(keys: list[int]) -> list[int]:
        await release.wait()
        return [k * 10 for k in keys]

    async with request_scope():
        first = rows.load(1)
        await asyncio.sleep(0)  # its batch is in flight as the scope ends

        async def late() -> int:
            await asyncio.sleep(0)  # past the scope's end
            return await rows.load(2)

        task = asyncio.create_task(late())
    with pytest.raises(NoActiveScope):
        await asyncio.wait_for(task, WAIT)
    release.set()
    assert await asyncio.wait_for(first, WAIT) == 10


async def test_a_cancelled_batch_of_its_own_keys_is_asked_again_apart() -> None:
    """_batch_tick._again: the batch a batch function made of its own batch's keys (apart,
    as it must not wait for itself), cancelled from outside, is asked again apart; in the
    regular batch it would wait for the batch that waits for it, for ever."""
    started = asyncio.Event()
    tasks: dict[tuple[int, ...], asyncio.Task[Any]] = {}
    cancel = True

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        nonlocal cancel
        tasks[tuple(keys)] = asyncio.current_task()  # type: ignore[assignment]
        if keys == [1, 2]:
            return [await rows.load(2) + 1, 20]  # 2: a key of its own batch
        if cancel:
            cancel = False
            started.set()
            await asyncio.Event().wait()  # until cancelled
        return [k * 10 for k in keys]

    async with request_scope():
        loads = rows.load_many([1, 2])
        await asyncio.wait_for(started.wait(), WAIT)
        tasks[(2,)].cancel()  # the batch apart, from outside, once
        assert await asyncio.wait_for(loads, WAIT) == [21, 20]


async def test_a_cancelled_batch_whose_callers_gave_up_is_not_asked_again() -> None:
    """_batch_tick._again and _ended: the keys of a batch cancelled from outside are asked
    again for their waiters that still wait; a caller that gave up (cancelled) asks for
    nothing, and the loader's state leaves the store."""
    started = asyncio.Event()
    calls: list[list[int]] = []

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        started.set()
        await asyncio.Event().wait()  # until cancelled
        return keys

    async with request_scope() as store:
        load = rows.load(1)
        await asyncio.wait_for(started.wait(), WAIT)
        load.cancel()  # the caller gives up
        (batch,) = _batch_tasks()
        batch.cancel()
        await asyncio.wait_for(asyncio.gather(batch, return_exceptions=True), WAIT)
        for _ in range(3):
            await asyncio.sleep(0)  # a batch asked again would have started by now
        assert calls == [[1]] and _batch_tasks() == []
        assert not store._flights  # type: ignore[attr-defined]  # nothing left in flight


@contextlib.contextmanager
def _running_at(func: Any, marker: str, action: Any) -> Iterator[None]:
    """Run ``action()`` once, as ``func`` reaches its line holding ``marker``."""
    lines, first = inspect.getsourcelines(func)
    at = first + next(i for i, line in enumerate(lines) if marker in line)
    code = func.__code__
    fired: list[bool] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == at and not fired:
                fired.append(True)
                action()
            return local

        return local

    previous = sys.gettrace()  # coverage's, when it measures: left running after
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)
    assert fired


def _closed_by_another_thread_at(func: Any, marker: str, scope: Any) -> Any:
    """Close ``scope`` from another thread as ``func`` reaches its line holding ``marker``."""

    def close() -> None:
        closer = threading.Thread(target=scope.__exit__, args=(None, None, None))
        closer.start()
        closer.join(WAIT)

    return _running_at(func, marker, close)


async def test_a_load_racing_its_scopes_close_is_outside_the_scope() -> None:
    """_batch_tick.state_of: the scope closes (another thread) between the check that it
    is open and the making of the loader's state there: the load runs outside any scope
    (here: uncached, silently), rather than raising ScopeClosed."""

    @request_batch(outside_scope="call")
    async def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    scope = request_scope()
    with scope:
        with _closed_by_another_thread_at(_batch_tick.state_of, "_State(", scope):
            load = rows.load(1)
        assert await asyncio.wait_for(load, WAIT) == 10


async def test_a_load_many_racing_its_scopes_close_is_outside_the_scope() -> None:
    """_batch_async.load_many: the scope closes (another thread) after the check that it
    is open, before the loader's state is made: no counter then, and the load runs outside
    any scope (here: uncached, silently)."""

    @request_batch(outside_scope="call")
    async def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    scope = request_scope()
    with scope:
        with _closed_by_another_thread_at(_batch_async.load_many, "state_of(", scope):
            load = rows.load_many([1, 2])
        assert await asyncio.wait_for(load, WAIT) == [10, 20]


def test_a_load_key_whose_eq_raises_is_found_in_a_mapping_by_its_cache_key() -> None:
    """_batching._same: with key=, a mapping is read by load keys or by cache keys; a load
    key whose ``__eq__`` raises (compared with its cache key) is not the same as it, and
    every key is still found (not the whole batch failed with that error)."""

    class Touchy:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            return hash(("touchy", self.n))

        def __eq__(self, other: object) -> bool:
            if not isinstance(other, Touchy):
                raise TypeError("compared with a cache key")
            return other.n == self.n

    @request_batch(key=lambda t: t.n)
    def rows(keys: list[Touchy]) -> dict[int, int]:
        return {t.n: t.n * 10 for t in keys}

    with request_scope():
        assert rows.load_many([Touchy(1), Touchy(2)]) == [10, 20]


def test_a_sync_load_racing_its_scopes_close_is_outside_the_scope() -> None:
    """_batching.counter_in: the scope closes (another thread) between the check that it
    is open and the taking of the loader's counter: the load runs outside any scope (here:
    uncached, silently), rather than raising ScopeClosed."""

    @request_batch(outside_scope="call")
    def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    scope = request_scope()
    with scope, _closed_by_another_thread_at(_BatchSpec.counter_in, "store._counter(", scope):
        assert rows.load_many([1, 2]) == [10, 20]


def test_under_trio_a_failing_chunk_fails_its_keys_and_keeps_the_others() -> None:
    """_BatchSpec.fetch_async: under trio (no batch: each call fetches by itself), a call
    of one chunk that raises fails that chunk's keys alone; the other chunks' values are
    stored as ever."""
    calls: list[list[int]] = []

    @request_batch(max_batch_size=1)
    async def rows(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        if 2 in keys:
            raise LookupError("row 2")
        return [k * 10 for k in keys]

    async def main() -> None:
        async with request_scope():
            with pytest.raises(LookupError, match="row 2"):
                await rows.load_many([1, 2])
            assert await rows.load(1) == 10  # stored by the call that failed for 2

    anyio.run(main, backend="trio")
    assert calls == [[1], [2]]


@pytest.mark.parametrize("kind", ["sync", "trio"])
def test_a_batch_calls_time_is_in_the_scopes_stats(kind: str) -> None:
    """_BatchSpec.fetch and fetch_async: the time a sync batch function (or an async one
    under trio) takes is counted in its compute_s when the stats are read (on_close)."""
    stats: list[ScopeStats] = []

    @request_batch
    def rows(keys: list[int]) -> list[int]:
        time.sleep(0.002)  # the work being timed
        return keys

    @request_batch
    async def rows_async(keys: list[int]) -> list[int]:
        await anyio.sleep(0.002)
        return keys

    if kind == "sync":
        with request_scope(on_close=stats.append):
            assert rows.load_many([1, 2]) == [1, 2]
    else:

        async def main() -> None:
            async with request_scope(on_close=stats.append):
                assert await rows_async.load_many([1, 2]) == [1, 2]

        anyio.run(main, backend="trio")
    (function,) = stats[0].functions.values()
    assert function.misses == 2 and function.compute_s >= 0.002


@pytest.mark.parametrize(
    ("key", "loader_bound", "store_bound"),
    [(int, 2, None), (int, None, 2), (None, None, 2)],
    ids=["loader's bound", "store's bound", "store's bound, no key="],
)
async def test_an_async_hit_makes_its_key_the_most_recently_used(
    key: Any, loader_bound: int | None, store_bound: int | None
) -> None:
    """batch._async_load: a hit answered with the finished future kept for its key moves
    the key to the end of the loader's and the store's recency, so a bound evicts another."""

    @request_batch(key=key, max_entries=loader_bound)
    async def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    async with request_scope(max_entries=store_bound) as store:
        assert await asyncio.gather(rows.load(1), rows.load(2)) == [10, 20]
        assert await rows.load(1) == 10  # a hit (its kept future): the most recent now
        assert await rows.load(3) == 30  # one too many: the least recently used goes
        assert sorted(k.key for k in store) == [1, 3]
        assert rows.cache_info().hits == 1


async def test_an_async_keyed_load_outside_any_scope_is_called_uncached() -> None:
    """batch._async_load's load_keyed: outside any scope a load of a loader with key= (or
    max_entries=) follows outside_scope, as one without does: here, called uncached."""
    calls: list[list[int]] = []

    @request_batch(key=int, max_entries=4, outside_scope="call")
    async def rows(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        return [k * 10 for k in keys]

    assert await asyncio.wait_for(rows.load(1), WAIT) == 10
    assert await asyncio.wait_for(rows.load(1), WAIT) == 10
    assert calls == [[1], [1]]


async def test_a_batch_cancelled_after_its_scope_ended_cancels_its_waiters() -> None:
    """_batch_tick._again: a batch cancelled (a shutdown) once its scope has ended is not
    asked again: its waiters, a task outliving the request, are cancelled, not left to
    wait for ever."""
    started = asyncio.Event()

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        started.set()
        await asyncio.Event().wait()  # until cancelled
        return keys

    async def handler() -> int:
        return await rows.load(1)

    async with request_scope():
        task = asyncio.create_task(handler())
        await asyncio.wait_for(started.wait(), WAIT)
    (batch,) = _batch_tasks()
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)


async def test_loads_of_a_key_of_its_own_batch_count_the_second_as_a_hit() -> None:
    """_batch_tick._State.join_own: a batch function loading a key of its own batch twice
    in one tick makes one call apart for it; the second load is a hit, as in a batch."""

    @request_batch
    async def rows(ids: list[int]) -> list[int]:
        if 2 in ids:
            await asyncio.gather(rows.load(1), rows.load(1))
        return ids

    async with request_scope():
        assert await asyncio.wait_for(rows.load_many([2, 1]), WAIT) == [2, 1]
        info = rows.cache_info()
        assert (info.hits, info.misses) == (1, 3)


async def test_a_batch_whose_task_cannot_be_made_leaves_no_coroutine_never_awaited() -> None:
    """_batch_tick._spawn: the call's coroutine, made before the task factory refused
    its task, is closed: no "never awaited" RuntimeWarning when it is collected."""

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        return keys

    loop = asyncio.get_running_loop()

    def refusing(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        del coro
        raise RuntimeError("task factory refuses")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with request_scope():
            loop.set_task_factory(refusing)
            try:
                with pytest.raises(RuntimeError, match="task factory refuses"):
                    await asyncio.wait_for(rows.load(1), WAIT)
            finally:
                loop.set_task_factory(None)
        gc.collect()
    assert [w for w in caught if "never awaited" in str(w.message)] == []


def test_a_batch_left_pending_by_a_closed_loop_leaves_the_store_at_the_next_start() -> None:
    """_batch_tick._start: a loop closed with a batch unfinished and another pending (not
    started) leaves its loader's state in the store; the next batch to start, on another
    loop, drops it, pending batch and all."""

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        if keys == [1]:
            await asyncio.Event().wait()  # unfinished as its loop closes
        return keys

    with request_scope() as store:
        loop = asyncio.new_event_loop()

        async def first() -> None:
            rows.load(1)
            for _ in range(2):
                await asyncio.sleep(0)  # its batch has started, and waits
            rows.load(2)  # a batch pending: it starts next time round
            loop.stop()  # which never comes

        starting = loop.create_task(first())
        loop.run_forever()
        assert starting.done()
        loop.close()
        assert store._flights  # type: ignore[attr-defined]  # the closed loop's state

        async def second() -> int:
            return await rows.load(3)

        assert asyncio.run(second()) == 3
        assert not store._flights  # type: ignore[attr-defined]
    # The closed loop's batch task, destroyed pending as this test meant: collected here,
    # its "Task was destroyed" unlogged, not in whichever test a collection meets it.
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.disabled = True
    try:
        gc.collect()
    finally:
        asyncio_logger.disabled = False


async def test_a_key_failed_as_cancelled_again_may_be_asked_again_later() -> None:
    """_batch_tick._again: a key failed for being cancelled twice leaves the set of keys
    asked again: a later batch of it, cancelled once (while the loader's other keys keep
    its state), is asked again rather than failed at once."""
    hold = asyncio.Event()
    cancels = 0

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        nonlocal cancels
        if keys == [0]:
            await hold.wait()
        elif cancels:
            cancels -= 1
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            await asyncio.sleep(0)
        return [k * 10 for k in keys]

    async with request_scope():
        held = rows.load(0)  # in flight throughout: the loader's state stays
        await _batch_started()
        cancels = 2
        with pytest.raises(RuntimeError, match="cancelled again"):
            await asyncio.wait_for(rows.load(1), WAIT)
        cancels = 1
        assert await asyncio.wait_for(rows.load(1), WAIT) == 10
        hold.set()
        assert await asyncio.wait_for(held, WAIT) == 0


def test_a_value_stored_as_a_sync_load_starts_its_fetch_is_used() -> None:
    """_BatchSpec._fetch: a key missing when looked up, whose value is stored (another
    thread's prime, or its fetch ending) before this thread registers its own fetch, is
    answered with that value, a hit; it is not fetched again."""
    calls: list[list[int]] = []

    @request_batch
    def rows(keys: list[int]) -> list[str]:
        calls.append(list(keys))
        return [f"v{k}" for k in keys]

    with request_scope():
        with _running_at(_BatchSpec._fetch, "with store._lock:", lambda: rows.prime(1, "p")):
            assert rows.load_many([1, 2]) == ["p", "v2"]
        assert calls == [[2]]
        info = rows.cache_info()
        assert (info.hits, info.misses) == (1, 1)


def test_a_sync_hit_makes_its_key_the_most_recently_used() -> None:
    """batch._sync_load: a hit moves its key to the end of the store's recency, so the
    store's bound evicts another."""

    @request_batch
    def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    with request_scope(max_entries=2) as store:
        assert rows.load_many([1, 2]) == [10, 20]
        assert rows.load(1) == 10  # a hit: the most recently used now
        assert rows.load(3) == 30  # one too many: the least recently used goes
        assert sorted(k.key for k in store) == [1, 3]


def test_under_trio_an_unhashable_key_raises_unhashable_arguments() -> None:
    """_batch_async.miss: under trio (no batch) a load's key is checked hashable before it
    is fetched: UnhashableArguments, as under asyncio, not a bare TypeError from within."""

    @request_batch
    async def rows(keys: list[Any]) -> list[Any]:
        return keys

    async def main() -> None:
        async with request_scope():
            with pytest.raises(UnhashableArguments, match="unhashable"):
                await rows.load([1])

    anyio.run(main, backend="trio")


# -- a batch function that makes one of its keys equal to another -------------------------


@request_batch
async def _save(rows: list[Model]) -> list[str]:
    """Saves rows: some get another primary key (``_NEW``), their hash moves with it."""
    values = [f"v{row.pk}" for row in rows]
    for row in rows:
        row.pk = _NEW.get(row.pk, row.pk)
    return values


_NEW: dict[int | None, int] = {}


async def _each_loaded(*rows: Model) -> list[Any]:
    futures = [_save.load(row) for row in rows]
    await asyncio.wait(futures, timeout=5)
    return [f.result() if f.done() else "hangs" for f in futures]


@pytest.mark.parametrize(
    ("new", "pks", "values"),
    [({1: 2}, (1, 2), ["v1", "v2"]), ({3: 30, 1: 2}, (3, 1, 2), ["v3", "v1", "v2"])],
    ids=["one key made equal to another", "and a third one changed"],
)
async def test_a_key_its_batch_makes_equal_to_another_key_gets_its_own_value(
    new: dict[int | None, int], pks: tuple[int, ...], values: list[str]
) -> None:
    """_batch_tick._ended: when the waiters were popped by each key's hash as the batch
    ended, a key changed into one equal to another key of the batch found the other's
    waiters, which got its value, and its own caller waited for ever (found with the
    mutation pass of 5 December 2026). The batch holds each key's waiters now."""
    _NEW.clear()
    _NEW.update(new)
    async with request_scope():
        assert await _each_loaded(*map(Model, pks)) == values


def _at_once(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
    """A task factory that runs a coroutine that never suspends inside ``create_task``, as
    3.12's ``asyncio.eager_task_factory`` does (its stand-in on 3.11): a done future."""
    future = loop.create_future()
    try:
        coro.send(None)
    except StopIteration as stop:
        future.set_result(stop.value)
    else:  # pragma: no cover (the batch function below never suspends)
        raise AssertionError("the coroutine suspended")
    return future


async def test_a_batch_run_eagerly_that_changes_its_keys_still_hands_each_its_value() -> None:
    """_batch_tick._spawn: with an eager task factory (3.12+), a batch function that does
    not suspend runs inside ``create_task``, and a save changes its keys' hashes there.
    When a batch's end looked its waiters up by the hashes read after ``create_task``, the
    change went unseen: a key made equal to another took that key's waiters, and its own
    caller waited for ever (the test above, under ``asyncio.eager_task_factory``)."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(getattr(asyncio, "eager_task_factory", _at_once))
    _NEW.clear()
    _NEW.update({1: 2})  # saved, the row of key 1 becomes equal to the row of key 2
    try:
        async with request_scope():
            assert await _each_loaded(Model(1), Model(2)) == ["v1", "v2"]
    finally:
        loop.set_task_factory(None)


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="eager tasks are 3.12's (make test runs this there)"
)
async def test_an_eager_batch_loading_its_own_key_starts_the_next_batch_apart() -> None:
    """_batch_tick._start: a tick starts a batch and a batch apart (a batch function's own
    load of a key in flight); under ``asyncio.eager_task_factory`` the first runs inside
    ``create_task`` and loads its own key, which starts the next batch apart. Before, that
    load went into the batch apart being started: the next start had no keys, and raised
    in the loop's callback (a review found it; before the slots, a KeyError and a hang)."""
    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    seen: set[str] = set()

    @request_batch
    async def node(keys: list[str]) -> list[str]:
        first = keys[0] not in seen
        seen.update(keys)
        if keys == ["a"] and first:
            await asyncio.sleep(0)  # in flight; then a load of its own key: apart
            return [f"a+{await node.load('a')}"]
        if keys == ["y"] and first:  # run inside create_task: its own key, apart
            return [f"y+{await node.load('y')}"]
        return [f"{key}!" for key in keys]

    try:
        async with request_scope():
            a = asyncio.ensure_future(node.load("a"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)  # a's batch waits for a, apart; y joins the next batch
            y = asyncio.ensure_future(node.load("y"))
            # one value per key: what the batch apart stored first
            assert await asyncio.wait_for(asyncio.gather(a, y), WAIT) == ["a!", "y!"]
            await asyncio.sleep(0.01)
    finally:
        loop.set_task_factory(None)
        loop.set_exception_handler(None)
    assert errors == []


async def test_a_cancelled_batch_of_a_key_whose_eq_it_broke_fails_that_key_alone() -> None:
    """_batch_tick._ended: a batch cancelled from outside asks for its keys again; one whose
    ``__eq__`` its batch function broke (another key of the same hash in flight) fails with
    that error, and the others are asked again. Before, the error escaped the loop's
    callback: the keys after it were never asked again (their callers waited for ever)."""

    class Key:
        def __init__(self, n: int) -> None:
            self.n, self.broken = n, False

        def __hash__(self) -> int:
            return 7  # all collide

        def __eq__(self, other: object) -> bool:
            if self.broken or getattr(other, "broken", False):
                raise ValueError("eq broken")
            return isinstance(other, Key) and other.n == self.n

    a, b, c = Key(1), Key(2), Key(3)
    first: list[asyncio.Task[Any] | None] = []

    @request_batch(max_batch_size=2)
    async def fetch(keys: list[Key]) -> list[str]:
        if any(key is a for key in keys) and not first:
            first.append(asyncio.current_task())
            a.broken = True
        await asyncio.sleep(0.1)
        return [f"v{key.n}" for key in keys]

    async with request_scope():
        loads = [asyncio.ensure_future(fetch.load(key)) for key in (a, c, b)]
        await asyncio.sleep(0.02)
        first[0].cancel()  # type: ignore[union-attr]
        await asyncio.sleep(0.02)  # its end has asked for its keys again
        a.broken = False
        outcomes = await asyncio.wait_for(asyncio.gather(*loads, return_exceptions=True), WAIT)
    assert [repr(o) if isinstance(o, Exception) else o for o in outcomes] == [
        "ValueError('eq broken')",
        "v3",
        "v2",
    ]


async def test_a_load_many_place_handed_twice_takes_the_first() -> None:
    """_batch_async._Many.put: a key asked again after a cancel whose ``__eq__`` or hash
    then raises fails its whole slot, a ``load_many`` place put back in the next batch
    included, which then hands it again. Before, the second hand counted twice for one
    key: the ``load_many`` never ended, or a StopIteration escaped the loop's callback."""
    from perrequest._batch_async import _Many
    from perrequest._flight import MISSING

    many = _Many(asyncio.get_running_loop().create_future(), [MISSING, MISSING], 2)
    error = ValueError("eq raised")
    many.put(0, error, True)
    many.put(0, "v0", False)  # the next batch's hand: ignored
    assert not many.future.done()
    many.put(1, "v1", False)
    with pytest.raises(ValueError, match="eq raised"):
        await many.future


async def test_a_state_stays_in_its_store_while_a_part_of_its_batch_runs() -> None:
    """_batch_tick._release: a part's end cannot file another part's key again (its hash
    raises now), so nothing is left in ``inflight`` while that part still runs. Before, the
    state left the store then (``prime`` and later loads found no state, and made another
    one); it stays until its last part ends."""
    a, b = SavedKey(1), SavedKey(2)
    release = asyncio.Event()

    @request_batch(max_batch_size=1)
    async def save(keys: list[SavedKey]) -> list[int]:
        if keys[0] is a:
            a.saved, b.broken = True, True  # a's hash moved; b's raises
        else:
            await release.wait()
        return [key.n * 10 for key in keys]

    async with request_scope() as store:
        second = asyncio.ensure_future(save.load(b))
        assert await asyncio.wait_for(save.load(a), WAIT) == 10
        b.broken = False
        (state,) = store._flights.values()
        assert type(state) is _batch_tick._State and state.parts == 1
        release.set()
        assert await asyncio.wait_for(second, WAIT) == 20
        await asyncio.sleep(0)
        assert not store._flights


# -- a thread that waited for another's fetch, later waited for by it ----------------------


class _Worker:
    """One thread of its own, running the jobs handed to it (each bound to the scope)."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            job()

    def submit(self, fn: Any) -> Future[Any]:
        future: Future[Any] = Future()
        bound = bind_scope(fn)
        self.jobs.put(lambda: future.set_result(bound()))
        return future


def test_a_thread_that_waited_for_anothers_fetch_may_be_waited_for_by_it_later() -> None:
    """_batching._BatchSpec._fetch: a thread done waiting for another thread's fetch is
    forgotten as a waiter (``done_waiting``). Remembered, the other thread waiting for its
    fetch later reads as a cycle (each waiting for the other), and fetches the key again:
    twice at once, which threads sharing a scope never do."""
    gates = {1: threading.Event(), 2: threading.Event()}
    calls: list[list[int]] = []

    @request_batch
    def rows(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        assert gates[keys[0]].wait(WAIT)
        return [k * 10 for k in keys]

    def waited_for(store: Any, key: int) -> None:
        deadline = time.monotonic() + WAIT
        while (fetch := store._flights.get((rows._spec, key))) is None or fetch.future is None:
            assert time.monotonic() < deadline, f"nobody waits for the fetch of {key}"
            time.sleep(0.001)

    a, b = _Worker(), _Worker()
    try:
        with request_scope() as store:
            fetching = a.submit(lambda: rows.load(1))
            while (rows._spec, 1) not in store._flights:  # type: ignore[attr-defined]
                time.sleep(0.001)
            waiting = b.submit(lambda: rows.load(1))
            waited_for(store, 1)
            gates[1].set()
            assert fetching.result(WAIT) == waiting.result(WAIT) == 10
            fetching = b.submit(lambda: rows.load(2))  # the other way round now
            while (rows._spec, 2) not in store._flights:  # type: ignore[attr-defined]
                time.sleep(0.001)
            waiting = a.submit(lambda: rows.load(2))
            waited_for(store, 2)
            gates[2].set()
            assert fetching.result(WAIT) == waiting.result(WAIT) == 20
    finally:
        gates[1].set(), gates[2].set()
        a.jobs.put(None), b.jobs.put(None)
    assert calls == [[1], [2]]


# -- a batch function that makes its own key unhashable (a model copy it saves) -----------


def _breaking_saves(error: type[Exception] = TypeError) -> tuple[Any, list[list[int]]]:
    """A sync and an async batch function that break the hash of key 1 as they save it."""
    calls: list[list[int]] = []

    def save(keys: list[SavedKey]) -> list[int]:
        calls.append([key.n for key in keys])
        for key in keys:
            key.broken, key.error = key.n == 1, error
        return [key.n * 10 for key in keys]

    async def save_async(keys: list[SavedKey]) -> list[int]:
        return save(keys)

    return (request_batch(save), request_batch(save_async)), calls


@pytest.mark.parametrize("error", [TypeError, ValueError])
def test_a_key_a_sync_batch_function_makes_unhashable_still_gets_its_value(
    caplog: pytest.LogCaptureFixture, error: type[Exception]
) -> None:
    """_batching.fetch, settled and _end: the sync batch function breaks one key's hash.
    Every caller gets its value, the other keys are stored, the broken one is not (logged),
    as for an async loader; before, the whole call raised the key's error (any error: a
    hash raising ValueError failed the call until 6 December 2026)."""
    (save, _), calls = _breaking_saves(error)
    with caplog.at_level(logging.ERROR), request_scope() as store:
        a, b = SavedKey(1), SavedKey(2)
        assert save.load_many([a, b, a]) == [10, 20, 10]
        assert save.load(SavedKey(2)) == 20  # stored
        assert calls == [[1, 2]]
        assert [k.key.n for k in store] == [2]
        assert not store._flights
    assert any("could not store" in r.getMessage() for r in caplog.records)


def test_a_thread_waiting_for_a_key_its_fetch_makes_unhashable_gets_its_value() -> None:
    """_batching._fetch's waiter: another thread waits for the same key object, whose hash
    the fetching thread's batch function breaks; it gets the value, found by identity."""
    started, release = threading.Event(), threading.Event()
    calls = 0

    @request_batch
    def save(keys: list[SavedKey]) -> list[int]:
        nonlocal calls
        calls += 1
        started.set()
        assert release.wait(WAIT)
        for key in keys:
            key.broken = True
        return [key.n * 10 for key in keys]

    with request_scope():
        key = SavedKey(3)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(bind_scope(save.load), key)
            assert started.wait(WAIT)
            second = pool.submit(bind_scope(save.load), key)
            time.sleep(0.05)  # the second thread waits for the first's fetch
            release.set()
            assert (first.result(WAIT), second.result(WAIT)) == (30, 30)
        assert calls == 1


def test_under_trio_a_key_the_batch_function_makes_unhashable_still_gets_its_value() -> None:
    """_batching.fetch_async and settled (trio: no batching, the caller fetches)."""
    (_, save), calls = _breaking_saves()

    async def main() -> list[int]:
        async with request_scope():
            a, b = SavedKey(1), SavedKey(2)
            return await save.load_many([a, b])  # type: ignore[no-any-return]

    assert anyio.run(main, backend="trio") == [10, 20]
    assert calls == [[1, 2]]


def test_two_threads_fetching_each_others_keys_read_one_value_of_each() -> None:
    """_BatchSpec.keep: in a cycle of two threads' fetches, the second fetches the first's
    key again and stores it; the first's fetch, ending after, replaced it: the request read
    two values of one key. The first value stored stays and is what every load gets."""
    calls = iter(range(100))
    busy = threading.local()
    seen: list[str] = []

    @request_batch
    def people(keys: list[str]) -> list[str]:
        if not getattr(busy, "on", False):
            busy.on = True
            time.sleep(0.1)  # both fetches start
            seen.append(people.load({"a": "b", "b": "a"}[keys[0]]))
            busy.on = False
        return [f"{k}{next(calls)}" for k in keys]

    with request_scope(), ThreadPoolExecutor(2) as pool:
        first = pool.submit(bind_scope(people.load), "a")
        time.sleep(0.02)
        second = pool.submit(bind_scope(people.load), "b")
        seen += [first.result(10), second.result(10), people.load("a"), people.load("b")]
        assert len({v for v in seen if v[0] == "a"}) == 1, seen
        assert len({v for v in seen if v[0] == "b"}) == 1, seen


def test_concurrent_trio_loads_of_one_key_read_one_value() -> None:
    """_batch_async.unbatched: under trio, concurrent loads each fetch; the later-ending one
    kept the stored value but returned what it fetched: two values of one key."""
    calls = iter(range(100))

    @request_batch
    async def users(keys: list[str]) -> list[str]:
        call = next(calls)
        await anyio.sleep(0.05 if call == 0 else 0.01)  # the first call ends last
        return [f"{k}{call}" for k in keys]

    async def main() -> None:
        got: list[str] = []

        async def load() -> None:
            got.append(await users.load("u"))

        async with request_scope():
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(load)
                tasks.start_soon(load)
            got.append(await users.load("u"))
        assert got == ["u1", "u1", "u1"]

    anyio.run(main, backend="trio")


async def test_a_key_its_own_batch_function_loads_again_reads_one_value() -> None:
    """_batch_tick._firsts: a batch function loading a key of its own batch in flight gets
    it fetched apart, stored first; the batch, ending after, replaced it: the function had
    read one value of the key, every later load another."""
    calls = iter(range(100))
    seen: list[str] = []

    @request_batch
    async def node(keys: list[str]) -> list[str]:
        call = next(calls)
        if call == 0:
            seen.append(await node.load(keys[-1]))  # in flight: fetched apart
        return [f"{k}{call}" for k in keys]

    async with request_scope():
        seen += await asyncio.gather(node.load("a"), node.load("b"))
        seen.append(await node.load("b"))
        assert seen == ["b1", "a0", "b1", "b1"]


async def test_a_key_unhashable_as_its_batch_starts_fails_no_other_parts_key() -> None:
    """_batch_tick._spawn: a key of part 1 cannot be hashed as the batch starts (a model
    whose primary key was reset), and part 2 ends first. When every part was told by
    identity, part 2's end filed part 1's keys again under their hashes, and part 1's own
    caller got a TypeError for a value its batch function returned (a review found it)."""
    broken = {"on": False}

    class Key:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            if self.n == 1 and broken["on"]:
                raise TypeError("cannot be hashed now")
            return hash(self.n)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Key) and other.n == self.n

    keys = [Key(n) for n in (1, 2, 3, 4)]

    @request_batch(max_batch_size=2)
    async def fetch(batch: list[Key]) -> list[str]:
        if any(k.n == 1 for k in batch):
            await asyncio.sleep(0.05)  # part 1 is slow: part 2 ends first
            broken["on"] = False  # hashable again once its own fetch is done
        return [f"v{k.n}" for k in batch]

    async with request_scope():
        loads = [fetch.load(k) for k in keys]  # joined while hashable
        broken["on"] = True  # from the batch's start on
        got = await asyncio.gather(*loads, return_exceptions=True)
    assert got == ["v1", "v2", "v3", "v4"]


async def test_a_part_changing_a_key_does_not_merge_the_keys_another_part_changed() -> None:
    """_batch_waiters.unfiled: two ``max_batch_size`` parts in flight; one's batch function
    makes its key ``a`` equal to its other key ``b`` and ends later, the other's changes its
    own key's hash and ends first. Each part holds its keys' waiters, so ``b``'s caller
    gets ``b``'s value. Before, the first end re-filed the waiters in flight by their hashes
    now, merging ``a``'s and ``b``'s: ``b``'s caller got ``a``'s value."""

    class Key:
        def __init__(self, n: int) -> None:
            self.n, self.first = n, n

        def __hash__(self) -> int:
            return hash(self.n)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Key) and other.n == self.n

    a, b, c, x = Key(1), Key(2), Key(3), Key(9)

    @request_batch(max_batch_size=2)
    async def fetch(keys: list[Key]) -> list[str]:
        values = [f"v{key.first}" for key in keys]
        if any(key is a for key in keys):
            a.n = 2  # saved: now equal to b
            await asyncio.sleep(0.05)  # the other part ends meanwhile
        else:
            x.n = 99  # saved: its hash changed
        return values

    async with request_scope():
        loads = asyncio.gather(*(fetch.load(key) for key in (a, b, c, x)))
        assert await asyncio.wait_for(loads, WAIT) == ["v1", "v2", "v3", "v9"]
