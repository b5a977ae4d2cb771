"""@request_batch on async batch functions: one call per tick, the store, errors, cancellation."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

import perrequest
from perrequest import (
    NoActiveScope,
    ScopeStats,
    UnhashableArguments,
    current_store,
    request_batch,
    request_scope,
)


def make_loader(
    fail: Sequence[int] = (), **options: object
) -> tuple[perrequest.AsyncBatchLoader[int, str], list[list[int]]]:
    """A loader of ``u{key}`` that records each call's keys; keys in ``fail`` fail alone."""
    calls: list[list[int]] = []

    async def users(keys: list[int]) -> list[str | Exception]:
        calls.append(list(keys))
        await asyncio.sleep(0)
        return [ValueError(f"no user {k}") if k in fail else f"u{k}" for k in keys]

    return request_batch(**options)(users), calls  # type: ignore[call-overload, no-any-return]


async def test_loads_of_one_tick_share_one_call_and_values_stay_in_the_store() -> None:
    users, calls = make_loader()
    async with request_scope() as store:
        values = await asyncio.gather(*(users.load(k % 7) for k in range(30)))
        assert values == [f"u{k % 7}" for k in range(30)]
        assert calls == [[0, 1, 2, 3, 4, 5, 6]]  # one call, each key once, in order
        assert await users.load(3) == "u3" and calls == [[0, 1, 2, 3, 4, 5, 6]]  # cached
        assert await users.load_many([1, 8, 2, 9, 8]) == ["u1", "u8", "u2", "u9", "u8"]
        assert calls[1:] == [[8, 9]]  # cached keys are not asked for again
        assert await users([4, 10]) == ["u4", "u10"]  # calling it is load_many
        # Hits and misses are keys: 7 fetched + 23 joined, 1, then 3 hits and 2 new...
        assert users.cache_info() == (23 + 1 + 3 + 1, 7 + 2 + 1, None, 10)
        info = store.stats.functions[f"{__name__}.make_loader.<locals>.users"]
        assert (info.hits, info.misses) == (28, 10)
        assert len(store) == 10
    assert users.cache_info() == (0, 0, None, 0)  # gone with the request


async def test_a_load_is_a_future_for_await_gather_and_ensure_future() -> None:
    """docs/batching.md: as DataLoader's, a future, not a coroutine: create_task refuses it."""
    users, calls = make_loader()
    async with request_scope():
        pending = users.load(1)
        assert isinstance(pending, asyncio.Future)
        with pytest.raises(TypeError, match="coroutine was expected"):
            asyncio.create_task(pending)  # type: ignore[arg-type]  # noqa: RUF006
        assert await asyncio.ensure_future(pending) == "u1"
        assert await asyncio.gather(users.load(2)) == ["u2"] and calls == [[1], [2]]


async def test_tasks_of_one_request_join_one_call_two_requests_never_share() -> None:
    users, calls = make_loader()

    async def request(keys: list[int]) -> list[str]:
        async with request_scope():
            tasks = [asyncio.create_task(_load(users, k)) for k in keys]
            return list(await asyncio.gather(*tasks))

    a, b = await asyncio.gather(request([1, 2, 3]), request([3, 4]))
    assert (a, b) == (["u1", "u2", "u3"], ["u3", "u4"])
    assert sorted(calls) == [[1, 2, 3], [3, 4]]  # one call per request, keys never mixed


async def _load(loader: perrequest.AsyncBatchLoader[int, str], key: int) -> str:
    return await loader.load(key)


