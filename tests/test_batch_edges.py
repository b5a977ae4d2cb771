"""Async @request_batch at its edges: a batch function that raises BaseException, loads
its own keys or runs under trio; event loops that come and go within one scope; a
recency refresh that loses a race. Each test failed (or hung) before its fix."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import weakref
from typing import Any

import anyio
import pytest

from perrequest import bind_scope, current_store, in_request_scope, request_batch, request_scope


async def _batch_started() -> None:
    """Two loop iterations: a batch starts on the second after its first key is loaded
    (``_batch_tick._schedule``, as DataLoader's)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_batch_function_raising_cancelled_error_fails_its_keys_once() -> None:
    """Its own CancelledError (an inner await cancelled), not its task's: every key fails
    with an error naming the function. Before: the batch was asked again, endlessly."""
    calls = 0

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        inner = asyncio.get_running_loop().create_future()
        inner.cancel()
        await inner
        return keys

    async with request_scope():
        with pytest.raises(RuntimeError, match=r"rows: the batch function raised Cancel"):
            await asyncio.wait_for(rows.load(1), 5)
    assert calls == 1


def test_hits_under_a_second_event_loop_in_one_scope_work_with_gather_and_wait_for() -> None:
    """Two asyncio.run calls in one scope (a worker, async_to_sync twice in a view): the
    second loop's hits are its own futures. Before: gather raised 'Event loop is closed'
    and wait_for 'The future belongs to a different loop'."""

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        return [f"u{k}" for k in keys]

    async def first() -> list[str]:
        return await asyncio.gather(users.load(1), users.load(2))

    async def second() -> tuple[list[str], str]:
        both = await asyncio.gather(users.load(1), users.load(2))
        return both, await asyncio.wait_for(users.load(1), 5)

    with request_scope() as store:
        assert asyncio.run(first()) == ["u1", "u2"]
        assert asyncio.run(second()) == (["u1", "u2"], "u1")
        assert users.cache_info().misses == 2
        assert not store._flights  # no state left for either loop


async def test_hits_in_a_thread_running_its_own_loop_beside_the_first_work_with_gather() -> None:
    """A scope shared with a thread that runs a loop of its own while the first one still
    runs (``bind_scope`` and ``asyncio.run`` in an executor): that thread's hits are its
    loop's futures. Before: the first loop's, which ``gather`` and ``wait_for`` refuse
    ("attached to a different loop"), because that loop was running, elsewhere."""

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        return [f"u{k}" for k in keys]

    async def in_the_other_loop() -> tuple[list[str], str]:
        both = await asyncio.gather(users.load(1), users.load(2))
        return both, await asyncio.wait_for(users.load(1), 5)

    async with request_scope():
        assert await asyncio.gather(users.load(1), users.load(2)) == ["u1", "u2"]
        assert await users.load(1) == "u1"  # a hit: its future kept for this loop
        job = bind_scope(lambda: asyncio.run(in_the_other_loop()))
        got = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, job), 5)
        assert got == (["u1", "u2"], "u1")
        assert await asyncio.gather(users.load(1), users.load(2)) == ["u1", "u2"]  # and back
        assert users.cache_info().misses == 2


def test_threads_running_loops_of_their_own_never_ask_again_for_a_cached_key() -> None:
    """Four threads of one scope, each running its own loop, hit one cached key at once. A
    hit in a thread whose loop did not make the kept future keeps one of its own loop's
    (``ready``): replacing the entry gave it a new place in the recency order, and another
    thread's hit, refreshing the old place, took the key for evicted and asked the batch
    function again (an audit: 13 to 33 calls instead of 1; a load raised when that call
    failed). The entry keeps its place now."""
    from concurrent.futures import ThreadPoolExecutor

    calls: list[list[int]] = []

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        calls.append(list(keys))
        if len(calls) > 1:
            raise RuntimeError(f"asked again for the cached keys {keys}")
        return [f"u{k}" for k in keys]

    async def hits() -> int:
        for _ in range(20_000):
            assert await users.load(1) == "u1"
        return users.cache_info().hits

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads switch between any two hits
    try:
        for _ in range(3):  # a race: one run showed it five times in six
            calls.clear()
            with request_scope():
                asyncio.run(users.load(1))
                job = bind_scope(lambda: asyncio.run(hits()))
                with ThreadPoolExecutor(4) as pool:
                    done = [pool.submit(job) for _ in range(4)]
                    assert all(future.result(timeout=60) for future in done)
                assert calls == [[1]]
                assert users.cache_info().hits == 80_000
    finally:
        sys.setswitchinterval(interval)


