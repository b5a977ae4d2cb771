"""Single-flight at its edges: storing a value that raises, writes re-entered from a
key's ``__hash__``, restarts, invalidation in flight, cycles. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

import perrequest
from perrequest import bind_scope, request_memo, request_scope

WAIT = 5.0  # seconds: long enough for a slow machine, short enough to fail a hang


async def give_up(awaitable: Any) -> None:
    """A caller that gives up waiting, as ``asyncio.wait_for(awaitable, 0.0001)`` would,
    without the millisecond the event loop's timer takes to fire (3,000 of them were 3 s):
    the awaitable runs as a task of its own until it waits, a few loop turns, then it is
    cancelled and its cancellation awaited. Asserts that it was still waiting."""
    task = asyncio.ensure_future(awaitable)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


class Key:
    """A well-behaved key."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other.n == self.n


class Ref:
    """Hashes like ``Key``; its ``__eq__`` is the common sloppy one, which raises
    AttributeError against anything without ``.id``."""

    def __init__(self, id: int) -> None:
        self.id = id

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return self.id == other.id  # type: ignore[attr-defined,no-any-return]


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt: a BaseException that is not an Exception."""


# -- 1. storing the computed value raises: no waiter is stranded ----------------------------


@pytest.mark.parametrize("plain", [False, True], ids=["generated", "closure"])
def test_a_waiting_thread_gets_the_error_when_storing_the_value_raises(plain: bool) -> None:
    """Thread A computes f(Key(5)), thread B waits; meanwhile f(Ref(5)) is stored, so A's
    store compares Ref(5) == Key(5), which raises. B gets that error instead of a hang."""
    go = threading.Event()
    options: dict[str, Any] = {"key": lambda x: x} if plain else {}

    @request_memo(**options)
    def f(x: object) -> str:
        if isinstance(x, Key):
            assert go.wait(WAIT)
        return type(x).__name__

    with request_scope(), ThreadPoolExecutor(2) as pool:
        a = pool.submit(contextvars.copy_context().run, f, Key(5))
        until(lambda: f.cache_info().misses == 1)
        b = pool.submit(contextvars.copy_context().run, f, Key(5))
        until(lambda: f.cache_info().hits == 1)  # B waits for A
        assert f(Ref(5)) == "Ref"
        go.set()
        for future in (a, b):
            with pytest.raises(AttributeError, match="no attribute 'id'"):
                future.result(timeout=WAIT)


async def test_a_waiting_task_gets_the_error_when_storing_the_value_raises() -> None:
    go = asyncio.Event()

    @request_memo
    async def f(x: object) -> str:
        if isinstance(x, Key):
            await go.wait()
        return type(x).__name__

    async with request_scope():
        a = asyncio.create_task(f(Key(5)))
        await asyncio.sleep(0)
        b = asyncio.create_task(f(Key(5)))
        await asyncio.sleep(0)
        assert f.cache_info()[:2] == (1, 1)  # B waits for A
        assert await f(Ref(5)) == "Ref"
        go.set()
        done, _ = await asyncio.wait([a, b], timeout=WAIT)
        assert done == {a, b}
        for task in (a, b):
            with pytest.raises(AttributeError, match="no attribute 'id'"):
                task.result()


def test_an_interrupt_while_storing_hands_the_waiters_the_value() -> None:
    """A BaseException raised while storing is the computing caller's own business: the
    value was computed, so a waiter gets it."""
    go = threading.Event()
    armed = threading.Event()

    class Touchy(Key):
        __hash__ = Key.__hash__

        def __eq__(self, other: object) -> bool:
            if armed.is_set() and threading.current_thread().name.startswith("A"):
                raise Interrupt
            return super().__eq__(other)

    @request_memo
    def f(x: Key) -> int:
        if threading.current_thread().name.startswith("A"):
            assert go.wait(WAIT)
        return x.n

    with request_scope():
        a_result: Future[int] = Future()
        b_result: Future[int] = Future()

        def run(target: Future[int]) -> None:
            try:
                target.set_result(f(Touchy(1)))
            except BaseException as exc:
                target.set_exception(exc)

        a = threading.Thread(target=bind_scope(run), args=(a_result,), name="A")
        a.start()
        until(lambda: f.cache_info().misses == 1)
        b = threading.Thread(target=bind_scope(run), args=(b_result,), name="B")
        b.start()
        until(lambda: f.cache_info().hits == 1)
        f(Touchy(1 + sys.hash_info.modulus))  # hashes like Touchy(1): a collision
        armed.set()
        go.set()
        with pytest.raises(Interrupt):
            a_result.result(timeout=WAIT)
        assert b_result.result(timeout=WAIT) == 1
        a.join(WAIT)
        b.join(WAIT)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
@pytest.mark.parametrize("first", [True, False], ids=["first-miss", "later-miss"])
@pytest.mark.parametrize("plain", [False, True], ids=["generated", "closure"])
def test_a_signal_while_the_computing_thread_waits_for_the_lock_strands_no_waiter(
    plain: bool, first: bool
) -> None:
    """Ctrl-C (here: a signal whose handler raises, in the main thread) while the computing
    caller waits for the store's lock to store its value interrupts that wait. The lock
    is not taken, and the waiter in the pool still gets an outcome: it is not left
    waiting forever (nor is the pool's shutdown, nor the interpreter's exit)."""
    options: dict[str, Any] = {"key": lambda x: x} if plain else {}
    locked, unlock = threading.Event(), threading.Event()

    class Holding(Key):
        """A helper key whose hash, once armed, blocks: the writer holds the lock."""

        hashes = 0
        __eq__ = Key.__eq__

        def __hash__(self) -> int:
            if threading.current_thread().name == "holder":
                Holding.hashes += 1
                if Holding.hashes == 2:  # the first is checked before the lock is taken
                    locked.set()
                    assert unlock.wait(WAIT)
            return hash(self.n)

    @request_memo(**options)
    def f(x: int) -> int:
        if x == 5 and threading.current_thread() is threading.main_thread():
            waiter.append(pool.submit(contextvars.copy_context().run, f, 5))
            until(lambda: f.cache_info().hits == 1)  # the pool's thread waits for this call
            holder.start()  # a write that takes the store's lock, and keeps it
            assert locked.wait(WAIT)
            # The main thread is about to block on the lock: interrupt it there (the
            # handler then lets the writer go).
            main = threading.main_thread().ident
            threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGUSR1)).start()
        return x

    def interrupt(signum: int, frame: object) -> None:
        unlock.set()
        raise Interrupt

    waiter: list[Future[int]] = []
    pool = ThreadPoolExecutor(1)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with request_scope():
            if not first:
                f(1)  # f's counter and dict exist: the generated miss path
            holder = threading.Thread(
                target=contextvars.copy_context().run,
                args=(perrequest.set, Holding(0), 0),
                name="holder",
            )
            with pytest.raises(Interrupt):
                f(5)  # computed here, in the main thread, where signals are handled
            unlock.set()
            holder.join(WAIT)
            assert waiter[0].result(timeout=WAIT) == 5
            assert f(5) == 5
    finally:
        unlock.set()
        signal.signal(signal.SIGUSR1, previous)
        pool.shutdown(wait=False)  # a stranded waiter would hang a waiting shutdown


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_a_signal_in_a_thread_waiting_for_another_reaches_it_and_strands_nobody() -> None:
    """Celery's soft time limit (a signal whose handler raises) in a thread that waits for
    another's computation: it gets the handler's exception, the computing thread ends,
    and the key is answered after. (Waiting in ``Future.result(timeout)``, it could get
    "cannot release un-acquired lock"; tests/test_signals_in_waits.py times the signal
    at random.)"""
    main = threading.main_thread().ident
    assert main is not None

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupt

    @request_memo
    def f(x: int) -> int:
        computing.set()
        until(lambda: f.cache_info().hits == 1)  # the main thread waits for this call
        time.sleep(0.1)
        signal.pthread_kill(main, signal.SIGUSR1)
        time.sleep(0.1)
        return x

    computing = threading.Event()
    pool = ThreadPoolExecutor(1)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with request_scope():
            computed = pool.submit(contextvars.copy_context().run, f, 5)
            assert computing.wait(WAIT)
            with pytest.raises(Interrupt):
                f(5)
            assert computed.result(timeout=WAIT) == 5
            assert f(5) == 5 and f.cache_info().misses == 1
    finally:
        signal.signal(signal.SIGUSR1, previous)
        pool.shutdown(wait=False)


@pytest.mark.parametrize("plain", [False, True], ids=["generated", "closure"])
def test_a_raising_eq_raises_at_the_lookup_before_the_function_runs(plain: bool) -> None:
    """As with functools.lru_cache: a key whose ``__eq__`` raises against a stored key
    raises that error from the call, and the function is not run for it."""
    calls: list[str] = []
    options: dict[str, Any] = {"key": lambda x: x} if plain else {}

    @request_memo(**options)
    def f(x: object) -> str:
        calls.append(type(x).__name__)
        return calls[-1]

    with request_scope():
        assert f(Ref(5)) == "Ref"
        with pytest.raises(AttributeError, match="no attribute 'id'"):
            f(Key(5))  # the stored Ref(5) == Key(5) raises
        assert calls == ["Ref"]
        assert f.cache_info()[:2] == (0, 1)  # the refused call counts as neither
        assert f(Ref(5)) == "Ref"


async def test_a_raising_eq_raises_at_the_lookup_async() -> None:
    calls: list[str] = []

    @request_memo
    async def f(x: object) -> str:
        calls.append(type(x).__name__)
        return calls[-1]

    async with request_scope():
        assert await f(Ref(5)) == "Ref"
        with pytest.raises(AttributeError, match="no attribute 'id'"):
            await f(Key(5))
        assert calls == ["Ref"]


# -- 2. a write re-entered from a key's __hash__ while the store stores --------------------


class Writer:
    """Its ``__hash__`` writes to the active store on its ``fire_at``-th call."""

    fire_at: int | None = None
    count = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        Writer.count += 1
        if Writer.count == Writer.fire_at:
            perrequest.set(("side", Writer.count), 1)
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Writer) and other.n == self.n


def _consistent(store: perrequest.MemoStore) -> None:
    """What the store says it holds is what iterating it finds, within its bound, and
    more writes (which evict) work."""
    assert len(store) == len(list(store)) <= store.max_entries  # type: ignore[operator]
    for i in range(5):
        perrequest.set(("more", i), i)
    assert len(store) == len(list(store)) == store.max_entries


@pytest.mark.parametrize("fire_at", range(1, 9))
@pytest.mark.parametrize("plain", [False, True], ids=["generated", "closure"])
def test_a_write_from_a_keys_hash_while_storing_keeps_the_store_whole(
    fire_at: int, plain: bool
) -> None:
    """Whichever hash call of a miss writes to the store (evicting the function's last
    entry, which drops its dict), the value is stored where later calls find it."""
    calls: list[int] = []
    options: dict[str, Any] = {"key": lambda x: x} if plain else {}

    @request_memo(**options)
    def f(x: Writer) -> int:
        calls.append(x.n)
        return x.n

    with request_scope(max_entries=2) as store:
        f(Writer(1))  # f's only entry, the least recently used
        perrequest.set("h", 0)  # the store is full
        Writer.count, Writer.fire_at = 0, fire_at
        try:
            assert f(Writer(2)) == 2
        finally:
            Writer.fire_at = None
        assert f(Writer(2)) == 2
        assert calls == [1, 2]
        _consistent(store)


@pytest.mark.parametrize("fire_at", range(1, 6))
def test_a_write_from_a_keys_hash_in_a_store_with_room_keeps_the_store_whole(
    fire_at: int,
) -> None:
    """The common miss stores a new key itself (the generated wrapper); a write from the
    key's ``__hash__`` meanwhile rebuilds the order, and both entries are found."""
    calls: list[int] = []

    @request_memo
    def f(x: Writer) -> int:
        calls.append(x.n)
        return x.n

    with request_scope(max_entries=100) as store:
        f(Writer(1))  # f's dict exists: the next miss takes the written-out path
        Writer.count, Writer.fire_at = 0, fire_at
        try:
            assert f(Writer(2)) == 2
        finally:
            Writer.fire_at = None
        fired = fire_at <= Writer.count  # the miss hashes the key four times
        assert f(Writer(2)) == 2 and f(Writer(1)) == 1
        assert calls == [1, 2]
        assert perrequest.get(("side", fire_at)) == (1 if fired else None)
        assert len(store) == len(list(store)) == 2 + fired
        for i in range(200):  # the order still evicts what it should, to the bound
            perrequest.set(("more", i), i)
        assert len(store) == len(list(store)) == 100


