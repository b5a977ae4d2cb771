"""Attacks on @request_batch: several event loops in one thread and scope, and
bind_scope carrying the batch fetch it is called in."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from perrequest import bind_scope, request_batch, request_scope


def _async_loader(delay: float = 0.05) -> tuple[Any, list[list[int]]]:
    calls: list[list[int]] = []

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        calls.append(list(keys))
        await asyncio.sleep(delay)
        return [f"u{k}" for k in keys]

    return users, calls


def test_a_loop_run_again_after_another_loop_in_its_thread_joins_its_own_flight() -> None:
    """A worker's loop (run_until_complete per job) left a key in flight; an
    asyncio.run in the same thread and scope came between; the next job on the first
    loop loaded that key again: it joins the flight, never fetches it twice at once."""
    users, calls = _async_loader()

    async def start() -> Any:
        future = users.load(1)
        for _ in range(3):
            await asyncio.sleep(0)  # the batch's task has started
        return future

    async def other() -> str:
        return str(await users.load(2))

    loop = asyncio.new_event_loop()
    try:
        with request_scope():
            first = loop.run_until_complete(start())
            assert calls == [[1]]
            assert asyncio.run(other()) == "u2"

            async def again() -> list[str]:
                return list(await asyncio.gather(first, users.load(1)))

            assert loop.run_until_complete(again()) == ["u1", "u1"]
            assert calls == [[1], [2]]  # before: [[1], [2], [1]]
    finally:
        loop.close()


def test_a_loop_run_again_with_a_batch_pending_shares_it() -> None:
    """The same with the first loop's batch still pending (its start scheduled, not run):
    the key loaded again in the next job joins that batch."""
    users, calls = _async_loader()

    async def start() -> Any:
        return users.load(1)  # pending: the loop stops before the batch starts

    async def other() -> str:
        return str(await users.load(2))

    loop = asyncio.new_event_loop()
    try:
        with request_scope():
            first = loop.run_until_complete(start())
            assert asyncio.run(other()) == "u2"

            async def again() -> list[str]:
                return list(await asyncio.gather(first, users.load(1)))

            assert loop.run_until_complete(again()) == ["u1", "u1"]
            assert sorted(calls) == [[1], [2]]
    finally:
        loop.close()


def test_a_load_in_a_thread_whose_former_loop_now_runs_in_another_gets_its_own_loops() -> None:
    """A loop run in one thread, then (its job not done) in another: a load in the first
    thread, on a loop of its own, gets a future of that loop and its own batch, not one
    of the loop running elsewhere (which its task cannot await)."""
    users, calls = _async_loader(delay=0.3)

    async def start() -> Any:
        future = users.load(1)
        for _ in range(3):
            await asyncio.sleep(0)
        return future

    loop = asyncio.new_event_loop()
    try:
        with request_scope():
            first = loop.run_until_complete(start())
            out: list[Any] = []

            def elsewhere() -> None:
                async def finish() -> Any:
                    return await first

                out.append(loop.run_until_complete(finish()))

            thread = threading.Thread(target=bind_scope(elsewhere), daemon=True)
            thread.start()
            while not loop.is_running():
                pass

            async def here() -> str:
                return str(await asyncio.wait_for(users.load(2), 5))

            assert asyncio.run(here()) == "u2"  # before: RuntimeError (another loop's future)
            thread.join(5)
            assert out == ["u1"]
            assert sorted(calls) == [[1], [2]]
    finally:
        for _ in range(500):  # the other thread's run ends with its batch
            if not loop.is_running():
                break
            time.sleep(0.01)
        loop.close()


def test_a_hit_in_a_thread_whose_former_loop_now_runs_in_another_fails_loudly() -> None:
    """The limit batching.md states: a hit made where a loop that moved to another thread
    was running gets that loop's finished future. Awaited it gives the value; gather()
    raises at once: never a hang, never another request's value."""
    users, calls = _async_loader()
    loop = asyncio.new_event_loop()
    try:
        with request_scope():

            async def first() -> str:
                return str(await users.load(1))

            assert loop.run_until_complete(first()) == "u1"
            thread = threading.Thread(
                target=bind_scope(loop.run_until_complete), args=(asyncio.sleep(0.5),)
            )
            thread.start()
            while not loop.is_running():
                time.sleep(0.001)

            async def here() -> tuple[str, str]:
                value = str(await users.load(1))
                try:
                    await asyncio.gather(users.load(1))
                except RuntimeError as exc:  # wait_for(): ValueError, the same words
                    return value, str(exc)
                return value, "gathered"

            value, gathered = asyncio.run(here())
            thread.join(5)
            assert value == "u1"
            assert "different loop" in gathered
            assert calls == [[1]]
    finally:
        loop.close()


