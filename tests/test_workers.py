"""Scopes outside HTTP: asyncio consumers, thread pools, bind_scope, and who copies the context."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread
import pytest
from asgiref.sync import sync_to_async
from starlette.concurrency import run_in_threadpool

import perrequest
from perrequest import (
    MemoStore,
    NoActiveScope,
    ScopeStats,
    bind_scope,
    current_store,
    in_request_scope,
    request_memo,
    request_scope,
)
from perrequest.testing import assert_no_live_scopes, live_scopes

pytestmark = pytest.mark.timeout(30)

JOBS = 40
KEYS = (1, 2, 3, 1, 2, 3, 2)


@pytest.fixture(autouse=True)
def _no_scope_left() -> Iterator[None]:
    yield
    assert_no_live_scopes()
    assert not in_request_scope()


def _probe() -> MemoStore | None:
    """The store this code sees, or None outside any scope."""
    return current_store() if in_request_scope() else None


# -- one scope per job ---------------------------------------------------------


async def test_asyncio_consumer_loop_gives_each_job_its_own_scope() -> None:
    computed: Counter[int] = Counter()
    closed: list[ScopeStats] = []
    running = peak = 0

    @request_memo
    async def lookup(key: int) -> tuple[int, int, object]:
        job = perrequest.get("job")
        computed[job] += 1
        await asyncio.sleep(0.001)
        return (job, key, object())

    @request_scope(on_close=closed.append)
    async def handle(job: int) -> list[tuple[int, int, object]]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            perrequest.set("job", job)
            # Concurrent awaits of one key share a computation (single-flight)...
            values = list(await asyncio.gather(*(lookup(key) for key in KEYS)))
            # ...and later ones are hits.
            values += [await lookup(key) for key in KEYS]
            return values
        finally:
            running -= 1

    queue: asyncio.Queue[int | None] = asyncio.Queue()
    results: dict[int, list[tuple[int, int, object]]] = {}

    async def consumer() -> None:
        while (job := await queue.get()) is not None:
            results[job] = await handle(job)

    consumers = [asyncio.create_task(consumer()) for _ in range(8)]
    for job in range(JOBS):
        queue.put_nowait(job)
    for _ in consumers:
        queue.put_nowait(None)
    await asyncio.gather(*consumers)

    cross_talk = sum(1 for job, values in results.items() for owner, *_ in values if owner != job)
    assert cross_talk == 0
    assert computed == {job: 3 for job in range(JOBS)}
    for values in results.values():  # one value per key within a job
        assert len({id(value) for value in values}) == 3
    assert len({id(v) for values in results.values() for v in values}) == 3 * JOBS
    assert len(closed) == JOBS and all(s.misses == 3 and s.hits == 11 for s in closed)
    assert peak > 1, "the consumers never ran two jobs at once"


def test_thread_pool_worker_gives_each_job_its_own_scope() -> None:
    computed: Counter[int] = Counter()
    lock = threading.Lock()
    running = peak = 0

    @request_memo
    def lookup(key: int) -> tuple[int, int, object]:
        job = perrequest.get("job")
        with lock:
            computed[job] += 1
        time.sleep(0.001)
        return (job, key, object())

    @request_scope()
    def handle(job: int) -> list[tuple[int, int, object]]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            perrequest.set("job", job)
            return [lookup(key) for key in KEYS]
        finally:
            with lock:
                running -= 1

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(range(JOBS), pool.map(handle, range(JOBS)), strict=True))
        # The pool's threads are reused: none of them kept a job's store.
        leftovers = list(pool.map(lambda _: _probe(), range(16)))

    cross_talk = sum(1 for job, values in results.items() for owner, *_ in values if owner != job)
    assert cross_talk == 0
    assert computed == {job: 3 for job in range(JOBS)}
    assert len({id(v) for values in results.values() for v in values}) == 3 * JOBS
    assert leftovers == [None] * 16
    assert peak > 1, "the pool never ran two jobs at once"


# -- bind_scope ------------------------------------------------------------------


async def test_bind_scope_carries_the_scope_where_the_context_does_not_go() -> None:
    loop = asyncio.get_running_loop()
    async with request_scope() as store:
        bound = bind_scope(_probe)
        assert await loop.run_in_executor(None, bound) is store
        with ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(bound).result(timeout=5) is store
        seen: list[MemoStore | None] = []
        thread = threading.Thread(target=lambda: seen.append(bound()))
        thread.start()
        thread.join(5)
        assert seen == [store]
        # A callback run in a context of its own (as a library's listener would be).
        done: asyncio.Future[MemoStore | None] = loop.create_future()
        loop.call_soon(lambda: done.set_result(bound()), context=contextvars.Context())
        assert await done is store
        # The same callback unbound, for contrast.
        unbound: asyncio.Future[MemoStore | None] = loop.create_future()
        loop.call_soon(lambda: unbound.set_result(_probe()), context=contextvars.Context())
        assert await unbound is None


async def test_bind_scope_on_an_async_function_runs_in_another_event_loop() -> None:
    async def probe_async() -> MemoStore | None:
        await asyncio.sleep(0)
        return _probe()

    async with request_scope() as store:
        bound = bind_scope(probe_async)
        seen: list[MemoStore | None] = []
        thread = threading.Thread(target=lambda: seen.append(asyncio.run(bound())))
        thread.start()
        thread.join(5)
        assert seen == [store]


def test_threads_sharing_a_scope_through_bind_scope_compute_once() -> None:
    calls = 0
    lock = threading.Lock()

    @request_memo
    def lookup(key: int) -> object:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.01)
        return object()

    with request_scope(), ThreadPoolExecutor(max_workers=4) as pool:
        values = list(pool.map(bind_scope(lookup), [7] * 8))
    assert calls == 1 and len({id(v) for v in values}) == 1


def test_bind_scope_called_after_the_scope_closed_runs_outside_any_scope() -> None:
    calls = 0

    @request_memo
    def lookup(key: int) -> int:
        nonlocal calls
        calls += 1
        return key

    def late() -> tuple[bool, object, int]:
        with pytest.raises(NoActiveScope):
            current_store()
        lookup(1)
        lookup(1)
        return in_request_scope(), perrequest.get("k", "default"), calls

    with request_scope():
        perrequest.set("k", "value")
        bound = bind_scope(late)
    assert bound() == (False, "default", 2)  # memo calls through, uncached
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(bound).result(timeout=5) == (False, "default", 4)


def test_bind_scope_outside_a_scope_raises() -> None:
    with pytest.raises(NoActiveScope, match="outside a request scope"):
        bind_scope(_probe)


# -- which tools copy the context ------------------------------------------------


async def _via_to_thread(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    return await asyncio.to_thread(fn)


async def _via_create_task(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    async def run() -> MemoStore | None:
        return fn()

    return await asyncio.create_task(run())


async def _via_anyio_to_thread(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    return await anyio.to_thread.run_sync(fn)


async def _via_sync_to_async(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    return await sync_to_async(fn)()


async def _via_run_in_threadpool(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    return await run_in_threadpool(fn)


async def _via_call_soon(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[MemoStore | None] = loop.create_future()
    loop.call_soon(lambda: done.set_result(fn()))
    return await done


async def _via_run_in_executor(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


async def _via_thread(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    seen: list[MemoStore | None] = []
    thread = threading.Thread(target=lambda: seen.append(fn()))
    thread.start()
    await asyncio.to_thread(thread.join, 5)
    return seen[0]


async def _via_executor_submit(fn: Callable[[], MemoStore | None]) -> MemoStore | None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        return await asyncio.wrap_future(pool.submit(fn))


Via = Callable[[Callable[[], MemoStore | None]], Awaitable[MemoStore | None]]


@pytest.mark.parametrize(
    "via",
    [
        _via_to_thread,
        _via_create_task,
        _via_anyio_to_thread,
        _via_sync_to_async,
        _via_run_in_threadpool,
        _via_call_soon,
    ],
)
async def test_tools_that_copy_the_context_see_the_store(via: Via) -> None:
    async with request_scope() as store:
        assert await via(_probe) is store


@pytest.mark.parametrize("via", [_via_run_in_executor, _via_thread, _via_executor_submit])
async def test_tools_that_do_not_copy_the_context_need_bind_scope(via: Via) -> None:
    async with request_scope() as store:
        assert await via(_probe) is None
        assert await via(bind_scope(_probe)) is store


# -- trio, through anyio -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_anyio_backends_cache_and_single_flight(backend: str) -> None:
    """Under asyncio and trio alike, memos cache; concurrent misses of one key compute
    once under asyncio, and each their own under trio (correct, not deduplicated:
    single-flight wakes its waiters through asyncio), where all get the first value
    stored (one value per key in a request)."""
    calls = 0
    closed: list[ScopeStats] = []

    @request_memo
    async def lookup(key: int) -> object:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.01)
        return object()

    async def main() -> tuple[bool, int, int]:
        async with request_scope(on_close=closed.append):
            first = await lookup(1)
            sequential_hit = await lookup(1) is first
            values: list[object] = []

            async def collect() -> None:
                values.append(await lookup(2))

            async with anyio.create_task_group() as group:
                for _ in range(3):
                    group.start_soon(collect)
            return sequential_hit, calls - 1, len({id(v) for v in values})

    sequential_hit, concurrent_calls, distinct = anyio.run(main, backend=backend)
    assert sequential_hit
    assert len(closed) == 1 and closed[0].entries == 2
    if backend == "asyncio":
        assert concurrent_calls == 1 and distinct == 1
        assert (closed[0].hits, closed[0].misses) == (3, 2)  # two waiters and one hit
    else:
        assert concurrent_calls == 3 and distinct == 1  # before the first kept: 3
        assert (closed[0].hits, closed[0].misses) == (1, 4)
    assert live_scopes() == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cancelling_the_computing_task_lets_a_waiter_finish_the_job(backend: str) -> None:
    calls = 0

    @request_memo
    async def slow(key: int) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:  # the owner's computation, cancelled before it ends
            await anyio.sleep(30)
        return f"v{key}"

    async def until(done: Callable[[], bool]) -> None:
        with anyio.fail_after(10):  # by events, not sleeps: a loaded machine is slow
            while not done():
                await anyio.sleep(0.001)

    async def main() -> tuple[list[str], int]:
        async with request_scope():
            results: list[str] = []
            owner_scope = anyio.CancelScope()

            async def owner() -> None:
                with owner_scope:
                    results.append("owner: " + await slow(1))

            async def waiter() -> None:
                results.append("waiter: " + await slow(1))

            async with anyio.create_task_group() as group:
                group.start_soon(owner)
                await until(lambda: calls == 1)  # the owner is computing
                group.start_soon(waiter)
                # The waiter waits for it (a hit, counted as it joins); under trio, where
                # tasks compute unshared, it has computed.
                await until(lambda: slow.cache_info().hits == 1 or calls == 2)
                owner_scope.cancel()
            return results, slow.cache_info().currsize

    results, cached = anyio.run(main, backend=backend)
    assert results == ["waiter: v1"] and cached == 1
    assert calls == 2  # the waiter restarted the cancelled computation
    assert live_scopes() == 0


def test_waiters_on_another_event_loop_get_the_result() -> None:
    """One scope shared by two threads, each running its own event loop: computed once."""
    calls = 0
    started = threading.Event()

    @request_memo
    async def slow(key: int) -> object:
        nonlocal calls
        calls += 1
        started.set()
        await asyncio.sleep(0.1)
        return object()

    with request_scope(), ThreadPoolExecutor(2) as pool:
        first = pool.submit(contextvars.copy_context().run, asyncio.run, slow(1))
        assert started.wait(5)
        second = pool.submit(contextvars.copy_context().run, asyncio.run, slow(1))
        assert first.result(5) is second.result(5)
    assert calls == 1 and live_scopes() == 0


def test_asyncio_run_inside_a_sync_job_sees_the_job_store() -> None:
    """A sync worker (a Celery task) that drives async code with asyncio.run keeps its scope."""

    async def probe_async() -> MemoStore | None:
        return await asyncio.to_thread(_probe)

    with request_scope() as store:
        assert asyncio.run(probe_async()) is store


def test_a_waiter_whose_event_loop_is_gone_fails_neither_the_computation_nor_others() -> None:
    started = threading.Event()

    @request_memo
    async def slow(key: int) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return f"v{key}"

    def abandoned_waiter() -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(slow(1))
        loop.run_until_complete(asyncio.sleep(0.05))  # now waiting on the computation
        assert not task.done()
        loop.close()  # the loop goes away with the waiter still parked in it

    def in_scope(fn: Callable[..., Any], *args: Any) -> Any:
        return pool.submit(contextvars.copy_context().run, fn, *args)

    with request_scope(), ThreadPoolExecutor(3) as pool:
        computing = in_scope(asyncio.run, slow(1))
        assert started.wait(5)
        in_scope(abandoned_waiter).result(5)
        live = in_scope(asyncio.run, slow(1))
        assert computing.result(5) == "v1" and live.result(5) == "v1"
    assert live_scopes() == 0


def test_trio_guest_mode_on_asyncio_memoizes_but_cannot_batch() -> None:
    """trio run as a guest of an asyncio loop (``trio.lowlevel.start_guest_run``): memos
    work as under trio (each first await computes), and ``request_batch`` is not
    supported, as docs/workers.md says: it takes the host's running asyncio loop for its
    own, and trio refuses the asyncio future (a probe, 7 December)."""
    import trio

    calls: list[int] = []

    @perrequest.request_memo
    async def double(k: int) -> int:
        calls.append(k)
        await trio.sleep(0.01)
        return 2 * k

    @perrequest.request_batch
    async def doubles(keys: list[int]) -> list[int]:
        return [2 * k for k in keys]

    async def guest() -> tuple[list[int], str]:
        async with perrequest.request_scope():
            got = [await double(1), await double(1)]
            try:
                await doubles.load(1)
            except TypeError as exc:
                return got, str(exc)
        return got, ""

    async def host() -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        trio.lowlevel.start_guest_run(
            guest,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done.set_result,
            host_uses_signal_set_wakeup_fd=True,
        )
        return (await asyncio.wait_for(done, 20)).unwrap()

    got, error = asyncio.run(host())
    assert got == [2, 2] and calls == [1]
    assert "unrecognized yield message" in error
    assert live_scopes() == 0