@pytest.mark.parametrize("room", [True, False], ids=["with-room", "full"])
@pytest.mark.parametrize("fire_at", range(1, 6))
def test_a_key_whose_hash_closes_the_scope_while_storing_leaves_nothing_in_it(
    fire_at: int, room: bool
) -> None:
    """A closed store holds no keys: one closed while a miss stores (a key's own code,
    a collection that finalizes a generator holding the scope) stores nothing."""
    scope = request_scope(max_entries=100 if room else 2)
    store = scope.__enter__()
    closer = {"at": 0, "count": 0}

    class Closing:
        def __hash__(self) -> int:
            closer["count"] += 1
            if closer["count"] == closer["at"]:
                scope.__exit__(None, None, None)
            return 7

    @request_memo
    def f(x: object) -> int:
        return 1

    f(0)  # f's dict exists
    perrequest.set("h", 0)
    closer["at"] = fire_at
    key = Closing()
    f(key)
    if not store.closed:
        scope.__exit__(None, None, None)
    assert store.closed and len(store) == len(list(store)) == 0
    assert len(store._order) == 0 and store._subs is None


def test_a_memoized_helper_called_from_hash_keeps_the_store_whole() -> None:
    @request_memo
    def digest(n: int) -> int:
        return n * 7

    class Hashed:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            return digest(self.n)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Hashed) and other.n == self.n

    @request_memo
    def f(x: Hashed) -> int:
        return x.n

    with request_scope(max_entries=2) as store:
        for n in range(20):  # every miss evicts, digest's entries among them
            assert f(Hashed(n)) == n
            assert len(store) == len(list(store)) <= 2
        _consistent(store)