def test_prime_outside_a_loop_ignores_a_batch_left_on_a_closed_loop() -> None:
    """A job that started a load and never awaited it, under ``asyncio.run``, in a worker's
    long scope: the closed loop's batch never ends, and its state stays until the next
    batch starts. ``prime`` from code with no loop running took the key for being loaded
    and stored nothing (an audit)."""

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        await asyncio.sleep(1)
        return [f"u{k}" for k in keys]

    async def job() -> None:
        users.load(1)  # started, never awaited
        await asyncio.sleep(0.01)

    logging.getLogger("asyncio").disabled = True  # "Task was destroyed but it is pending"
    try:
        with request_scope() as store:
            asyncio.run(job())
            assert store._flights  # the closed loop's batch state (the test's premise)
            users.prime(1, "primed")
            assert users.cache_info().currsize == 1
            assert asyncio.run(asyncio.wait_for(users.load(1), 5)) == "primed"
        gc.collect()
    finally:
        logging.getLogger("asyncio").disabled = False


def test_a_job_that_drops_its_load_leaves_nothing_after_asyncio_run() -> None:
    """A job that starts a load and fails before awaiting it, once per asyncio.run (a
    worker). Before: each left its batch task, and what it held, in a module-level set."""
    held: list[weakref.ref[object]] = []

    class Row:
        pass

    @request_batch
    async def rows(keys: list[int]) -> list[Row]:
        row = Row()
        held.append(weakref.ref(row))
        await asyncio.sleep(0.01)
        return [row for _ in keys]

    async def job() -> None:
        async with request_scope():
            rows.load(1)
            await _batch_started()
            raise RuntimeError("the job fails before awaiting its load")

    logging.getLogger("asyncio").disabled = True  # "Task was destroyed but it is pending"
    try:
        for _ in range(5):
            with pytest.raises(RuntimeError):
                asyncio.run(job())
        gc.collect()
    finally:
        logging.getLogger("asyncio").disabled = False
    assert held and sum(ref() is not None for ref in held) <= 1  # the last run's, at most


def test_per_loop_bookkeeping_goes_when_nothing_is_in_flight() -> None:
    """A long scope, a loop per message: a load_many of hits only, or a refused load,
    makes no record. Before: one record (and its closed loop) per asyncio.run."""

    @request_batch
    async def users(keys: list[Any]) -> list[str]:
        return [f"u{k}" for k in keys]

    async def message() -> None:
        assert await users.load_many([1, 2]) == ["u1", "u2"]
        with pytest.raises(TypeError):
            users.load([3])

    with request_scope(max_entries=10) as store:
        asyncio.run(users.load_many([1, 2]))
        for _ in range(20):
            asyncio.run(message())
        assert not store._flights


async def test_a_batch_function_that_loads_a_key_of_its_own_batch_gets_it() -> None:
    """A tree, parent by parent, with a parent in the same batch as its child: fetched by
    itself, as the sync loader does. Before: it waited for itself, silently, forever."""
    parent = {0: None, 1: 0, 2: 1}
    calls: list[list[int]] = []

    @request_batch
    async def depth(ids: list[int]) -> list[int]:
        calls.append(list(ids))
        out = []
        for i in ids:
            up = parent[i]
            out.append(0 if up is None else 1 + await depth.load(up))
        return out

    async with request_scope():
        assert await asyncio.wait_for(depth.load_many([2, 1]), 5) == [2, 1]
        assert await depth.load(0) == 0  # stored by its batch


async def test_loads_of_a_key_of_its_own_batch_made_in_one_tick_share_one_call() -> None:
    """Two children in a batch look up their parent, also in the batch, at once: one
    call fetches it for both. Before: a call per load, the key asked for three times."""
    calls: list[list[int]] = []

    @request_batch
    async def rows(ids: list[int]) -> list[int]:
        calls.append(list(ids))
        if 2 in ids:
            await asyncio.gather(rows.load(1), rows.load(1))
        return ids

    async with request_scope():
        assert await asyncio.wait_for(rows.load_many([1, 2]), 5) == [1, 2]
    assert calls == [[1, 2], [1]]


