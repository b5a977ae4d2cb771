"""Guards of the in-process shared tier (_shared) that no other test needed: each test here
fails with its guard deleted (a block-deletion mutation pass, 5 December 2026)."""

from __future__ import annotations

import sys
import threading
from typing import Any

import cachetools
import pytest
from keys import Model
from signals import free_for_another_thread, raising_at_a_back_edge

from perrequest import request_memo, request_scope


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_uses_the_shared_caches_from_any_thread_and_makes_new_ones() -> None:
    """_shared._forked: the fork waits for the cache operations in progress by taking every
    cache's lock, and the registry's; the child starts with new locks. Kept, the locks
    stay held in the child by the thread that forked: any other thread of the child (a
    gthread worker's) waits forever on a cache, and a function decorated there with a
    shared cache waits forever for the registry."""
    import multiprocessing

    cache: Any = cachetools.LRUCache(maxsize=10)

    @request_memo(shared=cache)
    def price(n: int) -> int:
        return n * 2

    with request_scope():
        assert price(1) == 2  # the cache in use, its lock registered

    def child(out: Any) -> None:
        def in_a_thread() -> None:
            with request_scope():
                out.put(("thread", price(2)))

        thread = threading.Thread(target=in_a_thread, daemon=True)
        thread.start()
        thread.join(3)

        @request_memo(shared=cachetools.LRUCache(maxsize=10))
        def later(n: int) -> int:
            return n + 1

        with request_scope():
            out.put(("new", later(1)))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    try:
        assert queue.get(timeout=5) == ("thread", 4)
        assert queue.get(timeout=5) == ("new", 2)
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


# -- found by a red-team pass of the shared tier (6 December 2026) -------------------------


def test_a_record_put_back_under_another_key_object_is_still_found_by_its_thread() -> None:
    """_flight._own: B's invalidated computation ends after A registered the key (an equal
    key object) and W waits for A; B's end puts A's record back under B's key object. A's
    computation then changes its key's hash: A finds its record by its thread's per-call
    identity. Before, only under its own key object: the record stayed, W waited for ever."""
    import time

    computing = {name: threading.Event() for name in "BA"}

    def compute(model: Model) -> str:
        name = threading.current_thread().name
        if name in computing:
            computing[name].set()
        if name == "B":
            time.sleep(0.5)
        elif name == "A":
            time.sleep(0.7)
            model.pk = 99  # saved: its hash changes
        return f"value {model.pk}"

    f = request_memo(shared=cachetools.LRUCache(10))(compute)
    out: dict[str, str] = {}

    def run(name: str) -> threading.Thread:
        def request() -> None:
            with request_scope():
                out[name] = f(Model(1))

        thread = threading.Thread(target=request, name=name)
        thread.start()
        return thread

    # Each waited for, not slept for: a thread that started 0.1 s late on a loaded machine
    # (W registering before A) computed in A's place, and W and A then had "value 1".
    b = run("B")
    assert computing["B"].wait(5)
    assert f.cache_delete(Model(1)) is False  # invalidates B's computation
    a = run("A")
    assert computing["A"].wait(5)
    w = run("W")  # waits for A
    for thread in (b, a, w):
        thread.join(5)
    assert not w.is_alive()
    assert out["W"] == out["A"] == "value 99"
    later = run("later")
    later.join(5)
    assert not later.is_alive()


def test_a_lookup_that_raises_as_a_value_is_stored_never_reaches_a_waiter() -> None:
    """_shared._Guarded._lookup: as A's value is stored, the lookup meets a colliding key
    whose __eq__ raises. Before, that TypeError (its traceback holding A's frames) was
    handed as it was to C, a waiter in another request; now it is a miss, and C gets A's
    value."""
    import time

    class Key:
        def __init__(self, raising: bool) -> None:
            self.raising = raising

        def __hash__(self) -> int:
            return 42

        def __eq__(self, other: object) -> bool:
            if self.raising and other is not self:
                raise TypeError("cannot compare")
            return other is self

    k0, k1 = Key(raising=True), Key(raising=False)

    @request_memo(shared=cachetools.LRUCache(10))
    def f(key: Key) -> str:
        time.sleep(0.6 if key is k1 else 0.0)
        return "value 1" if key is k1 else "value 0"

    got: dict[str, Any] = {}

    def request(name: str, key: Key) -> None:
        with request_scope():
            try:
                got[name] = f(key)
            except Exception as exc:  # what the test looks at
                got[name] = exc

    a = threading.Thread(target=request, args=("A", k1))
    a.start()
    time.sleep(0.1)
    c = threading.Thread(target=request, args=("C", k1))  # waits for A
    c.start()
    time.sleep(0.1)
    request("D", k0)  # stored: its key collides with A's, and its __eq__ raises
    a.join(5)
    c.join(5)
    assert got["C"] == got["A"] == "value 1"