def test_a_write_from_a_keys_hash_while_another_thread_hits_keeps_the_store_whole() -> None:
    """Rebuilding the recency order after a key's own code wrote to the store must not
    trip over hits in another thread, which reorder it without the lock."""

    class Sneaky(Key):
        def __hash__(self) -> int:
            perrequest.set(("side", self.n % 7), 1)  # a write while storing: a resync
            return hash(self.n)

    @request_memo
    def load(x: int) -> int:
        return x

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    stop = threading.Event()
    try:
        with request_scope(max_entries=400) as store:
            for i in range(300):
                load(i)

            def hitter() -> None:
                i = 0
                while not stop.is_set():
                    load(i % 300)
                    i += 1

            thread = threading.Thread(target=contextvars.copy_context().run, args=(hitter,))
            thread.start()
            try:
                deadline = time.monotonic() + 1.5
                i = 0
                while time.monotonic() < deadline:
                    store[Sneaky(i)] = i
                    i += 1
            finally:
                stop.set()
                thread.join()
            _consistent(store)
    finally:
        sys.setswitchinterval(interval)


def test_a_delete_from_a_keys_hash_keeps_the_store_whole() -> None:
    armed = []

    class Deleting(Key):
        __hash__ = Key.__hash__

        def __eq__(self, other: object) -> bool:
            if armed:
                armed.clear()
                perrequest.delete("h")
                f.cache_clear()
            return super().__eq__(other)

    @request_memo
    def f(x: Key) -> int:
        return x.n

    with request_scope(max_entries=3) as store:
        f(Deleting(1))
        perrequest.set("h", 0)
        armed.append(True)
        assert f(Deleting(1 + sys.hash_info.modulus)) == 1 + sys.hash_info.modulus
        assert f.cache_info().currsize == len(store) == len(list(store))
        _consistent(store)