async def test_two_batches_of_one_loader_that_load_each_others_keys_both_end() -> None:
    """Batch A's function loads a key of batch B, in flight, whose function loads one of
    A's: a batch function's loads never wait for its own loader's batches, so neither
    waits for the other. Before: both waited forever."""
    started: set[int] = set()

    @request_batch
    async def friends(ids: list[int]) -> list[int]:
        await asyncio.sleep(0.01)  # both batches are in flight now
        for i in ids:
            if i not in started:  # each looks its friend up once
                started.add(i)
                await friends.load(3 - i)
        return ids

    async with request_scope():
        a = asyncio.ensure_future(friends.load_many([1]))
        await asyncio.sleep(0)  # batch A starts
        b = asyncio.ensure_future(friends.load_many([2]))
        assert await asyncio.wait_for(asyncio.gather(a, b), 5) == [[1], [2]]


def test_a_mapping_keyed_by_cache_key_with_unhashable_load_keys() -> None:
    """key= for dict load keys; the batch function maps cache keys. Before: TypeError."""

    @request_batch(key=lambda q: q["id"])
    async def rows(queries: list[dict[str, int]]) -> dict[int, str]:
        return {q["id"]: f"row {q['id']}" for q in queries}

    async def main() -> list[str]:
        async with request_scope():
            return [await rows.load({"id": 1}), *await rows.load_many([{"id": 2}])]

    assert asyncio.run(main()) == ["row 1", "row 2"]


def test_a_mapping_is_read_by_one_kind_of_key_when_a_load_key_is_another_keys_cache_key() -> None:
    """key=lambda k: k + 1: load key 2 is load key 1's cache key. Before: load key 2 got
    load key 1's value (looked up by load key first), silently, and kept it."""

    @request_batch(key=lambda k: k + 1)
    def by_cache_key(keys: list[int]) -> dict[int, str]:
        return {k + 1: f"value of {k}" for k in keys}

    @request_batch(key=lambda k: k + 1)
    def by_load_key(keys: list[int]) -> dict[int, str]:
        return {k: f"value of {k}" for k in keys if k != 3}  # 3 absent: a KeyError

    @request_batch(key=lambda k: k + 1)
    def ambiguous(keys: list[int]) -> dict[int, str]:
        return {2: "whose?"}  # load key 2, or load key 1's cache key

    with request_scope():
        assert by_cache_key.load_many([1, 2]) == ["value of 1", "value of 2"]
        assert by_load_key.load_many([1, 2]) == ["value of 1", "value of 2"]
        with pytest.raises(KeyError, match="without key 3"):
            by_load_key.load_many([1, 2, 3])
        with pytest.raises(TypeError, match="as many of its keys by their load keys"):
            ambiguous.load_many([1, 2])


def test_a_mapping_that_makes_its_values_on_access_is_read_by_either_kind_of_key() -> None:
    """key=str.lower on keys already lower-case: load key and cache key are equal, so the
    two lookups' values (each made anew) are not a mix of kinds."""
    from collections.abc import Iterator, Mapping

    class Rows(Mapping[str, dict[str, str]]):
        def __init__(self, names: list[str]) -> None:
            self.names = names

        def __getitem__(self, name: str) -> dict[str, str]:
            if name not in self.names:
                raise KeyError(name)
            return {"name": name}  # decoded on each access

        def __iter__(self) -> Iterator[str]:
            return iter(self.names)

        def __len__(self) -> int:
            return len(self.names)

    @request_batch(key=str.lower)
    def users(names: list[str]) -> Rows:
        return Rows(names)

    with request_scope():
        assert users.load_many(["alice", "bob"]) == [{"name": "alice"}, {"name": "bob"}]


def test_a_fetch_whose_end_raises_leaves_nothing_in_the_threads_context() -> None:
    """A key whose hash raises once its batch function ran (a model being saved): its
    callers get its value, unstored (a RuntimeError failed the call until 6 December 2026,
    only TypeError was handled)."""
    from perrequest._active import within

    broken = threading.local()

    class Key:
        def __init__(self, v: int) -> None:
            self.v = v

        def __hash__(self) -> int:
            if getattr(broken, "on", False):
                raise RuntimeError("hash of a model being saved")
            return hash(self.v)

        def __eq__(self, other: object) -> bool:
            return type(other) is Key and other.v == self.v

    @request_batch
    def load(keys: list[Key]) -> list[int]:
        broken.on = True
        return [k.v for k in keys]

    with request_scope():
        for i in range(3):
            assert load.load(Key(i)) == i
            broken.on = False
        assert within.get() == ()  # a fetch left here would be carried by bind_scope