def test_a_stale_unregistered_computation_is_not_stored_after_a_delete() -> None:
    """_flight._keep: a trio computation (not registered) started while an asyncio task
    computed the key; a delete came, and the same task, in its next scope, registered the
    key again. Before, that same task holding the key passed for "no delete came": the
    trio value, read before the delete, was stored in the shared cache after it."""
    import asyncio
    import time

    import trio

    data = {"v": 0}
    shared = cachetools.LRUCache(10)

    @request_memo(shared=shared)
    async def f(key: str) -> str:
        value = data["v"]
        try:
            asyncio.current_task()
        except RuntimeError:  # trio
            await trio.sleep(1.0)
        else:
            await asyncio.sleep(0.3 if value == 0 else 1.5)
        return f"from v{value}"

    again = threading.Event()

    async def one_task_two_scopes() -> None:  # a worker's task, a scope per message
        with request_scope():
            await f("k")
        assert again.wait(5)
        with request_scope():
            await f("k")

    def in_trio() -> None:
        async def main() -> None:
            with request_scope():
                await f("k")

        trio.run(main)

    worker = threading.Thread(target=asyncio.run, args=(one_task_two_scopes(),))
    worker.start()
    time.sleep(0.1)  # the task computes, from v0
    other = threading.Thread(target=in_trio)
    other.start()
    time.sleep(0.1)  # trio computes too, from v0
    data["v"] = 1
    f.cache_delete("k")
    time.sleep(0.3)  # the task's first computation ended (invalidated)
    again.set()  # it computes again, from v1
    worker.join(10)
    other.join(10)
    assert list(shared.values()) == ["from v1"]


async def test_a_record_put_back_under_another_key_object_strands_no_task() -> None:
    """_waits.gone: as above with tasks, whose records cannot be told apart by identity (a
    task is its own record in each registration): A's record, put back under B's key
    object, is not found when A's key changes hash. Once A's task is done, W, waiting for
    it, takes the key over instead of waiting for ever."""
    import asyncio

    release = {name: asyncio.Event() for name in "AB"}

    async def compute(model: Model, name: str) -> str:
        if name in release:
            await release[name].wait()
        if name == "A":
            model.pk = 99  # saved: its hash changes
        return f"{name}: {model.pk}"

    f = request_memo(key=lambda model, name: model, shared=cachetools.LRUCache(10))(compute)

    async def request(name: str) -> str:
        async with request_scope():
            return await f(Model(1), name)

    b = asyncio.create_task(request("B"))
    await asyncio.sleep(0.01)
    f.cache_delete(Model(1), "B")  # invalidates B's computation
    a = asyncio.create_task(request("A"))
    await asyncio.sleep(0.01)
    w = asyncio.create_task(request("W"))  # waits for A
    await asyncio.sleep(0.01)
    release["B"].set()
    assert await b == "B: 1"  # B's end puts A's record back under B's key object
    release["A"].set()
    assert await a == "A: 99"
    assert (await asyncio.wait_for(w, 8)).startswith("W")  # before: waited for ever


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring: CPython 3.12+")
def test_a_signal_in_cache_clears_look_at_what_is_in_flight_leaves_the_lock_free() -> None:
    """SharedTier.clear: an exception raised at a back edge of the look for this function's
    computations in flight (CPython runs signal handlers there), past another's, leaves the
    shared cache's lock free. On 3.13 such an exception in an inlined comprehension skipped
    the ``with`` around it (python/cpython#130279): the lock stayed held, and every other
    thread's next call of a function on that cache hung. (A real signal there: 3.13; raised
    as a JUMP event of sys.monitoring, on 3.12 too.)"""

    from perrequest import _shared

    cache = cachetools.LRUCache(maxsize=10)

    @request_memo(shared=cache)
    def a(x: int) -> int:
        return x

    with request_scope():
        a(1)
    guarded = _shared._guarded[id(cache)]
    guarded._flights["another's"] = 0  # in flight, not this function's
    try:
        signal = KeyboardInterrupt
        with pytest.raises(signal), raising_at_a_back_edge(_shared.__file__, signal):
            a.cache_clear()
    finally:
        guarded._flights.pop("another's", None)

    assert free_for_another_thread(guarded._lock)
    a.cache_clear()
    assert len(cache) == 0