# -- 4. after the computing caller is interrupted, one waiter computes ----------------------


async def test_after_a_cancelled_computation_one_waiter_computes_and_the_others_join() -> None:
    runs: list[int] = []

    @request_memo
    async def load(x: int) -> int:
        runs.append(x)
        if len(runs) == 1:
            await asyncio.sleep(WAIT)  # the first computation: its caller is cancelled
        return x  # the restarted one is quick

    async with request_scope():
        first = asyncio.create_task(load(1))
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(load(1)) for _ in range(8)]
        await asyncio.sleep(0)
        first.cancel()
        assert await asyncio.wait_for(asyncio.gather(*waiters), WAIT) == [1] * 8
        assert len(runs) == 2  # the cancelled computation and one restart
        assert load.cache_info()[:2] == (7, 2)


def test_after_a_computing_thread_dies_one_waiter_computes() -> None:
    runs: list[str] = []
    go = threading.Event()

    @request_memo
    def load(x: int) -> int:
        runs.append(threading.current_thread().name)
        if len(runs) == 1:
            assert go.wait(WAIT)
            raise Interrupt  # SystemExit/KeyboardInterrupt in the computing thread
        return x  # the restarted computation is quick: later waiters find its value

    def dying() -> None:
        with pytest.raises(Interrupt):
            load(1)

    with request_scope(), ThreadPoolExecutor(4) as pool:
        first = threading.Thread(target=bind_scope(dying))
        first.start()
        until(lambda: load.cache_info().misses == 1)
        waiters = [pool.submit(bind_scope(load), 1) for _ in range(4)]
        until(lambda: load.cache_info().hits == 4)
        go.set()
        assert [w.result(timeout=WAIT) for w in waiters] == [1] * 4
        first.join(WAIT)
        assert len(runs) == 2


# -- 3. a delete invalidates what is in flight: read your writes ------------------------------


async def test_a_read_after_cache_delete_does_not_join_a_computation_started_before() -> None:
    db = {1: "old name"}
    read = asyncio.Event()

    @request_memo
    async def user(uid: int) -> str:
        row = db[uid]
        read.set()
        await asyncio.sleep(0.05)  # more I/O after reading the row
        return row

    async with request_scope():
        page = asyncio.create_task(user(1))  # in flight, with the old row
        joined = asyncio.create_task(user(1))  # waits for the page's computation
        await asyncio.wait_for(read.wait(), WAIT)
        db[1] = "new name"
        assert user.cache_delete(1) is False  # nothing was stored yet
        assert await asyncio.wait_for(user(1), WAIT) == "new name"  # read your write
        assert await asyncio.wait_for(page, WAIT) == "old name"  # its own caller gets it
        # A caller that was waiting for it starts again: it joins the fresh computation.
        assert await asyncio.wait_for(joined, WAIT) == "new name"
        assert await user(1) == "new name"  # the stale value was not stored
        assert user.cache_info().currsize == 1