async def test_a_hit_whose_entry_another_thread_evicts_meanwhile_is_a_miss() -> None:
    """The state another thread's eviction leaves between the hit's two lookups (the
    entry found, its recency gone). Before: a bare KeyError from load()."""

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        return [f"u{k}" for k in keys]

    async with request_scope():
        assert await users.load(1) == "u1"
        store = current_store()
        entry = store._subs[users._spec][1]  # type: ignore[attr-defined]
        del store._order[entry[2]]
        assert await users.load(1) == "u1"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_loaders_under_anyio_backends(backend: str) -> None:
    """Under trio each call fetches what the store lacks by itself (no asyncio loop to
    batch a tick on), and caches it. Before: 'no running event loop' from every load."""
    calls: list[list[int]] = []

    @request_batch(max_batch_size=2)
    async def users(keys: list[int]) -> list[str | Exception]:
        calls.append(list(keys))
        return [ValueError(k) if k == 9 else f"u{k}" for k in keys]

    async def main() -> None:
        async with request_scope():
            users.prime(5, "primed")
            assert await users.load(1) == "u1"
            assert await users.load_many([1, 2, 3, 4, 5]) == ["u1", "u2", "u3", "u4", "primed"]
            assert await users.load(2) == "u2"
            with pytest.raises(ValueError):
                await users.load(9)
            info = users.cache_info()
            assert (info.hits, info.misses) == (3, 5)

    anyio.run(main, backend=backend)
    assert calls == [[1], [2, 3], [4], [9]]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_nothing_to_fetch_calls_no_batch_function(backend: str) -> None:
    """A load_many of stored keys under trio, and of no keys outside a scope, called the
    batch function with an empty list (a query per cached load_many, an ``IN ()``)."""
    calls: list[list[int]] = []

    @request_batch(outside_scope="call")
    async def users(keys: list[int]) -> list[str]:
        calls.append(list(keys))
        return [f"u{k}" for k in keys]

    @request_batch(outside_scope="call")
    def users_sync(keys: list[int]) -> list[str]:
        calls.append(list(keys))
        return [f"u{k}" for k in keys]

    async def main() -> None:
        assert await users.load_many([]) == [] and users_sync.load_many([]) == []
        async with request_scope():
            assert await users.load_many([1, 2]) == ["u1", "u2"]
            assert await users.load_many([2, 1]) == ["u2", "u1"]
            assert await users.load_many([]) == []

    anyio.run(main, backend=backend)
    assert calls == [[1, 2]]


def test_a_prime_while_trio_loads_the_key_is_kept() -> None:
    """Under trio (no batch to find the key in), a value primed while a load fetched the
    key was replaced by the fetched, older one: a load saw "new", a later one "old"."""
    db = {1: "old"}
    events: dict[str, anyio.Event] = {}

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        values = [db[k] for k in keys]
        events["fetched"].set()
        await events["release"].wait()
        return values

    async def first_load() -> None:
        await users.load(1)
        events["stored"].set()

    async def main() -> None:
        events.update(fetched=anyio.Event(), release=anyio.Event(), stored=anyio.Event())
        with anyio.fail_after(5):
            async with request_scope(), anyio.create_task_group() as tasks:
                tasks.start_soon(first_load)
                await events["fetched"].wait()  # it read "old", and is fetching
                db[1] = "new"
                users.prime(1, "new")
                assert await users.load(1) == "new"
                events["release"].set()
                await events["stored"].wait()  # the first load has stored what it fetched
                assert await users.load(1) == "new"  # before: "old"

    anyio.run(main, backend="trio")


def test_a_trio_load_many_cancelled_between_calls_keeps_and_counts_what_it_fetched() -> None:
    """Six keys, two per call, cancelled during the second call (move_on_after). Before:
    all six were counted as misses though four were asked for, and the first call's two
    values were dropped (the next loads fetched them again)."""
    calls: list[list[int]] = []

    @request_batch(max_batch_size=2)
    async def rows(keys: list[int]) -> list[int]:
        calls.append(keys)
        await anyio.sleep(0.05 if len(calls) == 1 else 10)
        return [k * 10 for k in keys]

    async def main() -> tuple[int, int, list[int]]:
        async with request_scope():
            with anyio.move_on_after(0.5):
                await rows.load_many(range(6))
            info = rows.cache_info()
            return info.misses, info.currsize, await rows.load_many([0, 1])

    misses, entries, again = anyio.run(main, backend="trio")
    assert calls == [[0, 1], [2, 3]]  # nothing fetched [0, 1] again
    assert (misses, entries, again) == (4, 2, [0, 10])  # before: 6 misses, no entries


