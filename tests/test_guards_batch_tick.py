"""Guards of @request_batch's ticks (_batch_tick, _batch_waiters) found missing by a
mutation pass of _batch_tick.py, _batch_waiters.py and _batch_async._Many.put (6 December
2026): each test here fails with its mutant applied (the docstring says which), and passes
on the code as it is."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from perrequest import ScopeStats, request_batch, request_scope

WAIT = 5


async def _batch_started() -> None:
    """Two loop iterations: a batch starts on the second after its first key is loaded
    (``_batch_tick._schedule``, as DataLoader's)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_batch_function_loading_its_own_key_after_a_new_one_loads_it_apart() -> None:
    """_batch_tick._State.join: a batch function that loads a new key (a pending batch now
    exists) and then a key of its own batch, in flight, must load that one apart: a key
    in flight that is not in the pending batch is never waited for by its own batch
    function. With the check ``ck not in self.cks`` dropped (apart only while no batch
    is pending), it joined its own slot and the batch waited for itself for ever."""
    calls: list[list[str]] = []

    @request_batch
    async def node(keys: list[str]) -> list[str]:
        calls.append(list(keys))
        if keys == ["a"] and len(calls) == 1:
            other = node.load("b")  # a new key: the pending batch of the next tick
            mine = node.load("a")  # in flight, in this very batch: apart
            return [f"a+{await mine}+{await other}"]
        return [f"{key}!" for key in keys]

    async with request_scope():
        # one value per key: what the batch apart stored first
        assert await asyncio.wait_for(node.load("a"), WAIT) == "a!"
    assert calls == [["a"], ["b"], ["a"]]


async def test_a_batch_function_loading_a_pending_key_twice_asks_for_it_once() -> None:
    """_batch_tick._State.join: a batch function's load of a key already in the pending
    batch (not started: waiting for it cannot deadlock) joins that key's slot, a hit. With
    every load of a batch function sent apart, the second load made a batch apart of the
    same key: the batch function was called for it twice."""
    calls: list[list[str]] = []

    @request_batch
    async def node(keys: list[str]) -> list[str]:
        calls.append(list(keys))
        if keys == ["a"]:
            first = node.load("b")  # the next tick's pending batch
            second = node.load("b")  # the same key, pending: joins it
            return [f"a+{await first}+{await second}"]
        return [f"{key}!" for key in keys]

    stats: list[ScopeStats] = []
    async with request_scope(on_close=stats.append):
        assert await asyncio.wait_for(node.load("a"), WAIT) == "a+b!+b!"
    assert calls == [["a"], ["b"]]
    (function,) = stats[0].functions.values()
    assert (function.hits, function.misses) == (1, 2)


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="eager tasks are 3.12's (make test runs this there)"
)
@pytest.mark.parametrize("x_first", [False, True], ids=["apart first", "batch first"])
async def test_a_tick_with_a_batch_and_a_batch_apart_schedules_one_start(x_first: bool) -> None:
    """_batch_tick._State.join and join_own: in one tick a key joins the pending batch and
    a batch function loads its own key (the batch apart); the first of the two schedules
    the start of both, the second none. Under ``asyncio.eager_task_factory`` the batch
    started first runs inside ``create_task`` and loads a new key (``y``): that makes the
    next pending batch, which a later load of the same tick (``z``) joins. With a second
    start scheduled (``_schedule`` whether or not the other had it), that start
    ran the pending batch of ``y`` at once, alone: ``z`` was a batch of its own."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    calls: list[list[str]] = []

    @request_batch
    async def node(keys: list[str]) -> list[str]:
        calls.append(list(keys))
        if keys == ["a"] and len(calls) == 1:
            await asyncio.sleep(0)
            return [f"a+{await node.load('a')}"]  # its own key, in flight: apart
        if keys == ["x"]:
            return [f"x+{await node.load('y')}"]  # run inside create_task: a new batch
        return [f"{key}!" for key in keys]

    async def later(ticks: int, key: str) -> str:
        for _ in range(ticks):
            await asyncio.sleep(0)
        return await node.load(key)  # type: ignore[no-any-return]

    try:
        async with request_scope():
            if x_first:  # x joins the pending batch, then a is loaded apart (same tick)
                x = asyncio.ensure_future(later(3, "x"))
                a = node.load("a")
            else:  # a is loaded apart, then x joins the pending batch (same tick)
                a = node.load("a")
                x = asyncio.ensure_future(later(3, "x"))
            z = asyncio.ensure_future(later(5, "z"))  # the tick both batches start
            values = await asyncio.wait_for(asyncio.gather(a, x, z), WAIT)
    finally:
        loop.set_task_factory(None)
    assert values == ["a!", "x+y!", "z!"]  # a: what the batch apart stored first
    assert calls == [["a"], ["x"], ["a"], ["y", "z"]]


async def test_a_cancelled_batch_asks_again_with_no_error_in_the_loops_callback() -> None:
    """_batch_tick._ended, its cancelled branch: once the keys of a batch cancelled from
    outside are put in the next batch, the callback returns. Without that return it went on
    as if the call had values (``None``): the callback raised a TypeError, which the loop
    reported (its exception handler), though every caller got its value."""
    loop = asyncio.get_running_loop()
    errors: list[Any] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    tasks: list[asyncio.Task[Any] | None] = []

    @request_batch
    async def fetch(keys: list[int]) -> list[int]:
        tasks.append(asyncio.current_task())
        await asyncio.sleep(0.05 if len(tasks) == 1 else 0)
        return [key * 10 for key in keys]

    try:
        async with request_scope():
            load = asyncio.ensure_future(fetch.load(1))
            await asyncio.sleep(0.01)
            tasks[0].cancel()  # type: ignore[union-attr]  # (a shutdown): asked again
            assert await asyncio.wait_for(load, WAIT) == 10
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert len(tasks) == 2
    assert errors == []


async def test_a_hit_after_a_key_shared_by_two_loads_is_a_future_the_batch_answered() -> None:
    """_batch_tick._ended: a key two loads waited for (its slot, not one load) keeps the
    future ``hand`` answered as its anchor, which later hits return. With no anchor kept
    for it, the first hit made a finished future of its own and stored the key again."""

    @request_batch
    async def fetch(keys: list[int]) -> list[int]:
        return [key * 10 for key in keys]

    async with request_scope():
        first, second = fetch.load(1), fetch.load(1)
        assert await asyncio.wait_for(asyncio.gather(first, second), WAIT) == [10, 10]
        hit = fetch.load(1)
        assert hit is first or hit is second


async def test_a_key_its_batch_failed_fails_though_a_batch_apart_stored_it() -> None:
    """_batch_tick._firsts: a value stored since the batch started (here by the batch apart
    its batch function made of its own key) is what the key's loads get, but a key the
    batch failed fails: its callers get the exception. With stored values looked up for
    failed keys too, the failure was replaced by the value the batch apart stored."""
    calls: list[list[str]] = []

    @request_batch
    async def node(keys: list[str]) -> list[str]:
        calls.append(list(keys))
        if len(calls) == 1:
            assert await node.load("a") == "a!"  # apart: stored before this call ends
            raise ValueError("the first call fails")
        return [f"{key}!" for key in keys]

    async with request_scope():
        with pytest.raises(ValueError, match="the first call fails"):
            await asyncio.wait_for(node.load("a"), WAIT)
        assert await asyncio.wait_for(node.load("a"), WAIT) == "a!"  # stored, apart
    assert calls == [["a"], ["a"]]


async def test_a_key_asked_again_whose_batch_is_cancelled_after_its_scope_ended_cancels() -> None:
    """_batch_tick._again: a key asked again after a cancel, whose next batch is cancelled
    too once the scope has ended (a shutdown), has its waiters cancelled, like any batch
    cancelled then; it is failed as "cancelled again" only while the scope lives. With the
    scope's end not checked, the task outliving the request got that RuntimeError."""
    tasks: list[asyncio.Task[Any] | None] = []

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        tasks.append(asyncio.current_task())
        await asyncio.Event().wait()  # until cancelled
        return keys

    async def handler() -> int:
        return await rows.load(1)  # type: ignore[no-any-return]

    async with request_scope():
        task = asyncio.create_task(handler())
        await asyncio.sleep(0.01)
        tasks[0].cancel()  # type: ignore[union-attr]  # asked again
        await asyncio.sleep(0.01)
        assert len(tasks) == 2
    tasks[1].cancel()  # type: ignore[union-attr]  # once the scope has ended
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)