@pytest.mark.parametrize("how", ["cache_clear", "cache_delete", "store.clear"])
def test_a_thread_reading_after_a_delete_computes_afresh(how: str) -> None:
    db = {1: "old"}
    read, go = threading.Event(), threading.Event()

    @request_memo
    def row(uid: int) -> str:
        value = db[uid]
        if threading.current_thread().name == "page":
            read.set()
            assert go.wait(WAIT)
        return value

    with request_scope() as store:
        page: Future[str] = Future()
        worker = threading.Thread(target=bind_scope(lambda: page.set_result(row(1))), name="page")
        worker.start()
        assert read.wait(WAIT)
        db[1] = "new"
        {"cache_clear": row.cache_clear, "store.clear": store.clear}.get(
            how, lambda: row.cache_delete(1)
        )()
        assert row(1) == "new"
        go.set()
        # The stale computation stores nothing; its caller gets the value stored since
        # (one value per key in the request; before, its own "old").
        assert page.result(timeout=WAIT) == "new"
        worker.join(WAIT)
        assert row(1) == "new"


def test_get_or_set_after_delete_does_not_join_the_stale_factory() -> None:
    read, go = threading.Event(), threading.Event()
    values = iter(["old", "new"])

    def slow_factory() -> str:
        value = next(values)
        read.set()
        assert go.wait(WAIT)
        return value

    with request_scope() as store:
        page: Future[str] = Future()
        worker = threading.Thread(
            target=bind_scope(lambda: page.set_result(store.get_or_set("k", slow_factory)))
        )
        worker.start()
        assert read.wait(WAIT)
        perrequest.delete("k")
        go.set()
        assert store.get_or_set("k", lambda: next(values)) == "new"
        assert page.result(timeout=WAIT) == "new"  # the value stored since; before: "old"
        worker.join(WAIT)
        assert store["k"] == "new"


# -- 7. a sync memo that returns a generator is refused ------------------------------------------


