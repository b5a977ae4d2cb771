"""Code a garbage collection runs never sees the store of the request it interrupted.

Unit tests of the gc.callbacks hook; tests/test_stream_cleanup.py has the real servers.

DESIGN.md, Lifetime: "Code of one request that runs after its response (a
streaming body's cleanup after a client disconnect, run later by the garbage
collector or an async-generator finalizer; a late callback) never reads or
writes another request's store." Known traps: the abandoned body is in a
reference cycle (anyio's task-group ``task_done`` keeps the CancelledError whose
traceback holds the response), so its ``finally`` runs inside a collection.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import perrequest
from perrequest import _active
from perrequest.scope import _current


class _Cycle:
    """Garbage in a reference cycle whose finalizer reports what it sees."""

    def __init__(self, seen: list[object]) -> None:
        self.me = self
        self.seen = seen

    def __del__(self) -> None:
        self.seen.append(perrequest.get("rid", "no store"))


def test_the_hook_is_installed_at_import() -> None:
    assert gc.callbacks.count(_active._hide_during_collections) == 1


def test_a_finalizer_run_by_a_collection_sees_no_store_and_the_store_comes_back() -> None:
    seen: list[object] = []
    with perrequest.request_scope() as store:
        perrequest.set("rid", "B")
        _Cycle(seen)
        gc.collect()
        assert perrequest.current_store() is store
        assert perrequest.get("rid") == "B"
    assert seen == ["no store"]
    assert _active._hidden is None


def test_a_token_made_before_a_collection_resets_after_it() -> None:
    with perrequest.request_scope() as store:
        token = _current.set(None)
        _current.reset(token)
        token = _current.set(store)
        gc.collect()
        _current.reset(token)
        assert perrequest.current_store() is store


def test_an_abandoned_sync_generator_closed_by_the_collector_sees_no_store() -> None:
    seen: list[object] = []

    def body(rid: str) -> Iterator[bytes]:
        try:
            while True:
                yield b"x"
        finally:
            seen.append((rid, perrequest.get("rid", "no store")))

    with perrequest.request_scope():
        perrequest.set("rid", "A")
        gen = body("A")
        next(gen)
        holder: list[object] = [gen]
        holder.append(holder)  # a cycle, as anyio's task_done makes
        del gen, holder
    with perrequest.request_scope():
        perrequest.set("rid", "B")
        gc.collect()  # "another request" triggers the collection
    assert seen == [("A", "no store")]


def test_an_abandoned_async_generator_is_closed_outside_any_scope() -> None:
    """The loop's finalizer hook fires inside the collection and schedules aclose()
    in a copy of the current context: the store is hidden in that copy too."""
    seen: list[object] = []

    async def body(rid: str) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x"
        finally:
            seen.append((rid, perrequest.get("rid", "no store")))

    async def main() -> None:
        with perrequest.request_scope():
            perrequest.set("rid", "A")
            agen = body("A")
            await agen.__anext__()
            holder: list[object] = [agen]
            holder.append(holder)
            del agen, holder
        with perrequest.request_scope():
            perrequest.set("rid", "B")
            gc.collect()
            for _ in range(5):
                await asyncio.sleep(0)  # the aclose() task runs, still inside B
            assert perrequest.get("rid") == "B"

    asyncio.run(main())
    assert seen == [("A", "no store")]


def test_a_finalizer_may_open_its_own_scope() -> None:
    seen: list[object] = []

    class Opens:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            with perrequest.request_scope():
                perrequest.set("rid", "own")
                seen.append(perrequest.get("rid"))
            seen.append(perrequest.get("rid", "no store"))

    with perrequest.request_scope():
        perrequest.set("rid", "B")
        Opens()
        gc.collect()
        assert perrequest.get("rid") == "B"
    assert seen == ["own", "no store"]


def test_without_the_hook_the_finalizer_sees_the_store() -> None:
    gc.callbacks.remove(_active._hide_during_collections)
    try:
        seen: list[object] = []
        with perrequest.request_scope():
            perrequest.set("rid", "B")
            _Cycle(seen)
            gc.collect()
        assert seen == ["B"]  # what happens without the hook: another request's store
    finally:
        gc.callbacks.append(_active._hide_during_collections)
    assert gc.callbacks.count(_active._hide_during_collections) == 1


def test_no_store_outside_a_scope_leaves_the_context_untouched() -> None:
    before = contextvars.copy_context()
    gc.collect()
    assert _current not in before or before[_current] is None
    assert _current.get() is None
    assert _active._hidden is None


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.11 collects inside allocations")
def test_collections_inside_contextvars_operations_keep_the_mapping_alive() -> None:
    """Tiny threshold: collections start inside ContextVar.set/reset/copy_context of
    threads that have a store, with finalizers that allocate (so the next collection
    starts inside the same operation). Without the keep-alive copies this corrupts the
    context or crashes (see stress_gc_hook.py --no-keepalive)."""
    variables = [contextvars.ContextVar(f"v{i}") for i in range(40)]
    errors: list[str] = []
    stop = threading.Event()

    class Garbage:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            if _current.get() is not None:
                errors.append("a finalizer saw a store")
            junk = [[i] for i in range(40)]
            del junk

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        mine: dict[contextvars.ContextVar[object], object] = {}
        while not stop.is_set():
            with perrequest.request_scope() as store:
                for _ in range(100):
                    var = rnd.choice(variables)
                    value = object()
                    if rnd.random() < 0.5:
                        token = var.set(value)
                        Garbage()
                        var.reset(token)
                    else:
                        var.set(value)
                        mine[var] = value
                        Garbage()
                        contextvars.copy_context()
                    if _current.get() is not store:
                        errors.append("the store was lost")
                    if any(v.get(None) is not val for v, val in mine.items()):
                        errors.append("a variable changed")

    old = gc.get_threshold()
    gc.freeze()  # full collections scan only what the test makes: many more of them
    gc.set_threshold(5, 2, 2)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not errors:
            gc.collect(0)
            time.sleep(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        gc.set_threshold(*old)
        gc.unfreeze()
    assert not errors, errors[:5]
    assert _active._hidden is None
    assert len(_active._keep) <= 64


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.11 collects inside allocations")
def test_a_collection_inside_the_reset_that_ends_a_scope_leaves_no_stale_store() -> None:
    """A reset that removes the variable (nothing was set before the scope) clears the
    variable's cached value, then allocates the new mapping; a collection starting there
    hides and restores the store, which caches it again. Without the invalidation,
    ``_current.get()`` returned the closed store ever after in that thread. The number of
    allocations before the scope's exit is swept, so that one of them lands the collection
    inside that reset."""
    others = [contextvars.ContextVar(f"other{i}") for i in range(3)]

    def one(allocations: int) -> object:
        for var in others:  # a framework's variables: the mapping is a real node
            var.set(1)
        with perrequest.request_scope() as store:
            store["k"] = allocations
            gc.collect()
            junk = [[] for _ in range(allocations)]
        del junk
        return _current.get()

    old = gc.get_threshold()
    gc.freeze()  # what the suite imported is not scanned: 40 collections in 0.1 s, not 8
    gc.set_threshold(25)
    try:
        seen = [contextvars.Context().run(one, n) for n in range(40)]
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()
    assert seen == [None] * 40


def test_a_collection_after_the_exiting_interpreter_wiped_the_module_raises_nothing() -> None:
    """As the interpreter exits, a module still referenced has its names set to None
    (``_current`` among the first, as ``_``-names go first), and collections still run
    (a finalizer's allocations start them): the hook must not fail on a wiped name, which
    Python reports as "Exception ignored in: <function _hide_during_collections>"."""
    script = """if True:
        import gc
        from perrequest import _active  # referenced to the end: wiped, not freed

        class Late:
            def __del__(self, collect=gc.collect):
                collect()  # as any finalizer's allocations may

        _active.late = Late()  # freed as the public names are wiped, after _current
    """
    src = str(Path(perrequest.__file__).parent.parent)  # this checkout's, as imported here
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": src},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "Exception ignored" not in done.stderr, done.stderr


class _Session:
    """What an app keeps in a ``ContextVar`` of its own for a request."""


_session: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("session", default=None)


def test_a_collection_outside_any_scope_drops_the_copies_of_a_requests_context() -> None:
    """On 3.11 the hook keeps copies of the context a collection interrupted (docs/
    security.md), with the request's other variables, until the next collection; one
    that started with no store active kept them, for good on an idle worker (an audit of
    5 December 2026: a 10 MB object alive after its request and a collection)."""
    import weakref

    def request() -> weakref.ref[_Session]:
        session = _Session()
        token = _session.set(session)
        try:
            with perrequest.request_scope():
                gc.collect()  # a collection in the middle of the request
        finally:
            _session.reset(token)
        return weakref.ref(session)

    kept = contextvars.Context().run(request)
    gc.collect()  # outside any scope
    assert kept() is None


def test_a_collection_starting_as_a_memo_warns_outside_a_scope_may_warn_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """memo.refuse_or_warn: a collection may start while a thread records the name it warns
    about (3.12+ start collections at eval-breaker checks, not in allocations, which this
    block makes none of; on 3.12 one another thread's allocation scheduled) and run a
    cleanup that calls another memo, outside any scope (the collection hides the store):
    that one warns too. With a plain Lock the thread waited for itself for good, and
    so did every later first warning."""
    from perrequest import memo

    @perrequest.request_memo
    def in_a_cleanup() -> int:
        return 1

    @perrequest.request_memo
    def in_a_handler() -> int:
        return 2

    class Abandoned:  # a streaming body left in a reference cycle
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            in_a_cleanup()

    class CollectedAsAdded(set[str]):
        def add(self, name: str) -> None:
            if name.endswith("in_a_handler"):
                Abandoned()
                gc.collect()  # as if started at the eval-breaker check after this call
            super().add(name)

    kind = threading.RLock if type(memo._warned_lock).__name__ == "RLock" else threading.Lock
    monkeypatch.setattr(memo, "_warned_lock", kind())  # a deadlocked thread keeps this one
    monkeypatch.setattr(memo, "outside_override", None)
    monkeypatch.setattr(memo, "warned_outside", CollectedAsAdded())
    done = threading.Event()
    threading.Thread(target=lambda: (in_a_handler(), done.set()), daemon=True).start()
    assert done.wait(5), "the thread waits for itself"
    assert {name.rsplit(".", 1)[-1] for name in memo.warned_outside} == {
        "in_a_cleanup",
        "in_a_handler",
    }


def test_a_collection_starting_as_a_redis_cache_logs_a_failure_may_log_one_too() -> None:
    """RedisCache._warn: a collection may start while a thread notes when it last logged a
    failure (see above) and run a cleanup whose memo, on the same Redis, fails too and logs.
    With a plain Lock the thread waited for itself for good, and so did every thread that
    met a failure of that cache later (a Redis outage: all of them)."""
    import redis

    from perrequest.redis import RedisCache

    cache = RedisCache(redis.Redis(host="127.0.0.1", port=1), ttl=60, namespace="gc")

    class Abandoned:  # a streaming body left in a reference cycle, whose memo fails too
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            cache._warn("in a cleanup", "perrequest test: %s", "in a cleanup")

    class CollectedAsRead(dict[str, float]):
        def get(self, kind: str, default: Any = None) -> Any:
            if kind == "in a handler":
                Abandoned()
                gc.collect()  # as if started at the eval-breaker check after this call
            return super().get(kind, default)

    cache._logged = CollectedAsRead()
    done = threading.Event()

    def handler() -> None:
        cache._warn("in a handler", "perrequest test: %s", "in a handler")
        done.set()

    threading.Thread(target=handler, daemon=True).start()
    assert done.wait(5), "the thread waits for itself"
    assert set(cache._logged) == {"in a handler", "in a cleanup"}
