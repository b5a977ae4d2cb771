"""@request_memo on async functions: single-flight, errors and cancellation."""

from __future__ import annotations

import asyncio
import gc
import inspect
import sys
import threading
import time
import traceback
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anyio
import cachetools
import pytest
from sniffio import current_async_library

from perrequest import ScopeStats, bind_scope, current_store, request_memo, request_scope
from perrequest.testing import live_scopes


async def test_async_memo_basics() -> None:
    calls = []

    @request_memo
    async def fetch(x: int, *, scale: int = 1) -> int:
        calls.append(x)
        await asyncio.sleep(0)
        return x * scale

    assert inspect.iscoroutinefunction(fetch)
    async with request_scope() as store:
        assert await fetch(2, scale=3) == 6 and await fetch(2, scale=3) == 6
        assert fetch.cache_info() == (1, 1, None, 1)
        assert store.stats.hits == 1
    assert await fetch(2) == 2  # outside a scope: called, not cached
    assert calls == [2, 2]


async def test_concurrent_awaits_run_once_and_share_the_result() -> None:
    calls = []
    release = asyncio.Event()

    @request_memo
    async def load(x: int) -> list[int]:
        calls.append(x)
        await release.wait()
        return [x]

    async with request_scope() as store:
        tasks = [asyncio.create_task(load(1)) for _ in range(20)]
        await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.gather(*tasks)
        assert calls == [1] and all(r is results[0] for r in results)
        assert (store.stats.misses, store.stats.hits) == (1, 19)


async def test_waiters_get_the_exception_and_it_is_not_cached() -> None:
    calls = []
    release = asyncio.Event()

    @request_memo
    async def load(x: int) -> int:
        calls.append(x)
        await release.wait()
        if len(calls) == 1:
            raise LookupError("not found")
        return x

    async with request_scope():
        tasks = [asyncio.create_task(load(1)) for _ in range(5)]
        await asyncio.sleep(0.01)
        release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, LookupError) for o in outcomes) and len(calls) == 1
        assert await load(1) == 1 and len(calls) == 2


async def test_cancelling_the_running_caller_does_not_cancel_the_others() -> None:
    calls = []
    started = asyncio.Event()

    @request_memo
    async def slow(x: int) -> int:
        calls.append(x)
        started.set()
        await asyncio.sleep(0.05)
        return x * 2

    async with request_scope():
        first = asyncio.create_task(slow(4))
        await started.wait()
        others = [asyncio.create_task(slow(4)) for _ in range(3)]
        await asyncio.sleep(0)
        first.cancel()
        assert await asyncio.gather(*others) == [8, 8, 8]
        with pytest.raises(asyncio.CancelledError):
            await first
        assert len(calls) == 2  # one waiter restarted it, once
        assert await slow(4) == 8 and len(calls) == 2


async def test_cancelling_every_waiter_cancels_and_caches_nothing() -> None:
    finished = []

    @request_memo
    async def slow(x: int) -> int:
        await asyncio.sleep(10)
        finished.append(x)
        return x

    async with request_scope() as store:
        tasks = [asyncio.create_task(slow(1)) for _ in range(3)]
        await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert finished == [] and len(store) == 0 and not len(store._flights or ())


async def test_cancelling_a_waiter_leaves_the_computation_alone() -> None:
    @request_memo
    async def slow(x: int) -> int:
        await asyncio.sleep(0.05)
        return x

    async with request_scope():
        owner = asyncio.create_task(slow(1))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(slow(1))
        await asyncio.sleep(0)
        waiter.cancel()
        assert await owner == 1
        assert slow.cache_info().currsize == 1


async def test_async_methods_and_concurrent_scopes_are_isolated() -> None:
    class Users:
        @request_memo
        async def name(self, uid: int) -> str:
            await asyncio.sleep(0)
            return f"user-{uid}-{id(current_store())}"

    users = Users()

    @request_scope()
    async def request(uid: int) -> tuple[str, str]:
        first = await users.name(uid)
        await asyncio.sleep(0)
        return first, await users.name(uid)

    results = await asyncio.gather(*(request(1) for _ in range(50)))
    assert all(a == b for a, b in results)
    assert len({a for a, _ in results}) == 50  # every request computed its own
    assert live_scopes() == 0


async def test_scope_closing_mid_computation_does_not_cache_or_fail() -> None:
    gate = asyncio.Event()

    @request_memo
    async def slow() -> int:
        await gate.wait()
        return 5

    async with request_scope() as store:
        task = asyncio.create_task(slow())
        await asyncio.sleep(0)
    gate.set()
    assert await task == 5 and store.closed and len(store) == 0