async def test_chunks_of_one_batch_that_load_each_others_keys() -> None:
    """A tree loaded 2 keys per call, a parent in the other chunk: fetched by a call of
    its own, as a parent in the same chunk is. Before: each chunk waited for the other."""
    parent = {1: 4, 2: None, 3: 2, 4: None}

    @request_batch(max_batch_size=2)
    async def rows(ids: list[int]) -> list[tuple[int, int | None]]:
        out = []
        for i in ids:
            up = parent[i]
            if up is not None:
                await rows.load(up)
            out.append((i, up))
        return out

    async with request_scope():
        got = await asyncio.wait_for(rows.load_many([1, 2, 3, 4]), 5)
    assert got == [(1, 4), (2, None), (3, 2), (4, None)]


def test_a_long_scope_keeps_no_bookkeeping_of_loops_that_closed() -> None:
    """One asyncio.run per message in one scope; each message starts a load and fails
    without awaiting it. Before: one record per message (its closed loop, its task)."""

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        await asyncio.sleep(1)
        return keys

    async def message(i: int) -> None:
        rows.load(i)
        await asyncio.sleep(0)
        raise ValueError("the message fails")

    logging.getLogger("asyncio").disabled = True  # "Task was destroyed but it is pending"
    try:
        with request_scope(max_entries=100) as store:
            for i in range(30):
                with pytest.raises(ValueError):
                    asyncio.run(message(i))
            assert len(store._flights) <= 1  # the last message's, until the next batch
    finally:
        logging.getLogger("asyncio").disabled = False


def test_a_shutdown_after_the_request_does_not_call_the_batch_function_again() -> None:
    """asyncio.run's shutdown cancels a batch in flight after the request's scope ended:
    its waits are cancelled. Before: its keys went in a new batch, run outside the scope."""
    calls: list[tuple[list[int], bool]] = []

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        calls.append((list(keys), in_request_scope()))
        await asyncio.sleep(1)
        return keys

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("a sibling fails")

    async def main() -> None:
        async with request_scope():
            await asyncio.gather(rows.load(1), fails())

    logging.getLogger("asyncio").disabled = True
    try:
        with pytest.raises(ValueError):
            asyncio.run(main())
    finally:
        logging.getLogger("asyncio").disabled = False
    assert calls == [([1], True)]


async def test_a_batch_whose_callers_are_gone_runs_to_its_end() -> None:
    """The only caller times out and the scope closes while the batch awaits a future
    nothing else holds strongly. Before: the collector destroyed the batch task mid-call."""
    waiting: weakref.WeakValueDictionary[int, asyncio.Future[None]]
    waiting = weakref.WeakValueDictionary()
    finished: list[list[int]] = []
    loop = asyncio.get_running_loop()

    def answer(key: int) -> None:  # a client that keeps its pending replies weakly
        reply = waiting.get(key)
        if reply is not None and not reply.done():
            reply.set_result(None)

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        reply = waiting[keys[0]] = loop.create_future()
        threading.Timer(0.1, loop.call_soon_threadsafe, (answer, keys[0])).start()
        await reply
        finished.append(keys)
        return keys

    with request_scope(), pytest.raises(TimeoutError):
        await asyncio.wait_for(rows.load(1), 0.01)
    gc.collect()
    await asyncio.sleep(0.3)
    assert finished == [[1]]


async def test_a_batch_pending_when_its_request_ends_serves_a_task_that_outlived_it() -> None:
    """A task of the request loads a key and is still waiting when the scope closes (the
    batch is gathered, not yet called): the batch is called all the same, the task gets
    its value, and nothing is stored in the closed store."""
    calls: list[list[int]] = []

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        calls.append(list(keys))
        return [k * 10 for k in keys]

    async def handler_task() -> int:
        return await rows.load(7)

    async with request_scope() as store:
        late = asyncio.create_task(handler_task())
        await asyncio.sleep(0)  # the task has asked: the batch is pending
    assert store.closed
    assert await asyncio.wait_for(late, 5) == 70
    assert calls == [[7]]
    assert len(store) == 0


def _sorting(keys: list[int]) -> list[int]:
    keys.sort()  # then returns the values in its own, sorted, order
    return [k * 10 for k in keys]


def _draining(keys: list[int]) -> list[int]:
    values = [k * 10 for k in keys]
    keys.clear()  # a queue drained as it is read
    return values