def _logged(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A plain decorator, which hides from inspect that ``fn`` is a generator function."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def _listed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator that consumes the generator: memoizing it is fine."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> list[Any]:
        return list(fn(*args, **kwargs))

    return wrapper


@pytest.mark.parametrize("plain", [False, True], ids=["generated", "closure"])
def test_a_memo_returning_a_generator_is_refused_at_call_time(plain: bool) -> None:
    options: dict[str, Any] = {"key": lambda n: n} if plain else {}

    @request_memo(**options)
    @_logged
    def rows(n: int) -> Any:
        yield from range(n)

    @request_memo(**options)
    def expression(n: int) -> Any:
        return (i for i in range(n))

    @request_memo(**options)
    @_listed
    def listed(n: int) -> Any:
        yield from range(n)

    with request_scope():
        for memo in (rows, expression):
            with pytest.raises(TypeError, match="returned a generator"):
                memo(3)
            assert memo.cache_info().currsize == 0
        assert listed(3) == listed(3) == [0, 1, 2]


# -- 5. what the cycle check catches (docs/semantics.md, Threads) ------------------------------


async def test_recursion_on_the_same_key_in_one_task_computes_again() -> None:
    @request_memo(key=lambda x, depth=0: x)
    async def node(x: int, depth: int = 0) -> tuple[str, ...]:
        if depth:
            return ("leaf",)
        return ("node", *await node(x, depth + 1))

    async with request_scope():
        # The inner call stored its value first: the outer returns it (one value per key,
        # as for threads: test_memo_threads); before, it returned its own, unstored.
        assert await asyncio.wait_for(node(1), WAIT) == ("leaf",)
        assert await node(1) == ("leaf",)


@pytest.mark.parametrize("kind", ["executor", "to_thread"])
def test_two_callers_computing_each_others_keys_finish(kind: str) -> None:
    """a(1) needs b(1) and b(1) needs a(1), started at once from two threads (tasks):
    the second waiter would close a cycle of single-flight waits, so it computes; the value
    it stores stays (one value per key), and is what the other caller gets."""
    both = threading.Barrier(2, timeout=WAIT)

    @request_memo(key=lambda x, depth=0: x)
    def a(x: int, depth: int = 0) -> str:
        if depth:
            return "a"
        both.wait()  # b(1) is being computed by the other caller
        return "a" + b(x, depth + 1)  # waits for it

    @request_memo(key=lambda x, depth=0: x)
    def b(x: int, depth: int = 0) -> str:
        if depth:
            return "b"
        both.wait()
        return "b" + a(x, depth + 1)  # would wait for a(1), which waits for b(1)

    async def tasks() -> list[str]:
        return list(
            await asyncio.wait_for(
                asyncio.gather(asyncio.to_thread(a, 1), asyncio.to_thread(b, 1)), WAIT
            )
        )

    with request_scope():
        if kind == "executor":
            with ThreadPoolExecutor(2) as pool:
                got = [
                    f.result(WAIT)
                    for f in (pool.submit(bind_scope(a), 1), pool.submit(bind_scope(b), 1))
                ]
        else:
            got = asyncio.run(tasks())
        again = [a(1), b(1)]
    # One of them computed the other's key; the caller that waited for it then ends with
    # its key stored already: it returns that value (before: ["ab", "bab"], ["aba", "ba"]).
    assert sorted(got) in (["ab", "b"], ["a", "ba"]) and got == again


async def test_two_tasks_computing_each_others_keys_finish() -> None:
    both = asyncio.Barrier(2)

    @request_memo(key=lambda x, depth=0: x)
    async def a(x: int, depth: int = 0) -> str:
        if depth:
            return "a"
        await both.wait()
        return "a" + await b(x, depth + 1)

    @request_memo(key=lambda x, depth=0: x)
    async def b(x: int, depth: int = 0) -> str:
        if depth:
            return "b"
        await both.wait()
        return "b" + await a(x, depth + 1)

    async with request_scope():
        got = await asyncio.wait_for(asyncio.gather(a(1), b(1)), WAIT)
        again = [await a(1), await b(1)]
    assert sorted(got) in (["ab", "b"], ["a", "ba"]) and got == again  # as with threads


# -- second audit: the invalidation, the shared tier, re-entered writes ------------------------


async def test_a_read_after_cache_delete_does_not_join_the_shared_tiers_old_computation() -> None:
    """The shared tier computes in flight too: a delete invalidates it there as well, so the
    read after an update gets the new value, and neither tier keeps the old one."""
    import cachetools

    db = {1: "old"}

    @request_memo(shared=cachetools.LRUCache(100))
    async def user(uid: int) -> str:
        name = db[uid]
        await asyncio.sleep(0.1)
        return name

    async with request_scope():
        first = asyncio.ensure_future(user(1))
        await asyncio.sleep(0.01)
        db[1] = "new"
        user.cache_delete(1)
        assert await asyncio.wait_for(user(1), WAIT) == "new"
        assert await asyncio.wait_for(first, WAIT) == "old"  # its own caller's
        assert await user(1) == "new"
    async with request_scope():
        assert await user(1) == "new"  # the next request reads the new value too


async def test_a_waiter_of_a_deleted_computation_is_never_stranded() -> None:
    """A delete restarts whoever waits for the computation it invalidates, at once: nothing
    that happens to that computation afterwards (a key whose __eq__ raises at unregistering)
    can leave them waiting."""

    @request_memo
    async def f(x: Any) -> str:
        await asyncio.sleep(0.1 if isinstance(x, Ref) else 0.3)
        return type(x).__name__

    async with request_scope() as store:
        owner = asyncio.ensure_future(f(Ref(5)))
        await asyncio.sleep(0.01)
        waiter = asyncio.ensure_future(f(Ref(5)))
        await asyncio.sleep(0.01)
        f.cache_delete(Ref(5))
        other = asyncio.ensure_future(f(5))  # the same hash, in flight: Ref's __eq__ raises
        await asyncio.sleep(0.01)
        for task in (owner, waiter, other):
            with contextlib.suppress(AttributeError):  # Ref's __eq__ against an int
                await asyncio.wait_for(task, WAIT)
    assert store.closed and not store._flights


def test_a_key_whose_hash_writes_to_the_store_keeps_a_bounded_function_consistent() -> None:
    """Rebuilding the recency order must hash no key: an OrderedDict (a function with a
    bound of its own) looks keys up again when iterated."""
    writes = iter(["clear", "clear", "set", "call", "none", "clear"])

    class Key:
        def __init__(self, value: int) -> None:
            self.value = value

        def __hash__(self) -> int:
            what = next(writes, "none")
            if what == "set":
                perrequest.set(("seen", self.value), 1)
            elif what == "call":
                other(self.value)
            elif what == "clear":
                other.cache_clear()
            return hash(self.value)

        def __eq__(self, o: object) -> bool:
            return isinstance(o, Key) and o.value == self.value

    @request_memo
    def other(i: int) -> int:
        return i

    @request_memo(max_entries=2)
    def bounded(key: Key) -> int:
        return key.value

    with request_scope() as store:
        assert [bounded(Key(i)) for i in range(4)] == [0, 1, 2, 3]
        held = sum(len(dict.items(sub)) for sub in (store._subs or {}).values())
        assert held == len(store) == len(store._order)


def test_a_write_while_get_or_set_computes_is_not_overwritten() -> None:
    go = threading.Event()

    def factory() -> str:
        assert go.wait(WAIT)
        return "old"

    with request_scope() as store, ThreadPoolExecutor(1) as pool:
        run = contextvars.copy_context().run
        pending = pool.submit(run, perrequest.get_or_set, "user:1", factory)
        deadline = time.monotonic() + WAIT
        while not store._flights and time.monotonic() < deadline:
            time.sleep(0.001)
        perrequest.set("user:1", "new")
        go.set()
        assert pending.result(WAIT) == "new"  # the value written since (one value per key)
        assert perrequest.get("user:1") == "new"


def test_a_shared_memo_returning_a_generator_is_refused_by_its_name() -> None:
    import cachetools

    @request_memo(shared=cachetools.LRUCache(10))
    def numbers(n: int) -> Any:
        return (i for i in range(n))

    with request_scope(), pytest.raises(TypeError, match=r"'.*numbers' returned a generator"):
        numbers(3)


class Row:
    """Hashed by its primary key, which saving it assigns (docs/batching.md)."""

    next_pk = 10**9

    def __init__(self, temp: int) -> None:
        self.pk = temp

    def __hash__(self) -> int:
        return hash(self.pk)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Row) and other.pk == self.pk

    def save(self) -> int:
        Row.next_pk += 1
        self.pk = Row.next_pk
        return self.pk