def test_memo_under_trio_through_anyio() -> None:
    calls = []

    @request_memo
    async def load(x: int) -> int:
        calls.append(x)
        await anyio.sleep(0)
        return x

    async def main() -> tuple[int, int]:
        async with request_scope():
            first = await load(1)
            return first, await load(1)

    assert anyio.run(main, backend="trio") == (1, 1)
    assert calls == [1]


@pytest.mark.parametrize("shared", [False, True], ids=["request store", "shared="])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_delete_during_a_computation_keeps_its_stale_value_out(
    backend: str, shared: bool
) -> None:
    """A task reads a row slowly; the request writes the row and deletes the memo's entry.
    The slow read ends later: under trio (no single-flight) its value was stored anyway,
    so the request, and with shared= every later request, read the old row. Its caller
    gets the value read and stored since the delete (_flight.end), not its own stale one."""
    row = {"value": 1}
    events: dict[str, anyio.Event] = {}
    options: dict[str, Any] = {"shared": cachetools.LRUCache(10)} if shared else {}

    @request_memo(**options)
    async def read(key: str) -> int:
        value = row["value"]
        if not events["started"].is_set():
            events["started"].set()
            await events["go on"].wait()
        return value

    async def slow_read(got: list[int]) -> None:
        got.append(await read("row"))

    async def main() -> tuple[list[int], int, int, int]:
        events["started"], events["go on"] = anyio.Event(), anyio.Event()
        got: list[int] = []
        async with request_scope():
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(slow_read, got)
                await events["started"].wait()
                row["value"] = 2
                read.cache_delete("row")
                after_write = await read("row")
                events["go on"].set()
            at_end = await read("row")
        async with request_scope():
            return got, after_write, at_end, await read("row")

    got, after_write, at_end, next_request = anyio.run(main, backend=backend)
    assert got == [2]  # the value stored since (one value per key); before: its own, 1
    assert after_write == at_end == 2  # before, under trio: 1 at the end
    assert next_request == 2  # before, under trio with shared=: 1 until it expired


@pytest.mark.parametrize("shared", [False, True], ids=["request store", "shared="])
def test_under_trio_callers_that_miss_at_once_all_read_the_first_value_stored(
    shared: bool,
) -> None:
    """Two tasks miss one key at once and each computes (no single-flight under trio).
    Before: the last to finish overwrote the first's value, so one request read 1, then 2."""
    counter = iter(range(1, 100))
    order: list[anyio.Event] = []
    options: dict[str, Any] = {"shared": cachetools.LRUCache(10)} if shared else {}

    @request_memo(**options)
    async def token(key: str) -> int:
        value = next(counter)
        await order[value - 1].wait()  # the first call ends first
        return value

    async def call(got: list[int]) -> None:
        got.append(await token("k"))

    async def main() -> list[int]:
        order.extend([anyio.Event(), anyio.Event()])
        got: list[int] = []
        async with request_scope():
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call, got)
                tasks.start_soon(call, got)
                await anyio.sleep(0.01)
                order[0].set()
                await anyio.sleep(0.01)
                got.append(await token("k"))  # a hit: the first value
                order[1].set()
            got.append(await token("k"))
        return got

    assert anyio.run(main, backend="trio") == [1, 1, 1, 1]  # before: [1, 1, 2, 2]


@pytest.mark.parametrize("shared", [False, True], ids=["request store", "shared="])
def test_under_trio_a_delete_of_another_key_keeps_a_computation_in_flight_stored(
    shared: bool,
) -> None:
    """_flight.run_async: under trio a computation registers as its thread, so a delete
    finds it by its key. Before, it was not registered and any delete in the store (here
    of an unrelated key) kept its value out: the next call computed again and the request
    read two values of one key."""
    values = iter(range(1, 100))
    options: dict[str, Any] = {"shared": cachetools.LRUCache(10)} if shared else {}

    @request_memo(**options)
    async def token(key: str) -> int:
        value = next(values)
        await anyio.sleep(0.05)
        return value

    @request_memo
    async def other(key: str) -> str:
        return key

    async def main() -> list[int]:
        got: list[int] = []
        async with request_scope():
            await other("x")

            async def call() -> None:
                got.append(await token("k"))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call)
                await anyio.sleep(0.01)
                other.cache_delete("x")  # another key
            got.append(await token("k"))
        return got

    assert anyio.run(main, backend="trio") == [1, 1]  # before: [1, 2]


