"""Each defect found in the core before its rewrite (issue 11), as a test that failed then.

Defect 2 (a stream's cleanup in another request's scope) has its own file,
tests/test_stream_cleanup.py, with real servers.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cachetools
import httpx
import pytest
import regression_apps
from flask import Flask, Response
from servers import serve_gunicorn, serve_uvicorn

import perrequest
from perrequest import (
    PerRequestError,
    UnhashableArguments,
    bind_scope,
    request_memo,
    request_scope,
)
from perrequest.flask import PerRequest
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware

# -- 1. closing a scope never strands a waiter --------------------------------------


def _wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_closing_a_scope_while_a_thread_waits_for_another_releases_both() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @request_memo
    def slow(key: int) -> int:
        calls.append(key)
        started.set()
        release.wait(5)
        return key * 10

    pool = ThreadPoolExecutor(2)
    try:
        with request_scope() as store:
            computing = pool.submit(bind_scope(slow), 1)
            assert started.wait(5)
            waiting = pool.submit(bind_scope(slow), 1)
            _wait_until(lambda: store.stats.hits == 1)  # the second thread waits
        assert store.closed  # the request ended while both are in flight
        release.set()
        assert computing.result(5) == 10 and waiting.result(5) == 10
        assert calls == [1]
    finally:
        release.set()
        pool.shutdown(wait=False)


def test_closing_a_scope_while_threads_wait_in_get_or_set_releases_them() -> None:
    started, release = threading.Event(), threading.Event()

    def factory() -> str:
        started.set()
        release.wait(5)
        return "value"

    pool = ThreadPoolExecutor(4)
    try:
        with request_scope() as store:
            get = bind_scope(lambda: perrequest.get_or_set("k", factory))
            futures = [pool.submit(get)]
            assert started.wait(5)
            futures += [pool.submit(get) for _ in range(3)]
            _wait_until(lambda: store.stats.hits == 3)
        release.set()
        assert [f.result(5) for f in futures] == ["value"] * 4
    finally:
        release.set()
        pool.shutdown(wait=False)


async def test_closing_a_scope_while_a_task_waits_for_another_releases_both() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    @request_memo
    async def slow(key: int) -> int:
        started.set()
        await release.wait()
        return key

    async with request_scope() as store:
        first = asyncio.create_task(slow(1))
        await started.wait()
        second = asyncio.create_task(slow(1))
        await asyncio.sleep(0)
    assert store.closed
    release.set()
    assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [1, 1]


def _no_thread_stuck(base: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as client:
        for n in range(8):
            assert client.get(f"/hand-off/k{n}").status_code == 200
        deadline = time.monotonic() + 10
        counts = client.get("/stuck").json()
        while counts["finished"] < 16 and time.monotonic() < deadline:
            time.sleep(0.1)
            counts = client.get("/stuck").json()
    assert counts == {"inside": 0, "finished": 16}


def test_no_pool_thread_stays_blocked_under_gunicorn_gthread_and_flask() -> None:
    with serve_gunicorn("regression_apps:flask_app", worker_class="gthread", threads=8) as base:
        _no_thread_stuck(base)


def test_no_default_executor_thread_stays_blocked_under_uvicorn() -> None:
    with serve_uvicorn(regression_apps.starlette_app) as base:
        _no_thread_stuck(base)


# -- 3. the shared tier never hands another request the original exception ------------


class StatusError(Exception):
    """Like httpx.HTTPStatusError: an extra __init__ parameter, so args cannot rebuild it."""

    def __init__(self, message: str, *, response: object) -> None:
        super().__init__(message)
        self.response = response


class PlainError(Exception):
    pass


@pytest.mark.parametrize("error", [StatusError, PlainError])
def test_a_waiter_in_another_request_gets_a_detached_error(error: type[Exception]) -> None:
    started, release = threading.Event(), threading.Event()
    secret = object()

    @request_memo(shared=cachetools.LRUCache(100))
    def fetch(key: str) -> str:
        request_local = secret  # noqa: F841 - a local of the computing request's frame
        started.set()
        release.wait(5)
        if error is StatusError:
            raise StatusError("502 from upstream", response=secret)
        raise PlainError("upstream down")

    raised: dict[str, BaseException] = {}

    @request_scope()
    def request(name: str) -> None:
        try:
            fetch("k")
        except Exception as exc:
            raised[name] = exc

    computing = threading.Thread(target=request, args=("computing",))
    computing.start()
    assert started.wait(5)
    waiting = threading.Thread(target=request, args=("waiting",))
    waiting.start()
    _wait_until(lambda: fetch.shared_info().hits == 1)  # type: ignore[attr-defined]
    release.set()
    computing.join(5)
    waiting.join(5)
    original, copy = raised["computing"], raised["waiting"]
    assert copy is not original
    assert type(copy) in (error, perrequest.SharedComputationError)
    assert error.__name__ in f"{type(copy).__name__} {copy}"
    assert copy.__cause__ is None and copy.__context__ is None
    frames = [frame for frame, _ in traceback.walk_tb(copy.__traceback__)]
    assert frames and all("request_local" not in f.f_locals for f in frames)
    assert all(secret not in f.f_locals.values() for f in frames)  # none of its frames
    if isinstance(copy, perrequest.SharedComputationError):
        assert isinstance(copy, PerRequestError) and "502 from upstream" in str(copy)
    else:
        assert str(copy) == "upstream down"


# -- 4. a long scope stays within its bound, bookkeeping included --------------------


def test_a_helper_defined_per_message_keeps_nothing_beyond_the_bound() -> None:
    """A websocket or a long job: one scope, a memoized helper defined per message."""
    refs: list[weakref.ref[Any]] = []

    def handle(message: int) -> int:
        blob = bytearray(10_000)  # what the helper's closure keeps

        @request_memo
        def helper(x: int) -> int:
            return len(blob) + x

        refs.append(weakref.ref(helper))
        return helper(message)

    with request_scope(max_entries=100) as store:
        for message in range(5_000):
            assert handle(message) == 10_000 + message
        assert len(store) == 100
        assert store._subs is not None and len(store._subs) <= 101  # one per entry at most
        assert len(store._counters) == 1  # counted by name: the same helper each time
        gc.collect()
        assert sum(ref() is not None for ref in refs) <= 100
    assert store._subs is None and not store._counters and not store._flights
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0  # a closed store holds no function


@pytest.mark.parametrize(
    "options",
    [{}, {"key": lambda x: x}, {"typed": True}, {"star": True}, {"max_entries": 5}],
    ids=["generated", "key", "typed", "star-args", "bounded"],
)
def test_what_a_helper_defined_per_message_holds_is_freed_when_its_scope_closes(
    options: dict[str, Any],
) -> None:
    """Not only the wrapper: the decorated function and whatever its closure holds (the
    message's data) go when the scope closes, without waiting for a collection, whichever
    wrapper the memo gets (the closure one for key=, typed=True, *args)."""

    class Payload:
        pass

    refs: list[weakref.ref[Any]] = []

    def handle(message: int) -> int:
        payload = Payload()
        if options.get("star"):

            def helper(*xs: int) -> tuple[int, Payload]:
                return xs[0] + 1, payload
        else:

            def helper(x: int) -> tuple[int, Payload]:  # type: ignore[misc]
                return x + 1, payload

        refs.extend([weakref.ref(helper), weakref.ref(payload)])
        memo = request_memo(**{k: v for k, v in options.items() if k != "star"})(helper)
        return memo(message)[0]

    gc.disable()
    try:
        for message in range(3):
            with request_scope():
                assert handle(message) == message + 1
            assert [ref() for ref in refs] == [None] * len(refs)
    finally:
        gc.enable()


def test_an_error_handed_to_waiters_is_freed_without_the_garbage_collector() -> None:
    """A computation that raises while threads and tasks wait for it: once every caller
    has handled the error, it and what it refers to (the request's data) are freed at
    once. A waiter's frame used to hold the record whose future holds the error, whose
    traceback holds that frame: a cycle, kept until a collection."""

    class Payload:
        pass

    refs: list[weakref.ref[Any]] = []

    @request_memo
    def load(x: int) -> int:
        payload = Payload()
        refs.append(weakref.ref(payload))
        _wait_until(lambda: load.cache_info().hits == 2)  # both waiters wait
        raise ValueError(payload)

    @request_memo
    async def load_async(x: int) -> int:
        payload = Payload()
        refs.append(weakref.ref(payload))
        await asyncio.sleep(0.05)
        raise ValueError(payload)

    def call() -> str:
        try:
            load(1)
        except ValueError:
            return "error"
        return "value"

    async def call_async() -> str:
        try:
            await load_async(1)
        except ValueError:
            return "error"
        return "value"

    async def gather() -> list[str]:
        return list(await asyncio.gather(call_async(), call_async(), call_async()))

    gc.disable()
    try:
        with request_scope(), ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(bind_scope(call)) for _ in range(3)]
            assert [f.result(timeout=10) for f in futures] == ["error"] * 3
            del futures
        with request_scope():
            assert asyncio.run(gather()) == ["error"] * 3
        assert len(refs) == 2 and [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()


def test_an_async_shared_memos_error_is_freed_without_the_garbage_collector() -> None:
    """An async shared memo that raises: the tier's frame that raised the error held it,
    and the error's traceback held that frame, so the error, the computing request's
    frames and what they refer to waited for a collection."""

    class Payload:
        pass

    refs: list[weakref.ref[Any]] = []

    @request_memo(shared=cachetools.LRUCache(maxsize=10))
    async def load(x: int) -> int:
        payload = Payload()
        refs.append(weakref.ref(payload))
        await asyncio.sleep(0)
        raise ValueError(payload)

    async def call() -> str:
        try:
            await load(1)
        except ValueError:
            return "error"
        return "value"

    gc.disable()
    try:
        with request_scope():
            assert asyncio.run(call()) == "error"
        assert len(refs) == 1 and refs[0]() is None
    finally:
        gc.enable()


def test_a_helper_defined_per_message_compiles_its_wrapper_once() -> None:
    """Decorating generates the wrapper's source and compiles it: a quarter of a
    millisecond, a thousand times a lru_cache decoration, paid again by every message
    that defines its helper. The same source is compiled once (a bounded cache)."""

    def handle(message: int) -> Any:
        @request_memo
        def helper(x: int, y: int = 2) -> int:
            return x + y + message

        return helper

    first, second = handle(1), handle(2)
    # compiled once: equal code; each a copy of its own, specialised for its own globals
    assert first.__code__ == second.__code__ and first.__code__ is not second.__code__
    with request_scope():
        assert (first(1), second(1)) == (4, 5)


def test_a_helper_defined_per_call_is_freed_without_the_garbage_collector() -> None:
    """The wrapper and its bookkeeping used to refer to each other: every dropped helper
    waited for a collection (and a RedisCache name check ran gc.collect() for it)."""
    refs: list[weakref.ref[Any]] = []

    def handle(message: int, options: dict[str, Any]) -> int:
        @request_memo(**options)
        def helper(x: int) -> int:
            return x + 1

        refs.append(weakref.ref(helper))
        return helper(message)

    async def handle_async(message: int) -> int:
        @request_memo
        async def helper(x: int) -> int:
            return x + 1

        refs.append(weakref.ref(helper))
        return await helper(message)

    variants: list[dict[str, Any]] = [
        {},
        {"shared": cachetools.LRUCache(10)},
        {"key": lambda x: x},
        {"typed": True},
        {"max_entries": 5},
    ]
    gc.disable()
    try:
        with request_scope(max_entries=100):
            for message in range(20):
                for options in variants:
                    assert handle(message, options) == message + 1
                    assert refs[-1]() is None  # gone as handle() returned, scope still open
                assert asyncio.run(handle_async(message)) == message + 1
                assert refs[-1]() is None
    finally:
        gc.enable()


def test_function_names_beyond_the_bound_share_one_counter() -> None:
    with request_scope(max_entries=10) as store:
        for n in range(50):

            def fn(x: int) -> int:
                return x

            fn.__qualname__ = f"fn{n}"
            request_memo(fn)(1)
        assert len(store._counters) <= 11
        assert sum(s.misses for s in store.stats.functions.values()) == 50


# -- 6 to 9, 11: clear errors -----------------------------------------------------------


def test_unhashable_arguments_after_another_memo_ran_in_the_request() -> None:
    @request_memo
    def first(x: int) -> int:
        return x

    @request_memo
    def second(items: list[int]) -> int:
        return len(items)

    with request_scope():
        first(1)
        second.__wrapped__([1])
        with pytest.raises(UnhashableArguments, match="'items'"):
            second([1])
        with pytest.raises(UnhashableArguments, match="'items'"):
            second([1])  # and again, once the function has entries of its own


def _gen() -> Iterator[int]:
    yield 1


async def _agen() -> Any:
    yield 1


def test_bind_scope_refuses_generators_and_async_generators() -> None:
    with request_scope():
        with pytest.raises(TypeError, match="a generator function"):
            bind_scope(_gen)
        with pytest.raises(TypeError, match="an async generator function"):
            bind_scope(_agen)


def test_typed_with_key_is_refused_at_decoration() -> None:
    with pytest.raises(TypeError, match="typed=True"):
        request_memo(typed=True, key=lambda x: x)


def test_a_shared_cache_too_large_to_bound_anything_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        request_memo(shared=cachetools.LRUCache(10**400))


def test_a_shared_cache_whose_maxsize_fails_is_refused_naming_it() -> None:
    """A probe (7 December): the property's own RuntimeError came through bare."""

    class Broken(cachetools.LRUCache):  # type: ignore[type-arg]
        @property
        def maxsize(self) -> int:  # type: ignore[override]
            raise RuntimeError("not configured")

    with pytest.raises(TypeError, match=r"reading Broken\.maxsize raised RuntimeError"):
        request_memo(shared=Broken(10))


def test_testing_helpers_import_without_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from perrequest.testing import *\n"
        "assert_no_live_scopes(); print(live_scopes())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


# -- 10. a WSGI body the server never closes ---------------------------------------------


def _environ() -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SERVER_NAME": "x", "SERVER_PORT": "80"}


def test_a_cyclic_body_never_closed_ends_only_its_scope_when_collected() -> None:
    hooks: list[str] = []

    class CyclicBody:
        def __init__(self) -> None:
            self.me = self

        def __iter__(self) -> Iterator[bytes]:
            return iter([b"x"])

        def close(self) -> None:
            hooks.append("close")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return CyclicBody()

    body: Any = RequestScopeMiddleware(app)(_environ(), lambda *a: None)
    assert list(body) == [b"x"] and live_scopes() == 1
    del body  # the server never calls close()
    gc.collect()
    assert live_scopes() == 0 and hooks == []  # the scope only, not the app's close


def test_flask_call_on_close_does_not_run_on_the_collection_path() -> None:
    hooks: list[str] = []
    app = Flask("never-closed")
    PerRequest(app)

    @app.get("/")
    def index() -> Response:
        response = Response(iter([b"a", b"b"]))
        response.call_on_close(lambda: hooks.append("call_on_close"))
        return response

    body: Any = app.wsgi_app(
        {**_environ(), "wsgi.url_scheme": "http", "wsgi.input": None}, lambda *a: None
    )
    assert b"".join(body) == b"ab"
    del body
    gc.collect()
    assert live_scopes() == 0 and hooks == []


def test_a_body_without_a_cycle_ends_its_scope_without_the_collector() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        yield b"x"

    gc.disable()
    try:
        body: Any = RequestScopeMiddleware(app)(_environ(), lambda *a: None)
        chunks = iter(body)
        assert next(chunks) == b"x"
        del body, chunks
        assert live_scopes() == 0
    finally:
        gc.enable()


def _shared(tier: str | None, request: pytest.FixtureRequest, is_async: bool) -> dict[str, Any]:
    """``request_memo``'s options for no shared tier, the in-process one, or Redis."""
    if tier is None:
        return {}
    if tier == "cachetools":
        return {"shared": cachetools.LRUCache(10)}
    from perrequest.redis import RedisCache

    server = request.getfixturevalue("redis_server")
    client = server.aclient() if is_async else server.client()
    return {"shared": RedisCache(client, ttl=60, namespace=f"cycles-{is_async}")}


@pytest.mark.parametrize("tier", [None, "cachetools", "redis"])
def test_an_async_memos_error_in_a_task_frees_the_request_without_the_collector(
    tier: str | None, request: pytest.FixtureRequest
) -> None:
    """A memoized coroutine that raises in a task that ends with its error: the frames that
    held the current task (the wrapper's, single-flight's, the Redis tier's fetch) formed
    a cycle through the task's exception, so the request's data lived until a
    collection. (On 3.12+ a frame keeps its caller's too: the shared tier's did.)"""

    class Payload:
        pass

    refs: list[weakref.ref[Any]] = []

    async def boom(x: int) -> int:
        payload = Payload()
        refs.append(weakref.ref(payload))
        await asyncio.sleep(0)
        raise ValueError("boom")

    async def main() -> None:
        memo = request_memo(**_shared(tier, request, is_async=True))(boom)
        with pytest.raises(ValueError):
            await asyncio.create_task(memo(1))
        with pytest.raises(ValueError):
            await asyncio.gather(memo(2), memo(2))

    gc.collect()
    gc.disable()
    try:
        with request_scope():
            asyncio.run(main())
        assert refs and [ref() for ref in refs] == [None] * len(refs)
    finally:
        gc.enable()


@pytest.mark.parametrize("tier", ["cachetools", "redis"])
def test_a_sync_shared_memos_error_frees_the_request_without_the_collector(
    tier: str, request: pytest.FixtureRequest
) -> None:
    """Single-flight's frame held the shared tier's error (as a value) that the error's own
    traceback held it by; the Redis tier's copy of it did the same: a cycle, until a
    collection."""

    class Payload:
        pass

    refs: list[weakref.ref[Any]] = []

    @request_memo(**_shared(tier, request, is_async=False))
    def boom(x: int) -> int:
        payload = Payload()
        refs.append(weakref.ref(payload))
        raise ValueError("boom")

    gc.collect()
    gc.disable()
    try:
        with request_scope(), pytest.raises(ValueError):
            boom(1)
        assert refs and [ref() for ref in refs] == [None] * len(refs)
    finally:
        gc.enable()


@pytest.mark.parametrize("kind", ["sync", "asyncio", "trio"])
def test_a_batch_keys_failure_frees_the_request_without_the_collector(kind: str) -> None:
    """A key the batch function fails (an ``Exception`` in its results) was raised from
    frames that held it (the loader's, the list of values): a cycle through the error's
    traceback kept it, and what it refers to, until a collection."""
    import anyio

    from perrequest import request_batch

    class Payload:
        pass

    class Failed(Exception):
        def __init__(self, payload: Payload) -> None:
            super().__init__("failed")
            self.payload = payload

    refs: list[weakref.ref[Any]] = []

    def values(keys: list[int]) -> list[Any]:
        out: list[Any] = []
        for key in keys:
            payload = Payload()
            refs.append(weakref.ref(payload))
            out.append(Failed(payload) if key % 2 else key)
        return out

    async def async_values(keys: list[int]) -> list[Any]:
        return values(keys)

    loader: Any = request_batch(values if kind == "sync" else async_values)

    async def main() -> None:
        for load in (lambda: loader.load(1), lambda: loader.load_many([2, 3])):
            with pytest.raises(Failed):
                await load()

    gc.collect()
    gc.disable()
    try:
        with request_scope():
            if kind == "sync":
                for load in (lambda: loader.load(1), lambda: loader.load_many([2, 3])):
                    with pytest.raises(Failed):
                        load()
            else:
                anyio.run(main, backend=kind)
        assert len(refs) == 3 and [ref() for ref in refs] == [None] * 3
    finally:
        gc.enable()


@pytest.mark.slow  # 5,000 requests under tracemalloc
def test_a_memo_named_anew_per_request_does_not_grow_the_process() -> None:
    """Each wrapper was compiled under a file name of its function's name, and CPython
    keeps what it makes for each new file name: a factory naming its closures
    ``f"scaled_by_{n}"`` (as docs/redis.md suggests) grew the process by 88 bytes a request
    (an audit of 5 December 2026)."""
    import tracemalloc

    def request(n: int) -> None:
        def scaled(x: int) -> int:
            return x * n

        scaled.__qualname__ = f"scaled_by_{n}"
        memo = request_memo(scaled)
        with request_scope(max_entries=10):
            assert memo(1) == memo(1) == n

    for n in range(300):  # warm up
        request(n)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(300, 5300):
            request(n)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 150_000, grown  # was about 440,000


def test_memos_of_one_name_and_signature_each_have_their_own_code() -> None:
    """Compiled under one file name, memos named alike shared one code object, whose
    specialised instructions each one's globals undid: a hit 10% slower for 20 such
    memos called in turn (a review of 5 December 2026)."""

    class A:
        @staticmethod
        @request_memo
        def get(x: int) -> int:
            return x

    class B:
        @staticmethod
        @request_memo
        def get(x: int) -> int:
            return x + 1

    assert A.get.__code__ is not B.get.__code__
    with request_scope():
        assert (A.get(1), B.get(1)) == (1, 2)


def test_a_loop_closed_under_a_waiting_task_leaves_nothing_in_the_process() -> None:
    """Jobs that open a scope and an event loop, start a memoized call twice (one task
    computes, one waits) and close the loop under both (run_until_complete, then close).
    Before: a process-wide record of who waits for whom kept an entry per job, and with
    it the tasks, the closed store and the job's arguments (23 KB a job, for ever)."""
    import logging

    from perrequest import _waits

    class Payload:
        pass

    @request_memo(key=id)
    async def fetch(payload: Payload) -> int:
        await asyncio.sleep(10)
        return 1

    alive: list[weakref.ref[Payload]] = []

    def job() -> None:
        with request_scope():
            payload = Payload()
            alive.append(weakref.ref(payload))

            async def main() -> None:
                left = [asyncio.ensure_future(fetch(payload)) for _ in range(2)]  # one waits
                await asyncio.sleep(0.001)
                del left  # pending as the loop closes

            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(main())
            finally:
                loop.close()

    logging.getLogger("asyncio").disabled = True  # "Task was destroyed but it is pending"
    try:
        for _ in range(20):
            job()
        gc.collect()
    finally:
        logging.getLogger("asyncio").disabled = False
    assert sum(ref() is not None for ref in alive) == 0  # before: 20
    assert len(_waits._task_waits) == 0