async def test_a_key_in_flight_is_awaited_not_asked_again() -> None:
    release = asyncio.Event()
    calls: list[list[int]] = []

    @request_batch
    async def slow(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        await release.wait()
        return [k * 10 for k in keys]

    async with request_scope():
        first = asyncio.ensure_future(slow.load_many([1, 2]))
        await asyncio.sleep(0.01)  # the batch of 1 and 2 is in flight
        second = asyncio.ensure_future(slow.load_many([2, 3]))
        await asyncio.sleep(0.01)
        assert calls == [[1, 2], [3]]
        release.set()
        assert await first == [10, 20] and await second == [20, 30]
        assert slow.cache_info().misses == 3


async def test_max_batch_size_splits_calls() -> None:
    users, calls = make_loader(max_batch_size=3)
    async with request_scope():
        assert await users.load_many(range(8)) == [f"u{k}" for k in range(8)]
    assert calls == [[0, 1, 2], [3, 4, 5], [6, 7]]


async def test_mapping_results_and_a_missing_key_fails_with_key_error() -> None:
    calls: list[list[int]] = []

    @request_batch
    async def by_id(keys: list[int]) -> Mapping[int, str]:
        calls.append(list(keys))
        return {k: f"v{k}" for k in keys if k != 2}

    async with request_scope() as store:
        one, two, three = await asyncio.gather(
            by_id.load(1), by_id.load(2), by_id.load(3), return_exceptions=True
        )
        assert (one, three) == ("v1", "v3")
        assert isinstance(two, KeyError) and "without key 2" in str(two)
        with pytest.raises(KeyError):
            await by_id.load(2)  # not cached: asked again
        assert calls == [[1, 2, 3], [2]] and len(store) == 2


async def test_an_exception_fails_its_key_alone_and_is_not_cached() -> None:
    users, calls = make_loader(fail=[2])
    async with request_scope() as store:
        results = await asyncio.gather(*(users.load(k) for k in (1, 2, 3)), return_exceptions=True)
        assert results[0] == "u1" and results[2] == "u3"
        assert isinstance(results[1], ValueError)
        with pytest.raises(ValueError, match="no user 2"):
            await users.load_many([1, 2, 3])  # the first failure, in key order
        assert calls == [[1, 2, 3], [2]] and len(store) == 2


async def test_a_failing_batch_fails_every_key_and_nothing_is_cached() -> None:
    calls = 0

    @request_batch
    async def broken(keys: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        raise ConnectionError("database down")

    async with request_scope() as store:
        results = await asyncio.gather(broken.load(1), broken.load(2), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results) and calls == 1
        assert len(store) == 0 and broken.cache_info().misses == 2


async def test_wrong_number_of_values_names_the_function_and_both_counts() -> None:
    @request_batch
    async def short(keys: list[int]) -> list[int]:
        return keys[:-1]

    async with request_scope():
        with pytest.raises(TypeError, match=r"short returned 2 values for 3 keys"):
            await short.load_many([1, 2, 3])
    with pytest.raises(TypeError, match=r"short returned 0 values for 1 keys"):
        await short.load(1)  # outside a scope too (warned, see below)


async def test_unhashable_keys_raise_unhashable_arguments_everywhere() -> None:
    users, calls = make_loader()
    async with request_scope():
        with pytest.raises(UnhashableArguments, match=r"key \[1\] is unhashable"):
            users.load([1])  # type: ignore[arg-type]
        with pytest.raises(UnhashableArguments):
            users.load_many([1, [2]])  # type: ignore[list-item]
    with pytest.raises(UnhashableArguments):
        users.load_many([{}])  # type: ignore[list-item]
    assert calls == []


async def test_key_maps_load_keys_to_cache_keys() -> None:
    calls: list[list[str]] = []

    @request_batch(key=str.lower)
    async def by_name(names: list[str]) -> dict[str, int]:
        calls.append(list(names))
        return {n.lower(): len(n) for n in names}  # keyed by cache key: also accepted

    async with request_scope():
        assert await by_name.load_many(["Ann", "ANN", "bo"]) == [3, 3, 2]
        assert await by_name.load("aNN") == 3
        assert calls == [["Ann", "bo"]]
        assert by_name.clear("ann") and not by_name.clear("ann")


async def test_prime_clear_and_cache_clear() -> None:
    users, calls = make_loader()
    async with request_scope():
        users.prime(1, "primed")
        users.prime(1, "ignored")  # a value already there is kept, as DataLoader does
        assert await users.load(1) == "primed" and await users.load(1) == "primed"
        assert users.clear(1) and await users.load(1) == "u1"
        await users.load_many([2, 3])
        users.cache_clear()
        assert users.cache_info().currsize == 0
        with pytest.raises(TypeError, match="cannot be primed"):
            users.prime(5, ValueError("x"))  # type: ignore[arg-type]
    users.prime(9, "outside")  # outside a scope: nothing to do
    assert not users.clear(9)
    assert calls == [[1], [2, 3]]


@pytest.mark.parametrize("where", ["on the loop", "in a thread"])
async def test_a_prime_while_the_key_is_loaded_never_replaces_a_value_seen(where: str) -> None:
    """A prime of a key whose batch was in flight was stored, then replaced by the batch's
    value: a load returned the primed value, and a later one the older value fetched. A
    prime from a thread of the request (``asyncio.to_thread``, where no loop runs) still
    was (an audit of 5 December 2026)."""
    db = {1: "old"}
    started = asyncio.Event()

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        values = [db[k] for k in keys]  # read before the write below
        started.set()
        await asyncio.sleep(0.01)
        return values

    async with request_scope():
        loading = asyncio.ensure_future(users.load(1))
        await started.wait()
        db[1] = "new"
        if where == "on the loop":
            users.prime(1, "new")  # does nothing: the key is being loaded, as in DataLoader
        else:
            await asyncio.to_thread(users.prime, 1, "new")
        during = await users.load(1)
        assert await loading == "old"
        assert during == await users.load(1) == "old"  # before: "new", then "old"
        users.clear(1)  # the way to replace it: clear, then prime, once it is loaded
        users.prime(1, "new")
        assert await users.load(1) == "new"


async def test_bounded_by_max_entries_and_by_the_store_counted_in_stats() -> None:
    users, _ = make_loader(max_entries=2)
    seen: list[ScopeStats] = []
    async with request_scope(max_entries=3, on_close=seen.append) as store:
        await users.load_many([1, 2, 3])
        assert users.cache_info() == (0, 3, 2, 2)  # the loader's own bound
        await users.load(2)  # the most recent, so 3 goes before 2 next
        await users.load(4)
        assert [k.key for k in store] == [2, 4]
        store["a"], store["b"] = 1, 2  # the store's bound evicts the oldest entry
        assert len(store) == 3 and users.cache_info().currsize == 1
    assert seen[0].evictions == 3 and seen[0].functions[next(iter(seen[0].functions))].misses == 4
    assert seen[0].functions[next(iter(seen[0].functions))].compute_s > 0


async def test_a_cancelled_caller_does_not_cancel_the_batch_for_others() -> None:
    release = asyncio.Event()
    calls: list[list[int]] = []

    @request_batch
    async def slow(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        await release.wait()
        return keys

    async with request_scope():
        doomed = asyncio.create_task(_wait(slow.load(1)))
        other = asyncio.create_task(_wait(slow.load(1)))
        many = asyncio.create_task(_wait(slow.load_many([1, 2])))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await asyncio.sleep(0.01)
        release.set()
        assert await other == 1 and await many == [1, 2]
        assert doomed.cancelled() and calls == [[1, 2]]
        assert await slow.load(1) == 1 and calls == [[1, 2]]  # cached for the others


def _batch_tasks() -> list[asyncio.Task[Any]]:
    names = ("_call",)
    return [t for t in asyncio.all_tasks() if t.get_coro().__name__ in names]  # type: ignore[union-attr]


async def _wait(awaitable: object) -> object:
    return await awaitable  # type: ignore[misc]


async def test_a_cancelled_batch_is_asked_again_for_its_waiters() -> None:
    calls: list[list[int]] = []
    first = True

    @request_batch
    async def flaky(keys: list[int]) -> list[int]:
        nonlocal first
        calls.append(list(keys))
        if first:
            first = False
            await asyncio.sleep(10)
        return keys

    async with request_scope():
        # Two waiters of key 1: both join the next batch (one call, not one each).
        waiting = asyncio.gather(flaky.load_many([1, 2]), flaky.load(1))
        await asyncio.sleep(0.01)
        (batch,) = _batch_tasks()  # the batch's own task
        batch.cancel()  # from outside: a shutdown, say. Its waiters are not cancelled.
        assert await asyncio.wait_for(waiting, 5) == [[1, 2], 1]
        assert calls == [[1, 2], [1, 2]]
        info = flaky.cache_info()  # load(1) joined once: one hit; two keys fetched twice
        assert (info.hits, info.misses) == (1, 4)


def _batch_task_of(keys: list[Any]) -> asyncio.Task[Any]:
    (task,) = [t for t in _batch_tasks() if t.get_coro().cr_frame.f_locals["keys"] == keys]  # type: ignore[union-attr]
    return task


async def test_a_cancelled_batch_nobody_waits_for_leaves_no_mark_on_its_keys() -> None:
    """Key B's caller gives up, then its batch's task is cancelled: nobody waits, B is not
    asked again. Before: B stayed marked as asked again while the loader had anything in
    flight (one mark per such key), and a new caller's first cancel failed it."""
    calls: list[list[str]] = []
    finished = asyncio.Event()

    @request_batch
    async def load(keys: list[str]) -> list[str]:
        calls.append(keys)
        await (finished.wait() if "slow" in keys else asyncio.sleep(0.02))
        return [f"v:{k}" for k in keys]

    async with request_scope() as store:
        slow = asyncio.ensure_future(load.load("slow"))  # in flight throughout
        await asyncio.sleep(0.005)
        for n in range(20):
            gave_up = asyncio.ensure_future(load.load(f"k{n}"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            gave_up.cancel()
            _batch_task_of([f"k{n}"]).cancel()
            await asyncio.sleep(0)
        (state,) = [s for s in store._flights.values() if hasattr(s, "again")]
        assert not state.again  # before: 20 marks
        caller = asyncio.ensure_future(load.load("k0"))  # later, a new caller
        await asyncio.sleep(0.005)
        _batch_task_of(["k0"]).cancel()  # once
        assert await asyncio.wait_for(caller, 5) == "v:k0"  # before: RuntimeError
        finished.set()
        assert await asyncio.wait_for(slow, 5) == "v:slow"


async def test_a_batch_of_its_own_keys_asked_again_counts_no_second_hit() -> None:
    """The batch function loads its own key from two tasks (a miss, a hit), and that batch
    of its own keys is cancelled and asked again: no second hit, as for other batches."""
    calls: list[list[str]] = []

    @request_batch
    async def tree(keys: list[str]) -> list[str]:
        calls.append(keys)
        if len(calls) == 1:  # the outer batch loads its own key, twice
            a, b = await asyncio.gather(tree.load("root"), tree.load("root"))
            return [f"<{a},{b}>"]
        await asyncio.sleep(0.02)
        return [f"v:{k}" for k in keys]

    async with request_scope():
        outer = tree.load("root")
        for _ in range(6):
            await asyncio.sleep(0)
        hits = tree.cache_info().hits
        max(_batch_tasks(), key=lambda t: int(t.get_name().split("-")[1])).cancel()  # its own
        # The key's first value stored (its own batch's) stays: one value per key.
        assert await asyncio.wait_for(outer, 5) == "v:root"
        assert tree.cache_info().hits == hits == 1  # before: 2 after asking again


async def test_a_key_that_failed_when_asked_again_is_asked_again_after_its_next_cancel() -> None:
    """Cancelled, asked again and failing (failures are not stored), then loaded anew and
    cancelled once more: asked again, as after a first cancel. Before: the failed key was
    left marked as asked again, and its next cancel failed it as cancelled twice."""
    calls: list[list[int]] = []
    outcomes = iter(["hang", "fail", "hang", "ok"])
    finished = asyncio.Event()

    @request_batch
    async def flaky(keys: list[int]) -> list[Any]:
        if keys == [2]:  # in flight throughout: the loop's batch state stays
            await finished.wait()
            return [20]
        calls.append(list(keys))
        outcome = next(outcomes)
        if outcome == "hang":
            await asyncio.sleep(10)
        return [LookupError(k) if outcome == "fail" else k * 10 for k in keys]

    async def cancel_the_batch() -> None:
        await asyncio.sleep(0.01)
        (batch,) = [task for task in _batch_tasks() if task is not other]
        batch.cancel()  # from outside: a shutdown, say

    async with request_scope():
        other = None
        two = asyncio.ensure_future(flaky.load(2))
        await asyncio.sleep(0.01)
        (other,) = _batch_tasks()
        for expected in (LookupError, 10):
            load = asyncio.ensure_future(flaky.load(1))
            await cancel_the_batch()
            if expected is LookupError:
                with pytest.raises(LookupError):
                    await asyncio.wait_for(load, 5)
            else:
                assert await asyncio.wait_for(load, 5) == expected
        assert calls == [[1], [1], [1], [1]]
        finished.set()
        assert await asyncio.wait_for(two, 5) == 20


@pytest.mark.parametrize(
    ("steps", "max_batch_size"), [(1, None), (2, 1)], ids=["the batch", "its chunks"]
)
async def test_a_batch_cancelled_before_its_first_step_strands_nobody(
    steps: int, max_batch_size: int | None
) -> None:
    """A shutdown cancels every task, possibly before a batch task (or a chunk task of a
    batch over max_batch_size) ran its first step, when it has not run its finally yet.
    Before: its waiters, and every later load of the loader in that scope, hung."""
    calls: list[list[int]] = []

    @request_batch(max_batch_size=max_batch_size)
    async def items(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        await asyncio.sleep(0.01)
        return [k * 10 for k in keys]

    async with request_scope():
        waiting = asyncio.gather(items.load(1), items.load(2))
        for _ in range(steps):  # 1: its calls' tasks exist; 2: they have started
            await asyncio.sleep(0)
        for task in _batch_tasks():
            task.cancel()
        assert await asyncio.wait_for(waiting, 5) == [10, 20]
        assert await asyncio.wait_for(items.load(3), 5) == 30
    assert [k for call in calls for k in call].count(3) == 1


async def test_closing_the_scope_never_strands_a_waiter() -> None:
    release = asyncio.Event()

    @request_batch
    async def slow(keys: list[int]) -> list[int]:
        await release.wait()
        return keys

    scope = request_scope()
    store = await scope.__aenter__()
    pending = asyncio.ensure_future(slow.load_many([1, 2]))
    await asyncio.sleep(0.01)
    await scope.__aexit__(None, None, None)  # the request ends with the batch in flight
    release.set()
    assert await asyncio.wait_for(pending, 5) == [1, 2]  # the waiter still gets its values
    assert len(store) == 0 and store.closed  # and a closed store keeps nothing
    assert store._flights == {}  # nor any record of the batch


async def test_outside_a_scope_nothing_is_batched_or_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    users, calls = make_loader(outside_scope="warn")
    with caplog.at_level(logging.WARNING, logger="perrequest"):
        assert await users.load(1) == "u1" and await users.load(1) == "u1"
        assert await asyncio.gather(users.load(2), users.load(3)) == ["u2", "u3"]
    assert calls == [[1], [1], [2], [3]]
    warnings = [r for r in caplog.records if "outside a request scope" in r.getMessage()]
    assert len(warnings) == 1 and "users" in warnings[0].getMessage()

    silent, silent_calls = make_loader(outside_scope="call", max_batch_size=2)
    caplog.clear()
    assert await silent.load_many([1, 2, 3]) == ["u1", "u2", "u3"]
    assert silent_calls == [[1, 2], [3]] and not caplog.records

    strict, _ = make_loader(outside_scope="raise")
    with pytest.raises(NoActiveScope, match="outside_scope='raise'"):
        await strict.load(1)


async def test_a_task_that_outlives_its_request_is_outside_any_scope() -> None:
    users, calls = make_loader(outside_scope="call")
    async with request_scope():
        current_store()["x"] = 1
        later = asyncio.Event()

        async def straggler() -> list[str]:
            await later.wait()
            return [await users.load(1), await users.load(1)]

        task = asyncio.create_task(straggler())
    later.set()
    assert await task == ["u1", "u1"] and calls == [[1], [1]]


async def test_bad_results_get_clear_errors() -> None:
    @request_batch
    async def as_set(keys: list[int]) -> set[int]:
        return set(keys)

    @request_batch
    async def as_str(keys: list[int]) -> str:
        return "ab"

    async with request_scope():
        with pytest.raises(TypeError, match="returned set: a batch function returns"):
            await as_set.load(1)
        with pytest.raises(TypeError, match="returned str"):
            await as_str.load_many([1, 2])
        with pytest.raises(TypeError, match="takes an iterable of keys"):
            as_set.load_many(5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="takes an iterable of keys"):
            as_set.load_many("ab")  # type: ignore[arg-type]


async def test_nested_loads_inside_a_batch_function_see_the_scope() -> None:
    @request_batch
    async def teams(keys: list[int]) -> list[str]:
        return [f"t{k}" for k in keys]

    @request_batch
    async def members(keys: list[int]) -> list[str]:
        names = await teams.load_many([k // 10 for k in keys])
        return [f"{n}/m{k}" for n, k in zip(names, keys, strict=True)]

    async with request_scope():
        assert await asyncio.gather(members.load(11), members.load(12)) == ["t1/m11", "t1/m12"]
        assert teams.cache_info() == (1, 1, None, 1)


async def test_futures_kept_for_hits_never_keep_a_closed_request_alive() -> None:
    users, _ = make_loader()
    async with request_scope() as store:
        await users.load(1)
        await users.load_many([2])
        assert await users.load(2) == "u2"  # a value stored by load_many gets its future
    del store
    gc.collect()
    assert perrequest.testing.live_scopes() == 0


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="eager tasks are 3.12's (make test runs this there)"
)
async def test_eager_tasks_still_share_one_batch_per_tick() -> None:
    """With ``asyncio.eager_task_factory`` each gathered ``load`` runs at once, inside
    ``create_task``: the loads of one tick still make one call of the batch function."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)
    calls: list[list[int]] = []

    @request_batch
    async def tens(keys: list[int]) -> list[int]:
        calls.append(keys)
        await asyncio.sleep(0)
        return [k * 10 for k in keys]

    async def one(key: int) -> int:
        return await tens.load(key)

    try:
        async with request_scope():
            assert await asyncio.gather(*(one(k) for k in (1, 2, 3, 2))) == [10, 20, 30, 20]
            assert await asyncio.gather(one(1), one(4)) == [10, 40]
        assert calls == [[1, 2, 3], [4]]
    finally:
        loop.set_task_factory(None)


def test_an_async_loader_called_from_sync_code_names_the_loader_when_never_awaited() -> None:
    """A ``def`` endpoint calling an async loader's ``load`` gets a coroutine; Python's
    "never awaited" warning names the loader's load, not a private ``unbatched`` (a
    newcomer's walk-through, 7 December 2026)."""

    @request_batch
    async def users_from_sync_code(ids: list[int]) -> list[int]:
        return ids

    with request_scope():
        one, many = users_from_sync_code.load(1), users_from_sync_code.load_many([1, 2])
        names = (one.__qualname__, many.__qualname__)
        assert asyncio.run(one) == 1 and asyncio.run(many) == [1, 2]  # still usable so
    name = f"{__name__}.{users_from_sync_code.__qualname__}"
    assert names == (f"{name}.load", f"{name}.load_many"), names


@pytest.mark.parametrize("apart", [0, 1])
async def test_loads_a_loop_iteration_apart_join_one_batch_as_with_dataloader(apart: int) -> None:
    """In a GraphQL query, the children of one batch's callers resume in different loop
    iterations (a list of one item finishes before a list of two): DataLoader, whose
    dispatch is a task made on the next iteration, joins their loads; a batch started on
    the next iteration split them, one more round trip a level (a probe, 7 December)."""
    from aiodataloader import DataLoader

    calls: dict[str, list[list[int]]] = {"ours": [], "dataloader": []}

    @request_batch
    async def ours(ids: list[int]) -> list[str]:
        calls["ours"].append(list(ids))
        return [f"u{i}" for i in ids]

    async def theirs(ids: list[int]) -> list[str]:
        calls["dataloader"].append(list(ids))
        return [f"u{i}" for i in ids]

    async def two_loads(load: Any) -> list[str]:
        async def first() -> str:
            return await load(1)  # type: ignore[no-any-return]

        async def second() -> str:
            for _ in range(apart):  # one more level of the query
                await asyncio.sleep(0)
            return await load(2)  # type: ignore[no-any-return]

        return await asyncio.gather(first(), second())

    assert await two_loads(DataLoader(theirs).load) == ["u1", "u2"]
    async with request_scope():
        assert await two_loads(ours.load) == ["u1", "u2"]
    assert calls["ours"] == calls["dataloader"] == [[1, 2]]


async def test_a_value_that_serves_once_fails_its_key_and_is_not_cached() -> None:
    """A batch function returning, for a key, what can be used once (a coroutine it did not
    await, a generator, a map) had it cached: every later load of the key got it spent
    (a RuntimeError for the coroutine, an empty generator). As a memo refuses such a
    result, the key fails with a TypeError naming it, the other keys are loaded, and
    nothing is cached for it (a probe, 7 December 2026)."""
    calls: list[list[int]] = []

    async def row(key: int) -> str:
        return f"u{key}"

    @request_batch
    async def rows(keys: list[int]) -> list[Any]:
        calls.append(list(keys))
        made = {1: lambda: row(1), 2: lambda: (c for c in "ab"), 3: lambda: map(str, "ab")}
        return [made[k]() if k in made else f"u{k}" for k in keys]

    async with request_scope():
        for key, kind in [
            (1, "a coroutine"),
            (2, "a generator"),
            (3, r"a one-shot iterator \(map\)"),
        ]:
            with pytest.raises(TypeError, match=f"value of key {key}: {kind}") as failure:
                await rows.load(key)
            assert "@request_batch" in str(failure.value) and "rows" in str(failure.value)
        assert await rows.load_many([4, 5]) == ["u4", "u5"]
        with pytest.raises(TypeError, match="value of key 1: a coroutine"):
            await rows.load_many([1, 6])
        assert await rows.load(6) == "u6"  # loaded with the failing key, and kept
        calls.clear()
        with pytest.raises(TypeError):
            await rows.load(1)  # not cached: asked again
        assert calls == [[1]]
        assert rows.cache_info().currsize == 3  # u4, u5, u6


async def test_a_value_that_serves_once_in_a_mapping_fails_its_key_too() -> None:
    async def rows() -> AsyncIterator[int]:
        yield 1

    class Meta(type):  # a class its metaclass cannot hash: looked at one by one
        def __eq__(cls, other: object) -> bool:
            return cls is other

        __hash__ = None  # type: ignore[assignment]

    class Odd(metaclass=Meta):
        pass

    odd = Odd()

    @request_batch
    async def by_key(keys: list[int]) -> dict[int, Any]:
        return {k: rows() if k == 1 else odd for k in keys}

    async with request_scope():
        with pytest.raises(TypeError, match="value of key 1: an async generator"):
            await by_key.load(1)
        assert await by_key.load(2) is odd