@pytest.mark.parametrize("first_ends", ["first", "second"])
def test_under_trio_a_key_computed_twice_across_a_delete_of_another_key_has_one_value(
    first_ends: str,
) -> None:
    """_flight._keep: under trio a second caller of a key in flight computes it unshared. A
    delete of another key meanwhile kept its value out and it returned it all the same:
    ending first, the registered computation then stored its own; ending last, it returned
    its value over the one stored. Either way the request read two values of one key."""
    values = iter(range(1, 100))

    @request_memo
    async def token(key: str) -> int:
        value = next(values)
        await anyio.sleep(0.05 if (value == 1) == (first_ends == "first") else 0.2)
        return value

    @request_memo
    async def other(key: str) -> str:
        return key

    async def main() -> set[int]:
        got: set[int] = set()
        async with request_scope():
            await other("x")

            async def call() -> None:
                got.add(await token("k"))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call)
                await anyio.sleep(0.01)
                tasks.start_soon(call)
                await anyio.sleep(0.01)
                other.cache_delete("x")  # another key
            got.add(await token("k"))
        return got

    assert len(anyio.run(main, backend="trio")) == 1  # before: {1, 2}


async def test_a_cycle_of_waiters_computing_across_a_delete_of_another_key_has_one_value() -> None:
    """_flight._keep: the task that closes a cycle of waiters computes the key unshared; a
    delete of another key meanwhile kept its value out, and the cycle's first task then
    stored its own: the request read two values of one key."""
    counter = iter(range(1, 100))
    seen: list[int] = []

    @request_memo
    async def other(key: str) -> str:
        return key

    @request_memo
    async def first() -> int:
        value = next(counter)
        await asyncio.sleep(0.05)
        if value == 1:
            await second()  # waits for the task that computes second
        return value

    @request_memo
    async def second() -> str:
        await asyncio.sleep(0.1)
        seen.append(await first())  # closes the cycle: computed unshared
        return "second"

    async with request_scope():
        await other("x")
        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.01)
        computing = asyncio.create_task(first())
        await asyncio.sleep(0.12)
        other.cache_delete("x")  # another key, while the unshared computation runs
        await asyncio.gather(waiting, computing)
        seen.append(await first())
    assert seen == [2, 2]  # before: [2, 1]


def test_an_asyncio_task_of_another_thread_waits_for_a_trio_computation() -> None:
    """_flight.run_async: a trio computation registers as its thread, so an asyncio task
    of a thread sharing the store (bind_scope) waits for it instead of computing too."""
    calls: list[str] = []
    started = threading.Event()

    @request_memo
    async def user(user_id: int) -> str:
        calls.append(current_async_library())
        started.set()
        await anyio.sleep(0.3)  # the other thread's task asks meanwhile
        return f"user {user_id}"

    def other_thread(bound: Any) -> str:
        assert started.wait(5)
        return asyncio.run(asyncio.wait_for(bound(1), 5))  # type: ignore[no-any-return]

    with ThreadPoolExecutor(1) as pool:

        async def main() -> tuple[str, Future[str]]:
            async with request_scope():
                waiter = pool.submit(other_thread, bind_scope(user))
                return await user(1), waiter

        mine, waiter = anyio.run(main, backend="trio")
        assert (mine, waiter.result(5)) == ("user 1", "user 1")
    assert calls == ["trio"]  # before: ["trio", "asyncio"]


async def test_two_tasks_computing_each_others_keys_do_not_deadlock() -> None:
    """Task A computes f("a"), which awaits f("b"); task B computes f("b"), which awaits
    f("a"). Awaiting each other would hang both: the second to wait computes itself."""
    started = {"a": asyncio.Event(), "b": asyncio.Event()}
    budget = [4]

    @request_memo
    async def f(key: str) -> str:
        if key in ("a", "b"):
            started[key].set()  # both computations have begun before either goes on
            await started["b" if key == "a" else "a"].wait()
            budget[0] -= 1
            if budget[0] >= 0:
                return key + await f("b" if key == "a" else "a")
        return key

    async with request_scope():
        a, b = await asyncio.wait_for(asyncio.gather(f("a"), f("b")), 5)  # before: forever
    assert a[0] == "a" and b[0] == "b"