def test_computations_that_change_their_keys_hash_leave_no_record_behind() -> None:
    """Each record was looked for under the key's new hash, and stayed: a long scope with
    max_entries=100 held every saved row (an audit of 5 December 2026: 50,000 records,
    72 MB, kept after the scope closed)."""

    @request_memo
    def save(row: Row) -> int:
        return row.save()

    @request_memo
    async def save_async(row: Row) -> int:
        return row.save()

    @perrequest.request_batch
    def save_many(rows: list[Row]) -> list[int]:
        return [row.save() for row in rows]

    with request_scope(max_entries=100) as store:
        for i in range(300):
            save(Row(-i))
            save_many.load(Row(-i))
        assert len(store) == 100 and not store._flights
    assert not store._flights

    async def main() -> perrequest.MemoStore:
        async with request_scope(max_entries=100) as store:
            for i in range(300):
                await save_async(Row(-i))
            assert not store._flights
        return store

    assert not asyncio.run(main())._flights


def test_a_thread_waiting_for_a_key_whose_hash_its_computation_changes_gets_the_value() -> None:
    """The record the waiter joined is found by identity: it gets the value at once."""
    started, go = threading.Event(), threading.Event()

    @request_memo
    def save(row: Row) -> int:
        started.set()
        go.wait(WAIT)
        return row.save()

    row = Row(-1)
    with request_scope() as store, ThreadPoolExecutor(2) as pool:
        first = pool.submit(bind_scope(save), row)
        started.wait(WAIT)
        second = pool.submit(bind_scope(save), row)
        until(lambda: save.cache_info().hits == 1)  # it waits for the first
        go.set()
        start = time.monotonic()
        assert first.result(WAIT) == second.result(WAIT) == row.pk
        assert time.monotonic() - start < 0.9  # not after a second's look again
        assert not store._flights


async def test_a_caller_after_the_hash_changed_does_not_hide_the_first_record() -> None:
    """A computes and saves the row (its hash changes); W joined A before the save, B
    calls after it and computes alongside under the new hash. Before: A's end popped B's
    record under the new hash, took itself for invalidated and left its own record: W
    waited two seconds' looks, then computed again; a record stayed per save."""
    joined, saved, go, go_after = (asyncio.Event() for _ in range(4))
    calls = 0

    @request_memo
    async def save(row: Row) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await joined.wait()
            row.save()
            saved.set()
            await go.wait()
        else:
            await go_after.wait()  # still computing as the first ends
        return row.pk

    row = Row(-1)
    async with request_scope() as store:
        first = asyncio.create_task(save(row))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(save(row))  # joins the first
        await asyncio.sleep(0)
        assert save.cache_info().hits == 1
        joined.set()
        await asyncio.wait_for(saved.wait(), WAIT)
        after = asyncio.create_task(save(row))  # the row hashes anew: computes alongside
        await asyncio.sleep(0.01)
        go.set()
        start = time.monotonic()
        assert await asyncio.wait_for(asyncio.gather(first, waiter), WAIT) == [row.pk] * 2
        assert time.monotonic() - start < 0.9  # before: ~2 s
        go_after.set()
        assert await asyncio.wait_for(after, WAIT) == row.pk and calls == 2  # before: 3
        assert not store._flights  # before: the first's record stayed


@pytest.mark.slow  # seconds of waits: make check skips it
async def test_tasks_that_give_up_waiting_leave_nothing_on_the_computation() -> None:
    """Each task's ``asyncio.wrap_future`` left a callback on the computation's future
    for good: 690 bytes per request that gave up, for as long as the computation hung
    (an audit of 5 December 2026). Now one callback for all; a late waiter still gets
    the value."""
    import tracemalloc

    release = asyncio.Event()

    @request_memo
    async def slow(x: int) -> int:
        await release.wait()
        return x

    async with request_scope() as store:
        computing = asyncio.create_task(slow(1))
        await asyncio.sleep(0)
        tracemalloc.start()
        try:
            for _ in range(100):  # warm up
                await give_up(slow(1))
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(3000):
                await give_up(slow(1))
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 300_000, grown  # was about 2 MB
        (record,) = store._flights.values()
        assert not record.future._waiting
        late = asyncio.create_task(slow(1))
        await asyncio.sleep(0)
        release.set()
        assert await computing == await late == 1