def test_a_bound_helper_called_in_a_batch_function_keeps_that_fetch() -> None:
    """A helper bound at the start of the request, called inside a batch function, hands
    its loads to a pool with the context copied: bind_scope replaced the fetch the batch
    function runs in with the (empty) one of its binding, so the pool's load of a key of
    that fetch waited for the fetch, which waited for the pool."""
    pool = ThreadPoolExecutor(4)
    out: list[Any] = []

    def run() -> None:
        def helper(keys: list[int]) -> list[int]:
            run_here = contextvars.copy_context().run
            return list(pool.submit(run_here, tree.load_many, keys).result(timeout=3))

        bound = bind_scope(helper)

        @request_batch
        def tree(keys: list[int]) -> list[int]:
            below = bound([k // 2 for k in keys if k])
            return [0 if not k else below.pop(0) + 1 for k in keys]

        try:
            out.append(tree.load_many([4, 2, 1]))
        except Exception as exc:  # a TimeoutError before
            out.append(exc)

    with request_scope():
        worker = threading.Thread(target=bind_scope(run), daemon=True)
        worker.start()
        worker.join(10)
    pool.shutdown(wait=False, cancel_futures=True)
    assert out == [[3, 2, 1]]


class _Value:
    pass


def test_a_function_bound_in_a_batch_function_holds_no_value_after_the_request() -> None:
    """A callable bound inside a batch function and kept past the request (a callback
    registry) carries that fetch: the fetch must not hold its values once it has ended
    (a waiting thread made it keep them in its future)."""
    kept: list[Any] = []
    started = threading.Event()

    @request_batch
    def values(keys: list[int]) -> list[_Value]:
        kept.append(bind_scope(lambda: None))
        started.set()
        time.sleep(0.2)  # another thread comes to wait for this fetch
        return [_Value() for _ in keys]

    got: list[Any] = []
    with request_scope():
        first = threading.Thread(target=bind_scope(lambda: got.append(values.load(1))))
        first.start()
        assert started.wait(5)
        second = threading.Thread(target=bind_scope(lambda: got.append(values.load(1))))
        second.start()
        first.join(5)
        second.join(5)
        assert len(got) == 2 and got[0] is got[1]
        assert values.cache_info().misses == 1
    ref = weakref.ref(got[0])
    del got[:]
    gc.collect()
    assert kept and ref() is None  # before: alive, in the fetch's future's outcomes


def test_a_load_under_trio_never_awaited_warns_once() -> None:
    """Under trio a load is a coroutine; one never awaited gets Python's one warning. The
    single-key path made the coroutine of unbatched() as it was called and passed it to
    another: two warnings, one naming a private helper and coming whenever the first's
    record let the inner one go."""
    import anyio

    @request_batch
    async def users(keys: list[int]) -> list[int]:
        return keys

    async def main() -> None:
        with request_scope():
            users.load(1)  # never awaited

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        anyio.run(main, backend="trio")
        gc.collect()
        for record in caught:
            record.source = None  # the coroutine, and whatever its frame holds
        gc.collect()
    unawaited = [w for w in caught if "was never awaited" in str(w.message)]
    assert len(unawaited) == 1, [str(w.message) for w in unawaited]


def test_a_batch_function_loading_its_own_keys_under_trio_recurses_as_deep_as_before() -> None:
    """Under trio a load of one key is one coroutine, as a load_many is: wrapping
    unbatched() in another coroutine to take its first value cost a frame per level of a
    batch function that loads its own keys (a tree), so load() hit RecursionError a
    quarter sooner than load_many() (246 levels instead of 329, 3.12)."""
    import anyio

    @request_batch
    async def tree(keys: list[int]) -> list[int]:
        out = []
        for k in keys:
            below = 0 if not k else (await tree.load(k - 1)) if one else (await tree([k - 1]))[0]
            out.append(0 if not k else below + 1)
        return out

    one = False
    deepest: list[int] = []

    async def main() -> None:
        nonlocal one
        with request_scope():
            low, high = 1, 5000  # the deepest tree load_many() loads
            while low < high:
                mid = (low + high + 1) // 2
                try:
                    await tree.load_many([mid])
                    low = mid
                except RecursionError:
                    high = mid - 1
                tree.cache_clear()
            deepest.append(low)
            one = True
            try:
                deepest.append(await tree.load(low))
            except RecursionError as exc:
                deepest.append(exc)  # type: ignore[arg-type]

    thread = threading.Thread(target=anyio.run, args=(main,), kwargs={"backend": "trio"})
    thread.start()
    thread.join(30)
    assert len(deepest) == 2 and deepest[1] == deepest[0] > 100, deepest