# -- compute time of computations that are not shared ----------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_misses_are_timed_under_every_async_library(backend: str) -> None:
    """Under trio, tasks compute without single-flight; their misses were not timed,
    so compute_s and the time saved stayed 0 however slow the function."""

    @request_memo
    async def load(x: int) -> int:
        await anyio.sleep(0.05)
        return x

    async def main() -> list[ScopeStats]:
        closed: list[ScopeStats] = []
        async with request_scope(on_close=closed.append):
            await load(1)
            await load(1)
        return closed

    (stats,) = anyio.run(main, backend=backend)
    (loaded,) = stats.functions.values()
    assert (loaded.hits, loaded.misses) == (1, 1)
    assert loaded.compute_s >= 0.04  # before, under trio: 0.0


async def test_a_recursive_miss_is_timed_like_any_miss() -> None:
    """A call that meets its own computation, which somebody waits for (recursion into
    the same key), computes without sharing: timed too, so compute_s covers both
    misses (before: the outer one only)."""
    calls = [0]

    @request_memo
    async def load(x: int) -> int:
        calls[0] += 1
        if calls[0] == 1:
            await asyncio.sleep(0.01)  # the second task comes to wait meanwhile
            return await load(x)  # the same key, while this call computes it
        await asyncio.sleep(0.05)
        return x

    closed: list[ScopeStats] = []
    async with request_scope(on_close=closed.append):
        assert await asyncio.gather(load(1), load(1)) == [1, 1]
    (loaded,) = closed[0].functions.values()
    assert (loaded.hits, loaded.misses) == (1, 2)
    assert loaded.compute_s >= 0.1  # the outer 0.06 (the inner inside it) + the inner 0.05


def test_a_recursive_sync_miss_is_timed_like_any_miss() -> None:
    calls = [0]

    @request_memo
    def load(x: int) -> int:
        calls[0] += 1
        if calls[0] == 1:
            return load(x)
        time.sleep(0.05)
        return x

    closed: list[ScopeStats] = []
    with request_scope(on_close=closed.append):
        assert load(1) == 1
    (loaded,) = closed[0].functions.values()
    assert loaded.misses == 2 and loaded.compute_s >= 0.09


@pytest.mark.slow  # seconds of waiting, on purpose (make check skips it)
async def test_a_task_waiting_for_a_computation_that_dies_at_the_recursion_limit_is_freed() -> None:
    """The async twin of test_memo_threads' test: waking a key's waiters takes a few
    frames, and a computation that ends in a ``RecursionError`` at the limit may have
    none left, so its waiting task waited for ever. A waiter looks every second: a
    computation gone without an outcome is done again, here."""
    loop = asyncio.get_running_loop()
    pause = loop.create_future()
    reached = asyncio.Event()
    bottom: list[int] = []

    @request_memo
    async def deep(n: int) -> int:
        try:
            return await deep(n + 1) + 1
        except RecursionError:
            if not bottom:  # the deepest key registered: no frame left here
                bottom.append(n)
                reached.set()
                await pause  # awaiting a Future takes no frame; the waiter joins meanwhile
            raise

    async def wait_for_the_deepest_key() -> object:
        await reached.wait()
        try:
            return await deep(bottom[0])
        except RecursionError as exc:  # computed again in this task: as deep, as bad
            return exc

    limit = sys.getrecursionlimit()
    async with request_scope():
        waiter = asyncio.ensure_future(wait_for_the_deepest_key())
        loop.call_later(0.3, pause.set_result, None)
        sys.setrecursionlimit(len(traceback.extract_stack()) + 60)
        gc.disable()  # no collection at the limit: see test_memo_threads
        try:
            with pytest.raises(RecursionError):
                await deep(0)
        finally:
            sys.setrecursionlimit(limit)
            gc.enable()
        done, _ = await asyncio.wait({waiter}, timeout=10)
        assert done, "the waiting task still waits for a computation that has ended"
        assert isinstance(waiter.result(), RecursionError)


@pytest.mark.slow  # seconds of waiting, on purpose (make check skips it)
async def test_a_task_waiting_several_seconds_leaves_one_wake_up_on_the_outcome() -> None:
    """A waiting task looks every second whether the computation has ended. It wrapped
    the shared future anew each second, and every ``wrap_future`` adds a callback to it
    that nothing removes: 100 tasks waiting 2.5 s left 300 callbacks, each waking the
    loop when the value came (growing with the wait, unbounded). Now: one wake-up each."""
    from perrequest._flight import Waited

    calls: list[int] = []

    @request_memo
    async def slow(n: int) -> int:
        calls.append(n)
        await asyncio.sleep(2.5)
        return n * 10

    async with request_scope():
        store = current_store()
        computing = asyncio.ensure_future(slow(1))
        await asyncio.sleep(0.05)
        waiters = [asyncio.ensure_future(slow(1)) for _ in range(100)]
        await asyncio.sleep(2.2)
        (record,) = [r for r in store._flights.values() if type(r) is Waited]
        callbacks = len(record.future._waiting)
        assert await asyncio.gather(computing, *waiters) == [10] * 101
    assert calls == [1], "the waiters computed again instead of waiting"
    assert callbacks <= 100, f"{callbacks} callbacks for 100 waiting tasks"