class HashFailsFrom:
    """A key whose ``__hash__`` raises from its ``n``-th call on: at every step of a miss."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __hash__(self) -> int:
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("hash")
        return 7


@pytest.mark.parametrize("n", range(1, 10))
def test_a_key_whose_hash_starts_failing_at_any_step_leaves_no_record(n: int) -> None:
    """A sync batch registered the key, then its hash raised before the fetch was under
    way: its record stayed, in the closed store too (an audit of 5 December 2026)."""

    @perrequest.request_batch
    def load(keys: list[HashFailsFrom]) -> list[int]:
        return [1 for _ in keys]

    @request_memo
    def memo(key: HashFailsFrom) -> int:
        return 1

    with request_scope() as store:
        for call in (load.load, memo):
            with contextlib.suppress(RuntimeError):
                call(HashFailsFrom(n))
        assert not store._flights
    assert not store._flights


@pytest.mark.slow  # seconds of waits: make check skips it
@pytest.mark.parametrize("how", ["load", "load_many"])
async def test_callers_that_give_up_on_a_hanging_batch_are_not_all_kept(how: str) -> None:
    """Every cancelled caller's future stayed in the batch's list for the key until the
    batch ended: 20,000 for a hung upstream in a long scope (an audit of 5 December
    2026). Now at most twice as many as wait; the one still waiting gets the value.
    ``load_many``'s were all kept still (3,000 of 3,000: the next evening's audit)."""
    release = asyncio.Event()

    @perrequest.request_batch
    async def users(keys: list[int]) -> list[int]:
        await release.wait()
        return keys

    def load() -> Any:
        return users.load(1) if how == "load" else users.load_many([1])

    async with request_scope() as store:
        first = asyncio.ensure_future(load())
        await asyncio.sleep(0)
        for _ in range(3000):
            await give_up(load())
        (state,) = store._flights.values()
        assert len(state.inflight[1]) <= 128
        release.set()
        assert await first == (1 if how == "load" else [1])


def test_a_computation_ending_where_the_waits_lock_is_held_wakes_its_tasks() -> None:
    """Waking took the waits' lock, which a collection may interrupt a thread holding:
    a computing task closed by that collection (its loop dropped) ended there, and the
    thread deadlocked, then every single-flight wait of the process (a review of 5
    December 2026). Waking takes no lock now; the lock is reentrant."""
    from perrequest import _waits

    record = _waits.Waited(owner=object())
    woken: list[Any] = []

    async def waiter() -> None:
        woken.append(await _waits.result_async(record.future, {}, "k", record))

    def end_holding_the_lock() -> None:
        with _waits._waits_lock:
            record.future.set_result((True, 1))

    async def main() -> None:
        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0.01)
        thread = threading.Thread(target=end_holding_the_lock, daemon=True)
        thread.start()
        thread.join(WAIT)
        assert not thread.is_alive(), "deadlocked"
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())
    assert woken == [(True, 1)]


def test_cache_clear_is_not_failed_by_another_keys_hash_in_flight() -> None:
    """A computation in flight whose key's ``__hash__`` raises now (a model being saved,
    in another thread): ``cache_clear()`` invalidates what it can. Before: it raised that
    other key's error."""
    saving = threading.Event()
    started, finish = threading.Event(), threading.Event()

    class Model:
        def __init__(self, pk: int) -> None:
            self.pk = pk

        def __hash__(self) -> int:
            if saving.is_set():
                raise TypeError("Model instances without primary key value are unhashable")
            return hash(self.pk)

        def __eq__(self, other: object) -> bool:
            return NotImplemented if type(other) is not Model else other.pk == self.pk

    @request_memo
    def slow(model: Model) -> int:
        started.set()
        finish.wait(5)
        return model.pk

    with request_scope(), ThreadPoolExecutor(1) as pool:
        computing = pool.submit(bind_scope(slow), Model(1))
        assert started.wait(5)
        saving.set()
        try:
            slow.cache_clear()  # before: TypeError, another key's
        finally:
            saving.clear()
            finish.set()
        assert computing.result(5) == 1


async def test_an_async_generator_returned_is_called_an_async_generator() -> None:
    """DESIGN.md: an async generator is called an async generator (it was "a generator")."""

    async def rows() -> Any:
        yield 1

    @request_memo
    def listing() -> Any:
        return rows()

    async with request_scope():
        with pytest.raises(TypeError, match=r"'.*listing' returned an async generator,"):
            listing()
