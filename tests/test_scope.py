"""request_scope, the active-store helpers and bind_scope."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import perrequest
from perrequest import (
    DEFAULT_MAX_ENTRIES,
    MemoStore,
    NoActiveScope,
    PerRequestError,
    ScopeClosed,
    ScopeStats,
    bind_scope,
    current_store,
    in_request_scope,
    request_memo,
    request_scope,
)
from perrequest.testing import assert_no_live_scopes, live_scopes


def test_public_names() -> None:
    assert DEFAULT_MAX_ENTRIES == 10_000
    assert "set" not in perrequest.__all__ and "get" not in perrequest.__all__
    namespace: dict[str, object] = {}
    exec("from perrequest import *", namespace)
    assert "set" not in namespace and "request_memo" in namespace
    assert issubclass(NoActiveScope, PerRequestError) and issubclass(NoActiveScope, LookupError)
    assert issubclass(ScopeClosed, PerRequestError) and issubclass(ScopeClosed, RuntimeError)
    assert issubclass(perrequest.UnhashableArguments, TypeError)


def test_with_block_binds_a_fresh_store_and_closes_it() -> None:
    assert not in_request_scope()
    with request_scope() as store:
        assert isinstance(store, MemoStore)
        assert current_store() is store
        assert in_request_scope() and live_scopes() == 1
        assert store.max_entries == DEFAULT_MAX_ENTRIES
        store["a"] = 1
    assert store.closed and len(store) == 0
    assert not in_request_scope() and live_scopes() == 0


def test_outside_any_scope() -> None:
    with pytest.raises(NoActiveScope, match="request_scope"):
        current_store()
    with pytest.raises(NoActiveScope):
        perrequest.set("k", 1)
    with pytest.raises(NoActiveScope):
        perrequest.get_or_set("k", lambda: 1)
    assert perrequest.get("k") is None
    assert perrequest.get("k", "fallback") == "fallback"


def test_helpers_use_the_active_store() -> None:
    with request_scope() as store:
        perrequest.set("user", "ada")
        assert perrequest.get("user") == "ada" and store["user"] == "ada"
        calls = []
        assert perrequest.get_or_set("n", lambda: calls.append(1) or 42) == 42
        assert perrequest.get_or_set("n", lambda: calls.append(1) or 0) == 42
        assert calls == [1]
        assert store.stats.hits == 1 and store.stats.misses == 1


def test_nesting_restores_the_outer_store() -> None:
    with request_scope() as outer:
        perrequest.set("k", "outer")
        with request_scope() as inner:
            assert current_store() is inner
            assert perrequest.get("k") is None
            perrequest.set("k", "inner")
        assert current_store() is outer and inner.closed
        assert perrequest.get("k") == "outer"
    assert not in_request_scope()


def test_exceptions_close_the_scope_and_propagate() -> None:
    closed: list[ScopeStats] = []
    with pytest.raises(KeyError, match="boom"), request_scope(on_close=closed.append) as store:
        store["x"] = 1
        raise KeyError("boom")
    assert store.closed and len(closed) == 1 and not in_request_scope()


def test_on_close_gets_stats_once_after_restore() -> None:
    seen: list[tuple[ScopeStats, bool, int]] = []

    def on_close(stats: ScopeStats) -> None:
        seen.append((stats, in_request_scope(), len(store)))

    @request_memo
    def double(x: int) -> int:
        return 2 * x

    with request_scope(on_close=on_close, max_entries=2) as store:
        double(1)
        double(1)
        double(2)
        double(3)
    assert len(seen) == 1
    stats, active, size = seen[0]
    assert not active and size == 0  # store cleared and previous (none) restored
    assert (stats.hits, stats.misses, stats.entries, stats.peak_entries, stats.evictions) == (
        1,
        3,
        2,
        2,
        1,
    )
    assert stats.duration_s >= 0


def test_on_close_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(stats: ScopeStats) -> None:
        raise RuntimeError("reporting is down")

    with caplog.at_level(logging.ERROR, logger="perrequest"), request_scope(on_close=broken):
        result = "done"
    assert result == "done"
    records = [r for r in caplog.records if r.name == "perrequest"]
    assert records and records[0].levelno == logging.ERROR and records[0].exc_info
    # The block's own exception is never replaced by on_close's.
    with pytest.raises(ValueError, match="mine"), request_scope(on_close=broken):
        raise ValueError("mine")


def test_closed_scope_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="perrequest"), request_scope():
        perrequest.set("a", 1)
    assert any("request scope closed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_entries": 0}, ValueError),
        ({"max_entries": -5}, ValueError),
        ({"max_entries": 1.5}, TypeError),
        ({"max_entries": "10"}, TypeError),
        ({"max_entries": True}, TypeError),
        ({"on_close": "print"}, TypeError),
        ({"max_size": 10}, TypeError),
    ],
)
def test_bad_options_fail_at_creation(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        request_scope(**options)  # type: ignore[arg-type]


def test_unbounded_only_when_asked() -> None:
    with request_scope(max_entries=None) as store:
        for i in range(DEFAULT_MAX_ENTRIES + 10):
            store[i] = i
        assert len(store) == DEFAULT_MAX_ENTRIES + 10 and store.max_entries is None


def test_one_object_can_be_entered_again_nested_and_from_threads() -> None:
    scope = request_scope(max_entries=5)
    with scope as outer:
        perrequest.set("k", "outer")
        with scope as inner:  # like decimal.localcontext(): a new scope each time
            assert inner is not outer and current_store() is inner
            assert perrequest.get("k") is None
        assert current_store() is outer and perrequest.get("k") == "outer"
    assert inner.closed and outer.closed and live_scopes() == 0

    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for i in range(300):
                with scope as store:
                    perrequest.set("n", (n, i))
                    time.sleep(0)
                    assert current_store() is store and perrequest.get("n") == (n, i)
                assert not in_request_scope()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and live_scopes() == 0


def test_exiting_more_often_than_entered_is_an_error() -> None:
    scope = request_scope()
    with pytest.raises(RuntimeError, match="exited more often than it was entered"):
        scope.__exit__(None, None, None)


def test_decorator_opens_a_fresh_scope_per_call() -> None:
    stores: list[MemoStore] = []

    @request_scope(max_entries=5)
    def job(n: int) -> int:
        store = current_store()
        stores.append(store)
        assert store.max_entries == 5
        return n + 1

    assert job(1) == 2 and job(2) == 3
    assert stores[0] is not stores[1] and all(s.closed for s in stores)
    assert job.__name__ == "job"


async def test_async_with_and_async_decorator() -> None:
    async with request_scope() as store:
        perrequest.set("k", 1)
        await asyncio.sleep(0)
        assert current_store() is store
    assert store.closed and not in_request_scope()

    @request_scope()
    async def job() -> MemoStore:
        await asyncio.sleep(0)
        return current_store()

    first, second = await asyncio.gather(job(), job())
    assert first is not second and first.closed and second.closed


async def test_cancellation_closes_the_scope() -> None:
    started = asyncio.Event()
    stores: list[MemoStore] = []

    @request_scope()
    async def job() -> None:
        stores.append(current_store())
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(job())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stores[0].closed and live_scopes() == 0


def test_decorating_generators_is_refused() -> None:
    def gen() -> object:
        yield 1

    async def agen() -> object:
        yield 1

    for fn in (gen, agen):
        with pytest.raises(TypeError, match="generator"):
            request_scope()(fn)  # type: ignore[arg-type]


async def test_tasks_created_inside_share_the_store() -> None:
    async with request_scope() as store:

        async def child() -> MemoStore:
            await asyncio.sleep(0)
            return current_store()

        assert await asyncio.create_task(child()) is store
        assert await asyncio.to_thread(current_store) is store


def test_closed_scope_is_outside_any_scope_for_leftover_contexts() -> None:
    with request_scope() as store:
        leftover = contextvars.copy_context()
    assert leftover.run(in_request_scope) is False
    with pytest.raises(NoActiveScope):
        leftover.run(current_store)
    assert leftover.run(perrequest.get, "k", "d") == "d"
    with pytest.raises(NoActiveScope):
        leftover.run(perrequest.set, "k", 1)
    with pytest.raises(ScopeClosed, match="ended"):
        store["k"] = 1


def test_bind_scope_carries_the_store_into_threads() -> None:
    with request_scope() as store:
        bound = bind_scope(current_store)
        results: list[object] = []
        thread = threading.Thread(target=lambda: results.append(bound()))
        thread.start()
        thread.join()
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(bound).result() is store
            # Without bind_scope, a plain submit does not copy the context.
            assert pool.submit(in_request_scope).result() is False
            # The pool thread is not left inside the scope afterwards.
            assert pool.submit(in_request_scope).result() is False
        assert results == [store]
    assert bound.__name__ == "current_store"
    with pytest.raises(NoActiveScope):
        bound()  # called late: outside any scope


async def test_bind_scope_on_async_functions_and_executors() -> None:
    async with request_scope() as store:

        async def read() -> MemoStore:
            return current_store()

        bound = bind_scope(read)
        assert asyncio.iscoroutinefunction(bound)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, bind_scope(current_store)) is store
        other_context = contextvars.Context()
        assert await other_context.run(asyncio.ensure_future, bound()) is store


def test_bind_scope_outside_a_scope_raises() -> None:
    with pytest.raises(NoActiveScope, match="bind_scope"):
        bind_scope(print)
    with request_scope(), pytest.raises(TypeError):
        bind_scope(42)  # type: ignore[arg-type]


def test_memo_scope_fixture(memo_scope: MemoStore) -> None:
    assert current_store() is memo_scope
    perrequest.set("k", 1)
    assert memo_scope["k"] == 1


def test_assert_no_live_scopes_fails_when_one_is_open() -> None:
    scope = request_scope()
    store = scope.__enter__()
    try:
        with pytest.raises(AssertionError, match="1 perrequest scope"):
            assert_no_live_scopes()
    finally:
        scope.__exit__(None, None, None)
    assert store.closed
    assert_no_live_scopes()


def test_scoped_body_closes_at_garbage_collection() -> None:
    from perrequest.scope import ScopedBody, leave_scope, open_scope

    store = open_scope()
    leave_scope(store)
    body = ScopedBody(iter([b"a"]), store)
    assert live_scopes() == 1 and not in_request_scope()
    del body
    gc.collect()
    assert live_scopes() == 0 and store.closed