async def test_a_waiter_cancelled_by_its_task_group_frees_the_value_without_the_collector() -> None:
    """The second task waits for the first's computation; the first then fails, and the
    task group cancels the second as it is woken. Its cancellation's traceback holds the
    waiting frames: none of them may hold the value (asyncio.wait's did: a cycle)."""
    refs: list[weakref.ref[object]] = []

    class Value:
        pass

    @request_memo
    async def slow(tag: str) -> Value:
        await asyncio.sleep(0.02)
        value = Value()
        refs.append(weakref.ref(value))
        return value

    async def fails() -> None:
        await slow("tg")
        raise LookupError("the first to finish fails the group")

    gc.collect()
    gc.disable()
    try:
        async with request_scope():
            with pytest.raises(BaseExceptionGroup):
                async with anyio.create_task_group() as group:
                    group.start_soon(fails)
                    group.start_soon(fails)
        await asyncio.sleep(0.05)
        assert len(refs) == 1 and refs[0]() is None, "the value outlived its scope"
    finally:
        gc.enable()


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="eager tasks are 3.12's (make test runs this there)"
)
async def test_eager_tasks_share_one_computation_and_the_store() -> None:
    """With ``asyncio.eager_task_factory`` a task runs at once, inside ``create_task``, up
    to its first suspension: the first caller registers and computes in its own task
    before the second exists; the second waits for it. Cancelling the computing task
    hands the key to the waiter, and tasks still inherit the store."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)
    computed: list[int] = []

    @request_memo
    async def slow(x: int) -> object:
        computed.append(x)
        await asyncio.sleep(0.01)
        return object()

    try:
        async with request_scope() as store:
            first, second, third = await asyncio.gather(slow(1), slow(1), slow(1))
            assert first is second is third and computed == [1]
            computing = asyncio.create_task(slow(2))  # registered already: eager
            waiting = asyncio.create_task(slow(2))
            computing.cancel()
            assert await waiting is not None and computed == [1, 2, 2]
            assert await asyncio.create_task(_store_seen()) is store
    finally:
        loop.set_task_factory(None)


async def _store_seen() -> object:
    return current_store()


def test_single_flight_holds_when_event_loops_and_threads_take_turns() -> None:
    """On 3.11 the task lookup asks the last loop seen first (a system call less per miss).
    A loop that stopped (``asyncio.run`` again in one scope), or another thread's, must not
    lose the sharing, deadlock a recursion, or hand a caller another loop's value."""
    import threading

    from perrequest import bind_scope

    calls: list[int] = []

    @request_memo
    async def slow(key: int) -> int:
        calls.append(key)
        await asyncio.sleep(0.02)
        return key * 10

    @request_memo
    async def recursive(key: int) -> int:
        return key if key <= 0 else await recursive(key) + 1  # the same key: no deadlock

    async def round_of(base: int) -> list[int]:
        return await asyncio.gather(*(slow(base + k) for k in (0, 0, 0, 1, 1)))

    outcomes: list[list[int]] = []

    def in_a_thread(base: int) -> None:
        outcomes.append(asyncio.run(round_of(base)))

    with request_scope():
        for base in (100, 200, 300):  # a new loop each time, in this thread
            assert asyncio.run(round_of(base)) == [base * 10] * 3 + [base * 10 + 10] * 2
        threads = [threading.Thread(target=bind_scope(in_a_thread), args=(b,)) for b in (400, 500)]
        for thread in threads:
            thread.start()
        assert asyncio.run(round_of(600)) == [6000] * 3 + [6010] * 2
        for thread in threads:
            thread.join(10)
        with pytest.raises(RecursionError):
            asyncio.run(asyncio.wait_for(recursive(1), 10))
    assert sorted(outcomes) == [[4000] * 3 + [4010] * 2, [5000] * 3 + [5010] * 2]
    assert sorted(calls) == [100, 101, 200, 201, 300, 301, 400, 401, 500, 501, 600, 601]