async def test_a_batch_functions_own_error_is_the_cause_of_its_keys_failure() -> None:
    """_batch_tick._interrupted: a batch function raising CancelledError without its task
    being cancelled fails its keys with a RuntimeError whose ``__cause__`` is that error
    (what raised it, for the traceback). Without it the cause was lost."""

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        raise asyncio.CancelledError("the batch function's own")

    async with request_scope():
        with pytest.raises(RuntimeError, match="without its task") as info:
            await asyncio.wait_for(rows.load(1), WAIT)
    assert type(info.value.__cause__) is asyncio.CancelledError
    assert str(info.value.__cause__) == "the batch function's own"


async def test_a_cancelled_batch_apart_started_with_the_tick_is_asked_again_apart() -> None:
    """_batch_tick._again: the keys of a batch apart (a batch function's own keys) cancelled
    from outside are asked again apart. Here the batch apart was started by a start another
    task scheduled (its context knows of no batch function), so its end runs outside the
    batch function: put in the pending batch instead, the key joined its own batch's slot
    there, and that batch waited for itself for ever."""
    go = asyncio.Event()
    calls: list[list[str]] = []
    apart: list[asyncio.Task[Any] | None] = []

    @request_batch
    async def node(keys: list[str]) -> list[str]:
        calls.append(list(keys))
        if len(calls) == 1:  # ["a"]
            await go.wait()
            return [f"a+{await node.load('a')}"]  # its own key, in flight: apart
        if keys == ["a"] and not apart:  # the batch apart: cancelled from outside
            apart.append(asyncio.current_task())
            await asyncio.Event().wait()
        return [f"{key}!" for key in keys]

    async with request_scope():
        a = node.load("a")
        await _batch_started()  # a's batch waits for go
        go.set()  # a's batch function resumes first in the next tick...
        x = node.load("x")  # ...after this load scheduled the start (of x and of a apart)
        await asyncio.sleep(0.01)
        assert calls == [["a"], ["x"], ["a"]]
        apart[0].cancel()  # type: ignore[union-attr]
        # one value per key: what the batch apart stored first
        assert await asyncio.wait_for(asyncio.gather(a, x), WAIT) == ["a!", "x!"]
    assert calls == [["a"], ["x"], ["a"], ["a"]]


