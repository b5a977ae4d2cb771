"""@request_batch on sync batch functions, threads sharing a scope, and bad input."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import operator
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from crossing import Crossing

import perrequest
from perrequest import (
    NoActiveScope,
    UnhashableArguments,
    bind_scope,
    request_batch,
    request_scope,
)


def make_loader(
    fail: Sequence[int] = (), delay: float = 0.0, **options: object
) -> tuple[perrequest.BatchLoader[int, str], list[list[int]]]:
    calls: list[list[int]] = []

    def users(keys: list[int]) -> list[str | Exception]:
        calls.append(list(keys))
        time.sleep(delay)
        return [ValueError(f"no user {k}") if k in fail else f"u{k}" for k in keys]

    return request_batch(**options)(users), calls  # type: ignore[call-overload, no-any-return]


def test_load_many_fetches_what_it_lacks_in_one_call() -> None:
    users, calls = make_loader()
    with request_scope() as store:
        assert users.load_many([1, 2, 3, 2]) == ["u1", "u2", "u3", "u2"]
        assert users.load(2) == "u2" and users([3, 4, 5]) == ["u3", "u4", "u5"]
        assert calls == [[1, 2, 3], [4, 5]]
        assert users.cache_info() == (1 + 1 + 1, 5, None, 5)
        assert len(store) == 5
    assert users.load(1) == "u1"  # outside: called (and warned once)
    assert calls[-1] == [1]


def test_max_batch_size_errors_and_mapping() -> None:
    users, calls = make_loader(fail=[4], max_batch_size=2)
    with request_scope() as store:
        with pytest.raises(ValueError, match="no user 4"):
            users.load_many([1, 2, 3, 4, 5])
        assert calls == [[1, 2], [3, 4], [5]] and len(store) == 4  # 4 failed: not kept

    @request_batch
    def by_id(keys: list[int]) -> dict[int, str]:
        return {k: str(k) for k in keys if k}

    with request_scope():
        assert by_id.load(7) == "7"
        with pytest.raises(KeyError, match="without key 0"):
            by_id.load_many([7, 0])


def test_wrong_counts_and_coroutines_are_refused() -> None:
    @request_batch
    def too_many(keys: list[int]) -> list[int]:
        return [*keys, 0]

    with request_scope(), pytest.raises(TypeError, match="too_many returned 3 values for 2 keys"):
        too_many.load_many([1, 2])

    async def later(keys: list[int]) -> list[int]:
        return keys

    @request_batch
    def sneaky(keys: list[int]) -> object:
        return later(keys)

    with request_scope(), pytest.raises(TypeError, match="returned a coroutine"):
        sneaky.load(1)  # type: ignore[arg-type]

    @request_batch
    def gathers(keys: list[int]) -> object:  # a plain def handing back asyncio.gather(...)
        return asyncio.gather(*(later([key]) for key in keys))

    async def view() -> None:  # each key failed with "await wasn't used with future"
        with request_scope(), pytest.raises(TypeError, match="returned _GatheringFuture: a b"):
            gathers.load(1)  # type: ignore[arg-type]

    asyncio.run(view())


def test_threads_sharing_a_scope_never_fetch_a_key_twice_at_once() -> None:
    users, calls = make_loader(delay=0.05)
    with request_scope(), ThreadPoolExecutor(8) as pool:
        load_many = bind_scope(users.load_many)
        futures = [pool.submit(load_many, [k % 5, (k + 1) % 5]) for k in range(16)]
        results = [f.result(timeout=10) for f in futures]
        assert results[3] == ["u3", "u4"]
        fetched = [k for call in calls for k in call]
        assert sorted(fetched) == [0, 1, 2, 3, 4]  # each key asked for exactly once
        info = users.cache_info()
        assert info.misses == 5 and info.hits == 32 - 5


def _until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (10 s at most): a thread just started may not run for a
    while on a loaded machine, longer than any fixed sleep."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


def test_a_waiting_thread_gets_the_fetching_threads_error_not_cached() -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    @request_batch
    def failing(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        gate.wait(5)
        raise ConnectionError("down")

    with request_scope() as store, ThreadPoolExecutor(2) as pool:
        load = bind_scope(failing.load)
        first = pool.submit(load, 1)
        _until(lambda: calls == [[1]])  # the first thread fetches
        second = pool.submit(load, 1)
        # the second waits for that fetch (the first to wait makes the fetch's future)
        _until(lambda: any(f.future is not None for f in list(store._flights.values())))
        gate.set()
        for future in (first, second):
            with pytest.raises(ConnectionError):
                future.result(timeout=5)
        assert calls == [[1]] and failing.cache_info().hits == 1  # the second waited
        with pytest.raises(ConnectionError):
            failing.load(1)
        assert calls == [[1], [1]]


def test_an_interrupted_fetch_lets_its_waiters_ask_again() -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    class Interrupt(BaseException):
        pass

    @request_batch
    def once_interrupted(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        if len(calls) == 1:
            gate.wait(5)
            raise Interrupt
        return keys

    with request_scope() as store, ThreadPoolExecutor(2) as pool:
        load = bind_scope(once_interrupted.load)
        first = pool.submit(load, 1)
        _until(lambda: calls == [[1]])  # the first thread fetches
        second = pool.submit(load, 1)
        fetch = store._flights[(once_interrupted._spec, 1)]
        _until(lambda: fetch.future is not None)  # the second waits for it
        gate.set()
        with pytest.raises(Interrupt):
            first.result(timeout=5)
        assert second.result(timeout=5) == 1  # it fetched the key itself
        assert calls == [[1], [1]]
        # Two loads, each fetched: two misses. Before: the waiter counted a hit as well.
        assert once_interrupted.cache_info()[:2] == (0, 2)


def test_a_batch_function_that_loads_its_own_keys_does_not_deadlock() -> None:
    @request_batch
    def tree(keys: list[int]) -> list[int]:
        # A node's value needs its parent's, through the same loader.
        return [0 if k == 0 else tree.load(k // 2) + 1 for k in keys]

    with request_scope():
        # 4 needs 2, which this very call is fetching: computed again, not waited for.
        assert tree.load_many([4, 2]) == [3, 2]
        assert tree.load(5) == 3


def test_outside_scope_rules_and_closed_scopes() -> None:
    strict, _ = make_loader(outside_scope="raise")
    with pytest.raises(NoActiveScope, match="users"):
        strict.load(1)
    with pytest.raises(UnhashableArguments):
        strict.load_many([[1]])  # type: ignore[list-item]

    users, calls = make_loader(outside_scope="call")
    with request_scope() as store:
        late = bind_scope(users.load)
    assert late(1) == "u1" and late(1) == "u1"  # the scope has ended: uncached
    assert calls == [[1], [1]] and len(store) == 0
    assert users.cache_info() == (0, 0, None, 0)
    users.cache_clear()  # outside: nothing to do


def test_store_stats_and_on_close() -> None:
    users, _ = make_loader()
    stats: list[perrequest.ScopeStats] = []
    with request_scope(on_close=stats.append):
        users.load_many([1, 2])
        users.load(1)
    (function,) = stats[0].functions.values()
    assert (stats[0].hits, stats[0].misses, stats[0].entries) == (1, 2, 2)
    assert function.misses == 2 and function.compute_s >= 0


# -- decoration ----------------------------------------------------------------------------


def test_bare_and_called_decorators_keep_the_function() -> None:
    def plain(keys: list[int]) -> list[int]:
        """Docs."""
        return keys

    bare = request_batch(plain)
    called = request_batch(max_batch_size=10)(plain)
    for loader in (bare, called):
        assert loader.__wrapped__ is plain and loader.__doc__ == "Docs."  # type: ignore[attr-defined]
        assert "plain" in repr(loader)

    class Repo:
        @staticmethod
        @request_batch
        def rows(keys: list[int]) -> list[int]:
            return keys

    with request_scope():
        assert Repo.rows.load(3) == 3 and Repo().rows.load_many([4]) == [4]


def _gen(keys: list[int]) -> Iterator[int]:
    yield from keys


async def _agen(keys: list[int]):  # type: ignore[no-untyped-def]
    for k in keys:
        yield k


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: request_batch(_gen), TypeError, "a generator function"),
        (lambda: request_batch(_agen), TypeError, "an async generator function"),
        (lambda: request_batch(max_batch_size=0), ValueError, "max_batch_size"),
        (lambda: request_batch(max_batch_size=True), TypeError, "max_batch_size"),
        (lambda: request_batch(max_batch_size="10"), TypeError, "max_batch_size"),
        (lambda: request_batch(max_entries=-1), ValueError, "max_entries"),
        (lambda: request_batch(key=3), TypeError, "key="),
        # A key function of two arguments failed at the first load with Python's bare
        # "missing 1 required positional argument" (an audit); builtins without a
        # signature (operator.itemgetter) are trusted.
        (lambda: request_batch(key=lambda key, other: key), TypeError, "function of one load key"),
        (lambda: request_batch(key=lambda: 1), TypeError, "function of one load key"),
        (lambda: request_batch(outside_scope="ignore"), ValueError, "outside_scope"),
        (lambda: request_batch(batch_size=10), TypeError, "Did you mean max_batch_size="),
        (lambda: request_batch(maxsize=10), TypeError, "Did you mean max_entries="),
        (lambda: request_batch(10), TypeError, "takes a function, or options"),
        (lambda: request_batch(classmethod(_gen)), TypeError, "the class method _gen"),
    ],
)
def test_misuse_is_refused_when_decorating(call: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


def test_a_key_function_without_a_signature_is_trusted() -> None:
    @request_batch(key=operator.itemgetter(0))
    def rows(keys: list[tuple[int, str]]) -> list[str]:
        return [name for _, name in keys]

    with request_scope():
        assert rows.load_many([(1, "a"), (1, "b"), (2, "c")]) == ["a", "a", "c"]


def test_methods_are_refused_with_a_way_out() -> None:
    with pytest.raises(TypeError, match=r"cannot decorate the method .*staticmethod"):

        class Repo:
            @request_batch
            def rows(self, keys: list[int]) -> list[int]:
                return keys


def _needs_a_db(ids: list[int], db: object) -> list[int]:
    return ids


async def _takes_nothing() -> list[int]:
    return []


@pytest.mark.parametrize(
    "fn", [_needs_a_db, _takes_nothing, lambda: []], ids=["db", "async", "none"]
)
def test_a_function_that_cannot_take_the_keys_is_refused_when_decorating(fn: Any) -> None:
    """It would fail on its first load, in a request, with Python's missing-argument error
    (an outside review, 7 December 2026)."""
    with pytest.raises(TypeError, match=r"called with one argument, the list of keys.*partial"):
        request_batch(fn)
    with pytest.raises(TypeError, match=r"called with one argument"):
        request_batch(max_batch_size=10)(fn)


def test_a_function_taking_the_keys_with_others_bound_or_defaulted_is_taken() -> None:
    loaders = [
        request_batch(functools.partial(_needs_a_db, db=None)),
        request_batch(lambda ids, db=None: ids),
        request_batch(lambda *keys: keys[0]),
    ]
    with request_scope():
        assert [loader.load_many([1, 2]) for loader in loaders] == [[1, 2]] * 3


def test_two_threads_fetching_each_others_keys_do_not_deadlock() -> None:
    """A friends graph fetched from two threads sharing a scope: thread A's batch for "a"
    loads "b", which thread B is fetching; B's batch for "b" loads "a". The second to wait
    fetches the other's key itself instead of waiting (it would hang both forever)."""
    crossing = Crossing()

    @request_batch
    def friends(keys: Sequence[str]) -> list[str]:
        out = []
        for key in keys:
            other = crossing.needs(key) if key in ("a", "b") else None
            out.append(key if other is None else key + friends.load(other))
        return out

    with perrequest.request_scope():
        threads, results = crossing.run(friends.load)
    assert not any(thread.is_alive() for thread in threads)  # before: both, forever
    assert set(results) == {"a", "b"} and all(v[0] == k for k, v in results.items())