def _converting_and_sorting(keys: list[Any]) -> list[int]:
    keys[:] = sorted(int(k) for k in keys)  # new objects, in another order
    return [k * 10 for k in keys]


def _sorting_to_a_mapping(keys: list[int]) -> dict[int, int]:
    keys.sort()
    return {k: k * 10 for k in keys}


CHANGING = [_sorting, _draining, _converting_and_sorting]


@pytest.mark.parametrize("body", [*CHANGING, _sorting_to_a_mapping])
def test_a_sync_batch_function_that_changes_its_list_of_keys(body: Any) -> None:
    """With a sequence of values, which value is whose is then unknown: every key fails
    with a TypeError saying so (a mapping is read by key). Before: sorting stored key 3
    with key 1's value, and draining raised a bare ValueError."""
    rows = request_batch(body)
    with request_scope():
        if body is _sorting_to_a_mapping:
            assert rows.load_many([3, 1, 2]) == [30, 10, 20]
        else:
            for _ in range(2):  # a failure is not cached: asked again, and refused again
                with pytest.raises(TypeError, match=r"changed the list of keys it was given"):
                    rows.load_many([3, 1, 2])


@pytest.mark.parametrize("body", [*CHANGING, _sorting_to_a_mapping])
async def test_an_async_batch_function_that_changes_its_list_of_keys(body: Any) -> None:
    """Before: the batch's end raised inside a loop callback and both loads waited for
    ever (draining), or key 3 got key 1's value (sorting)."""

    @request_batch
    async def rows(keys: list[int]) -> Any:
        return body(keys)

    async with request_scope():
        loads = asyncio.gather(rows.load(3), rows.load(1), return_exceptions=True)
        outcomes = await asyncio.wait_for(loads, 5)
        if body is _sorting_to_a_mapping:
            assert outcomes == [30, 10]
        else:
            assert [type(outcome) for outcome in outcomes] == [TypeError, TypeError]
            assert "changed the list of keys" in str(outcomes[0])


async def test_a_list_of_values_changed_after_the_batch_returned_it_changes_nothing() -> None:
    """A buffer reused from call to call (max_batch_size), or cleared by a callback after
    the return: the values were read when the call ended. Before: the waiters hung (the
    end's zip raised in a loop callback), or got another call's values."""
    buffer: list[str] = []

    @request_batch(max_batch_size=2)
    async def rows(keys: list[int]) -> list[str]:
        buffer[:] = [f"row{k}" for k in keys]
        asyncio.get_running_loop().call_soon(buffer.clear)
        return buffer

    async with request_scope():
        for keys in ([1, 2, 3], [4, 5, 6, 7]):
            loads = asyncio.gather(*(rows.load(k) for k in keys))
            assert await asyncio.wait_for(loads, 5) == [f"row{k}" for k in keys]


async def test_a_value_whose_class_cannot_be_read_is_a_value_not_a_hang() -> None:
    """Django's SimpleLazyObject whose setup fails raises from ``__class__``: failures are
    told by ``type()``, which runs no code of the value. Before: ``isinstance`` raised in
    the batch's end, a loop callback, and every waiter hung."""

    class Lazy:
        @property  # type: ignore[misc]
        def __class__(self) -> type:
            raise RuntimeError("setup failed")

    lazy = Lazy()

    @request_batch
    async def rows(keys: list[int]) -> list[object]:
        return [lazy for _ in keys]

    async with request_scope():
        loads = asyncio.gather(rows.load(1), rows.load(2))
        assert await asyncio.wait_for(loads, 5) == [lazy, lazy]
        assert await asyncio.wait_for(rows.load_many([3]), 5) == [lazy]


async def test_a_task_factory_that_raises_fails_the_batch_instead_of_stranding_it() -> None:
    """The batch's task is made in a loop callback: a factory that raises there (a tracer
    at its limit) fails the keys as a failed call would. Before: they waited for ever."""
    calls: list[list[int]] = []

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        calls.append(keys)
        return keys

    loop = asyncio.get_running_loop()

    def refusing(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        raise RuntimeError("task factory refuses")

    async with request_scope():
        loop.set_task_factory(refusing)
        try:
            with pytest.raises(RuntimeError, match="task factory refuses"):
                await asyncio.wait_for(rows.load(1), 5)
        finally:
            loop.set_task_factory(None)
        assert await asyncio.wait_for(rows.load(1), 5) == 1  # not cached: asked again
    assert calls == [[1]]