async def test_a_batch_that_stored_nothing_leaves_no_dict_of_its_loader_in_the_store() -> None:
    """_batch_tick._release: the loader's dict, made empty in the store as its state was
    (``_reserve``: lookups of its keys in flight miss without raising), is dropped with the
    state when nothing was stored (every key failed). Without ``_unreserve`` an empty dict
    per loader stayed in the store until the scope's end."""

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        raise ValueError("down")

    async with request_scope() as store:
        with pytest.raises(ValueError, match="down"):
            await asyncio.wait_for(rows.load(1), WAIT)
        await asyncio.sleep(0)
        assert not store._flights
        assert rows._spec not in store._subs  # type: ignore[attr-defined,operator]


class Alias:
    """A key whose batch function may make it equal to another key (``as_n``)."""

    def __init__(self, n: int) -> None:
        self.n = self.as_n = n

    def __hash__(self) -> int:
        return hash(self.as_n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Alias) and other.as_n == self.as_n


async def test_a_key_its_batch_makes_equal_to_a_key_in_flight_leaves_nothing_filed() -> None:
    """_batch_waiters.unfiled: a part's key that its batch function made equal to a key of
    another part, still in flight, finds that key's slot under its hash: not its own, so
    the waiters are filed again by identity. Had the key's own slot been taken for found
    (any slot found under its hash), the other key's entry was deleted in its place, the
    key's own stale entry stayed, and the state never left the store."""
    release = asyncio.Event()
    calls: list[list[int]] = []

    @request_batch(max_batch_size=1)
    async def save(keys: list[Alias]) -> list[int]:
        calls.append([key.n for key in keys])
        if keys[0].n == 1:
            keys[0].as_n = 2  # saved: now equal to the key in flight in the other part
        else:
            await release.wait()
        return [key.n * 10 for key in keys]

    async with request_scope() as store:
        loads = asyncio.gather(save.load(Alias(1)), save.load(Alias(2)))
        await asyncio.sleep(0.01)  # the part of 1 has ended; the part of 2 runs
        release.set()
        # 2 gets what was stored first under its key: 1's value (one value per key)
        assert await asyncio.wait_for(loads, WAIT) == [10, 10]
        await asyncio.sleep(0)
        assert not store._flights  # nothing left in flight
    assert calls == [[1], [2]]


async def test_a_cancelled_load_many_sharing_a_key_with_a_load_does_not_strand_it() -> None:
    """_batch_waiters.hand: a ``load_many`` that gave up (its future cancelled) is handed
    nothing. Handed its value all the same, it set its cancelled future's result: the
    InvalidStateError escaped the batch's end, and the load after it in the key's slot
    waited for ever."""

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        await asyncio.sleep(0)
        return [key * 10 for key in keys]

    async with request_scope():
        many = rows.load_many([1])
        one = rows.load(1)  # joins the key's slot, after the load_many's place
        many.cancel()  # a caller that gave up
        assert await asyncio.wait_for(one, WAIT) == 10


async def test_a_state_stays_in_its_store_while_a_cancelled_batch_apart_is_asked_again() -> None:
    """_batch_tick._release: a batch function loads its own key (apart) and returns without
    awaiting that load; the batch apart made of that key is cancelled from outside, and put
    back as the next batch apart. Nothing is in flight, pending or running then but that
    batch apart: the state must stay in its store (``state.own``) until it has run. With
    ``own`` not checked, the state left the store before its batch apart started."""
    calls: list[list[str]] = []
    apart: list[asyncio.Task[Any] | None] = []
    child: list[Any] = []
    flights_seen: list[bool] = []

    @request_batch
    async def node(keys: list[str]) -> list[str]:
        calls.append(list(keys))
        if len(calls) == 1:  # ["a"]: its own key, loaded apart, not awaited here
            child.append(node.load("a"))
            return ["a!"]
        if len(calls) == 2:  # the batch apart: cancelled from outside
            apart.append(asyncio.current_task())
            await asyncio.Event().wait()
        flights_seen.append(bool(store._flights))
        return [f"{key}!" for key in keys]

    async with request_scope() as store:
        assert await asyncio.wait_for(node.load("a"), WAIT) == "a!"
        await asyncio.sleep(0.01)
        assert calls == [["a"], ["a"]]
        apart[0].cancel()  # type: ignore[union-attr]  # asked again, apart
        assert await asyncio.wait_for(child[0], WAIT) == "a!"
        await asyncio.sleep(0)
        assert not store._flights
    assert calls == [["a"], ["a"], ["a"]]
    assert flights_seen == [True]  # its state was in the store while it ran