class _UserId:
    """A key equal to another _UserId of the same number. Compared with an int (which
    hashes alike), its ``__eq__`` raises AttributeError; a negative one's (which hashes as
    its opposite) raises ValueError when compared with any other _UserId."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return hash(abs(self.n))

    def __eq__(self, other: object) -> bool:
        if self.n < 0 and other is not self:
            raise ValueError("a negative id")
        return self.n == other.n  # type: ignore[attr-defined, no-any-return]


def _soon(get: Callable[[], list[object]]) -> list[object]:
    """What ``get`` returns once it is not empty, waiting 5 s at most."""
    deadline = time.monotonic() + 5
    while not get() and time.monotonic() < deadline:
        time.sleep(0.01)
    return get()


def test_a_key_whose_eq_raises_strands_no_thread() -> None:
    """A load_many whose key's ``__eq__`` raised while its fetch was registered (among the
    fetches in flight, or storing what it fetched) left its keys registered, with nobody
    to hand them out: threads that then loaded them waited forever."""
    gate = threading.Event()
    done = threading.Event()  # threads stay alive till the end: a new one could reuse an id

    @request_batch
    def users(keys: list[object]) -> list[str]:
        if any(type(k) is _UserId for k in keys) or 5 in keys:
            gate.wait(5)
        return [f"u{getattr(k, 'n', k)}" for k in keys]

    def load_in_thread(keys: list[object]) -> list[object]:
        out: list[object] = []

        def run() -> None:
            try:
                out.append(users.load_many(keys))
            except Exception as exc:
                out.append(exc)
            done.wait(10)

        threading.Thread(target=bind_scope(run), daemon=True).start()
        time.sleep(0.05)
        return out

    with request_scope():
        load_in_thread([5])
        # 7 is registered, then (5, int) in flight is compared with _UserId(5): raises
        failed = load_in_thread([7, _UserId(5)])
        assert type(_soon(lambda: failed)[0]) is AttributeError
        got = load_in_thread([7])
        gate.set()
        assert _soon(lambda: got) == [["u7"]]  # before: it waited for that fetch forever

    gate.clear()
    with request_scope():
        # _UserId(6), fetched, is compared with _UserId(-6), stored meanwhile: raises
        fetched = load_in_thread([_UserId(6)])
        got = load_in_thread([_UserId(6)])
        users.prime(_UserId(-6), "primed")
        gate.set()
        assert type(_soon(lambda: fetched)[0]) is ValueError
        assert _soon(lambda: got)  # before: it waited forever
    done.set()


def test_a_prime_while_another_thread_loads_the_key_never_replaces_a_value_seen() -> None:
    """The sync twin: a prime while another thread fetched the key was replaced by the
    fetched (older) value."""
    db = {1: "old"}
    started, written = threading.Event(), threading.Event()

    @request_batch
    def users(keys: list[int]) -> list[str]:
        values = [db[k] for k in keys]
        started.set()
        written.wait(5)
        return values

    with request_scope(), ThreadPoolExecutor(1) as pool:
        loading = pool.submit(bind_scope(users.load), 1)
        assert started.wait(5)
        db[1] = "new"
        users.prime(1, "new")  # does nothing: the key is being loaded
        assert users.cache_info().currsize == 0  # before: "new", a load's for now
        written.set()
        assert loading.result(5) == "old"
        assert users.load(1) == "old"  # before: "new" was replaced by "old"


def test_a_batch_function_that_loads_its_keys_in_worker_threads_does_not_deadlock() -> None:
    """A tree whose batch function computes each key in a worker thread (with the context
    copied, as asyncio.to_thread and run_in_threadpool do), each loading its parent, a
    key of that very fetch: the worker waited for the fetch, which waited for the
    worker. Now a worker of a fetch fetches its keys again, as the fetching thread does."""
    pool = ThreadPoolExecutor(32)  # more than the tasks at once: nested ones never queue

    @request_batch
    def tree(keys: list[int]) -> list[int]:
        def value(key: int) -> int:
            return 0 if key == 0 else tree.load(key // 2) + 1

        futures = [pool.submit(contextvars.copy_context().run, value, k) for k in keys]
        return [future.result(timeout=5) for future in futures]

    with request_scope():
        out: list[list[int]] = []
        worker = threading.Thread(target=bind_scope(lambda: out.append(tree([4, 2, 1]))))
        worker.daemon = True
        worker.start()
        worker.join(5)
        assert out == [[3, 2, 1]]  # before: it waited forever (then a TimeoutError)
    pool.shutdown(wait=False, cancel_futures=True)


def test_a_batch_function_whose_bind_scope_workers_load_its_keys_does_not_deadlock() -> None:
    """The same tree with workers fed through bind_scope (which does not copy the
    context): bind_scope carried the store and not the fetch the worker belongs to, so
    the worker waited for the fetch, which waited for the worker."""
    pool = ThreadPoolExecutor(32)

    @request_batch
    def tree(keys: list[int]) -> list[int]:
        def value(key: int) -> int:
            return 0 if key == 0 else tree.load(key // 2) + 1

        futures = [pool.submit(bind_scope(value), k) for k in keys]
        return [future.result(timeout=5) for future in futures]

    with request_scope():
        out: list[list[int]] = []
        worker = threading.Thread(target=bind_scope(lambda: out.append(tree([4, 2, 1]))))
        worker.daemon = True
        worker.start()
        worker.join(10)
        assert out == [[3, 2, 1]]  # before: a TimeoutError in the batch function
        assert tree.cache_info().misses >= 3
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.slow  # seconds of waits: make check skips it
def test_a_thread_waiting_for_a_fetch_that_dies_at_the_recursion_limit_is_freed() -> None:
    """As a memo's waiter (tests/test_memo_threads.py): ending a fetch takes a few frames,
    which a fetch that ends in a ``RecursionError`` at the limit may not have. Before: its
    waiter called ``future.result()`` without a timeout and waited for ever."""
    from perrequest._waits import result as waiting_for_a_fetch

    bottom: list[int] = []
    ready = threading.Lock()
    ready.acquire()
    waiter_id = [0]
    waited: list[int] = []

    @request_batch
    def deep(keys: list[int]) -> list[int]:
        (n,) = keys
        try:
            return [deep.load(n + 1) + 1]
        except RecursionError:
            if not bottom:  # the deepest key registered: a thread asks for it, and waits
                bottom.append(n)
                ready.release()
                # Until the waiter waits for this fetch (0.3 s at most, as the sleep that
                # was here): C calls and attribute reads only, no frame left here.
                deadline = time.monotonic() + 0.3
                while time.monotonic() < deadline:
                    frame = sys._current_frames().get(waiter_id[0])
                    while frame is not None and frame.f_code is not waiting_for_a_fetch.__code__:
                        frame = frame.f_back
                    if frame is not None:
                        waited.append(n)
                        break
                    time.sleep(0.001)
            raise

    results: list[object] = []

    def wait_for_the_deepest_key() -> None:
        ready.acquire()
        try:
            results.append(deep.load(bottom[0]))
        except RecursionError as exc:  # fetched again in this thread: as deep, as bad
            results.append(exc)

    limit = sys.getrecursionlimit()
    for extra in range(40, 80, 3):  # where the limit strikes in the fetch's end varies
        bottom.clear()
        results.clear()
        with request_scope():
            waiter = threading.Thread(target=bind_scope(wait_for_the_deepest_key), daemon=True)
            waiter.start()
            waiter_id[0] = waiter.ident or 0
            sys.setrecursionlimit(len(traceback.extract_stack()) + extra)
            gc.disable()  # no collection at the limit: see test_memo_threads
            try:
                with pytest.raises(RecursionError):
                    deep.load(0)
            finally:
                sys.setrecursionlimit(limit)
                gc.enable()
            waiter.join(10)
        assert not waiter.is_alive(), f"the waiter still waits for a fetch that ended ({extra})"
        assert len(results) == 1 and isinstance(results[0], RecursionError), results
    assert waited, "the waiter never waited for the deepest key's fetch"


def test_a_value_that_serves_once_fails_its_key_sync_too() -> None:
    @request_batch
    def tags(keys: list[int]) -> list[Any]:
        return [(f"t{k}-{i}" for i in range(2)) if k == 1 else [f"t{k}"] for k in keys]

    with request_scope():
        with pytest.raises(TypeError, match="value of key 1: a generator"):
            tags.load(1)
        assert tags.load_many([2, 3]) == [["t2"], ["t3"]]
        with pytest.raises(TypeError, match="value of key 1: a generator"):
            tags.load(1)  # asked again: never cached
