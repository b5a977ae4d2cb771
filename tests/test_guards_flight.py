"""Guards of single-flight (_flight, _waits) that no other test needed: each test here fails
with its guard deleted (a block-deletion mutation pass of the core, 5 December 2026)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cachetools
import pytest
from keys import Model, Odd, Seven
from signals import (
    Interrupt,
    RaiseAfter,
    RaiseAtCall,
    Signalled,
    free_for_another_thread,
    interrupted_by,
    raise_like_a_signal,
    raising_at_a_back_edge,
)

import perrequest
from perrequest import _flight, _records, _shared, bind_scope, request_memo, request_scope
from perrequest._records import FLIGHTS
from perrequest._waits import Waited

WAIT = 10  # seconds: a hang fails the test instead of the run


@pytest.fixture(autouse=True)
def _collect_tasks_left_pending() -> Iterator[None]:
    """Some tests here leave tasks pending on closed loops: collected at their end, with
    asyncio's "Task was destroyed but it is pending" silenced, not in a later test (whose
    check that nothing logged a warning it would fail: seen under 3.13)."""
    yield
    logging.getLogger("asyncio").disabled = True
    try:
        gc.collect()
    finally:
        logging.getLogger("asyncio").disabled = False


def test_a_key_moved_while_another_in_flight_is_unhashable_raises_nothing() -> None:
    """_records.take_out: finishing a computation whose key's hash changed
    takes the records out and files the others again; one whose key cannot be hashed now
    (an outer computation saving a copy: pk None) is dropped, not raised from here."""
    a, b = Model(1), Model(2)

    @request_memo
    def g(m: Model) -> int:
        m.pk = 99  # saved: its hash changes while it is computed
        return 2

    @request_memo
    def f(m: Model) -> int:
        if m is a:
            a.pk = None  # being saved, for a moment
            assert g(b) == 2
            a.pk = 1
        return m.pk or 0

    with request_scope():
        g(Model(5)), f(Model(6))  # past each function's first miss
        assert f(a) == 1


@pytest.mark.parametrize(
    ("signal", "where"),
    [(Interrupt, "as-setdefault-returns"), (Signalled, "as-setdefault-returns"),
     (Signalled, "in-the-keys-own-hash")],
)  # fmt: skip
def test_a_signal_as_a_moved_keys_neighbour_is_filed_again_reaches_the_caller(
    signal: type[BaseException], where: str
) -> None:
    """_records.take_out: finishing a computation whose key's hash moved files the other
    records in flight again, in a ``try`` for keys whose hash raises now. What a signal
    handler raised there as ``setdefault`` returned (Ctrl-C; Celery's soft time limit) was
    taken for such a key and dropped: the call returned as if nothing had happened; so
    was one inside the key's own ``__hash__`` (told by type now)."""
    at: Any = (
        RaiseAfter(signal, "setdefault", "_file")
        if where == "as-setdefault-returns"
        else RaiseAtCall(signal, "__hash__", "_file")
    )

    @request_memo
    def g(m: Model) -> int:
        m.pk = 99  # saved: its hash moves while it is computed
        if at.armed:
            sys.setprofile(at)
        return 2

    @request_memo
    def f(m: Model) -> int:
        try:
            g(Model(m.pk + 100))  # f's record is filed again as g's moved key is taken out
        finally:
            sys.setprofile(None)
        return 1

    with request_scope() as store:
        g(Model(5)), f(Model(6))  # past each function's first miss
        at.armed = True
        for pk in range(10, 50):  # until g's moved key is not found by identity (as a dict
            try:  # probing from its new hash may reach its old slot: then nothing is taken out)
                f(Model(pk))
            except signal:
                break
            assert at.armed, "the signal came, and was dropped"
        assert not at.armed, "the signal never came: the test tests nothing"
        assert not store._flights  # nothing left in flight
        assert f(Model(pk)) == 1


@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_as_a_moved_keys_neighbours_are_filed_again_leaves_none_out(
    signal: type[BaseException],
) -> None:
    """_records.take_out: a signal as the first of the other records in flight was filed again
    left the rest out: their computations then stored nothing and answered no waiter, and
    a thread waiting for one computed the key again after two one-second looks. The rest
    are filed again before the signal goes on."""
    at = RaiseAfter(signal, "setdefault", "_file")
    go, computed = threading.Event(), []

    @request_memo
    def h(x: int) -> int:
        computed.append(x)
        assert go.wait(WAIT)
        return x * 10

    def registered(store: Any, n: int, waited: bool = False) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            records = list(store._flights.values())
            if len(records) == n and (not waited or type(records[-1]) is Waited):
                return
            time.sleep(0.01)
        raise AssertionError(f"not registered: {store._flights}")

    @request_memo
    def g(m: Model) -> int:
        if not at.armed:
            return 1
        store = perrequest.current_store()
        other = pool.submit(bind_scope(h), 2)  # filed second: the first filed again
        registered(store, 2)
        computing = pool.submit(bind_scope(h), 1)  # filed third, then waited for
        registered(store, 3)
        waiting = pool.submit(bind_scope(h), 1)
        registered(store, 3, waited=True)
        futures.extend([other, computing, waiting])
        m.pk = 99  # saved: its hash moves while it is computed
        sys.setprofile(at)
        return 2

    futures: list[Any] = []
    with ThreadPoolExecutor(3) as pool, request_scope() as store:
        go.set(), h(0), go.clear(), g(Model(5))  # past each function's first miss
        for pk in range(6, 50):  # until g's moved key is not found by identity (see above)
            computed.clear(), futures.clear()
            at.armed = True
            try:
                g(Model(pk))
            except signal:
                break
            finally:
                sys.setprofile(None)
            at.armed = False  # popped from its old slot: nothing taken out; again
            go.set(), [f.result(WAIT) for f in futures], go.clear(), h.cache_clear()
        assert not at.armed, "the signal never came: the test tests nothing"
        started = time.monotonic()
        go.set()
        assert [f.result(WAIT) for f in futures] == [20, 10, 10]
        assert time.monotonic() - started < 0.9, "the waiter looked twice: its record was lost"
        assert sorted(computed) == [1, 2], "h(1) computed twice"
        assert not store._flights


@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_as_a_failed_computation_unregisters_reaches_the_caller(
    signal: type[BaseException],
) -> None:
    """_flight.failed: unregistering a computation that raised is in a ``try`` for keys whose
    hash raises now. A Ctrl-C, or a soft time limit, that came as that pop returned was
    taken for such a key and dropped (the computation's own error went out in its place).
    (It looks with ``get`` before it deletes: another's record is never popped.)"""
    at = RaiseAfter(signal, "get", "failed")

    @request_memo
    def f(x: int) -> int:
        if x:
            sys.setprofile(at)
            raise ValueError("the computation fails")
        return 0

    with request_scope() as store:
        f(0)
        at.armed = True
        try:
            with pytest.raises(signal):
                f(1)
        finally:
            sys.setprofile(None)
        assert not at.armed, "the signal never came: the test tests nothing"
        assert not store._flights
        with pytest.raises(ValueError, match="the computation fails"):
            f(1)


def test_a_signal_in_a_failed_computations_key_as_it_unregisters_reaches_the_caller() -> None:
    """_flight.failed: an ``Exception`` a signal handler raised inside the key's own
    ``__hash__`` as the failed computation unregisters (told by type) goes on,
    not taken for a key whose hash raises now (the computation's own error in its place);
    the computation is unregistered all the same (``run`` ends it once more)."""
    at = RaiseAtCall(Signalled, "__hash__", "failed")

    @request_memo
    def f(m: Model) -> int:
        if m.pk:
            sys.setprofile(at)
            raise ValueError("the computation fails")
        return 0

    with request_scope() as store:
        f(Model(0))  # past the function's first miss, which takes the slow path
        at.armed = True
        with interrupted_by(Signalled, at):
            f(Model(1))
        assert not store._flights
        with pytest.raises(ValueError, match="the computation fails"):
            f(Model(1))


def test_an_interrupt_as_the_registering_call_returns_leaves_no_record() -> None:
    """_flight.interrupted: an interrupt (Ctrl-C) that comes just after a
    miss registered itself as computing the key unregisters it; a record left behind
    would have another thread wait for it for ever."""
    run_code = _flight.run.__code__
    fired = False

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not run_code:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            nonlocal fired
            f_locals = frame.f_locals
            if (
                not fired
                and event == "line"
                and f_locals.get("record") is not None
                and f_locals.get("record") is f_locals.get("me")
            ):
                fired = True
                raise KeyboardInterrupt
            return local

        return local

    with request_scope() as store:
        previous = sys.gettrace()  # coverage's, when it measures: left running after
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                store.get_or_set("k", lambda: 1)
        finally:
            sys.settrace(previous)
        assert fired
        got: list[int] = []
        thread = threading.Thread(
            target=bind_scope(lambda: got.append(store.get_or_set("k", lambda: 2))), daemon=True
        )
        thread.start()
        thread.join(timeout=5)
        assert got == [2], "the other thread waits for a computation that was interrupted"
        assert perrequest.get("k") == 2


@pytest.mark.parametrize("call_in", ["memo", "get_or_set"])
def test_an_interrupt_as_a_key_whose_eq_raises_registers_reaches_the_caller(call_in: str) -> None:
    """_records.interrupted: a miss interrupted as it registers unregisters its record, looked
    up by its key, in a ``try`` for keys whose ``__hash__``/``__eq__`` raises (it registered
    nothing). A Ctrl-C that came inside the ``__eq__`` of such a key as its registration met
    a colliding key in flight (``Odd`` beside ``Seven``) made that lookup compare again: the
    key's own error went out in the interrupt's place (the caller saw a RuntimeError, never
    its KeyboardInterrupt)."""
    at = RaiseAtCall(Interrupt, "__eq__", "compute" if call_in == "memo" else "run")

    @request_memo
    def compute(x: object) -> int:
        if type(x) is Seven:  # in flight (hash 7) as the colliding key registers
            return compute(Odd()) if call_in == "memo" else perrequest.get_or_set(Odd(), int)
        return 1

    def call(x: object) -> int:
        if call_in == "memo":
            return compute(x)
        return perrequest.get_or_set(x, lambda: compute(x))  # type: ignore[no-any-return]

    with request_scope() as store:
        call(0)  # past the function's first miss, which takes the slow path
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Interrupt, at):
            call(Seven())
        assert not store._flights
        with pytest.raises(RuntimeError, match="no comparing"):  # uninterrupted: its own
            call(Seven())
        assert not store._flights and call(0) == 1


def _somebody_waits(store: Any) -> bool:
    return any(type(record) is Waited for record in list(store._flights.values()))


def _until_somebody_waits(store: Any) -> None:
    """From another thread: until a caller waits for a computation (2.5 s at most)."""
    for _ in range(500):
        if _somebody_waits(store):
            return
        time.sleep(0.005)


async def _until(cond: Any) -> None:
    import asyncio

    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("never happened")


async def test_a_deleted_computation_that_fails_leaves_the_next_ones_waiters_alone() -> None:
    """_flight.failed: a computation whose key was deleted meanwhile, which
    then raises, finds another caller's record (registered since): it puts it back, and
    that caller's waiters get that caller's value, not the first one's error."""
    import asyncio

    go_a, go_b = asyncio.Event(), asyncio.Event()
    calls = 0

    @request_memo
    async def f(x: int) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # task A
            f.cache_delete(x)
            await go_a.wait()
            raise ValueError("A's error")
        if calls == 3:  # task B
            await go_b.wait()
            return "B"
        return "warm"

    async with request_scope() as store:
        await f(0)  # past the first miss
        a = asyncio.create_task(f(1))
        await _until(lambda: calls == 2)
        b = asyncio.create_task(f(1))
        await _until(lambda: calls == 3)
        c = asyncio.create_task(f(1))  # waits for B
        await _until(lambda: _somebody_waits(store))
        go_a.set()
        with pytest.raises(ValueError):
            await a
        go_b.set()
        assert await b == "B"
        assert await c == "B"
        assert await f(1) == "B" and calls == 3


@pytest.mark.parametrize("signal", [None, Interrupt, Signalled], ids=["none", "ctrl-c", "soft"])
async def test_a_deleted_computation_that_ends_puts_the_next_ones_record_back(
    signal: type[BaseException] | None,
) -> None:
    """_flight._put_back: a computation whose key was deleted meanwhile
    ends after another caller registered the key: it stores nothing and puts that
    caller's record back, whose value is then stored. A Ctrl-C, or a soft time limit (a
    real SIGUSR1 handler's exception: it was dropped until a review, 6 December), that
    comes inside the key's ``__hash__`` there goes on to the first caller (it was taken
    for the key's error)."""
    import asyncio

    class Key:
        interrupt = False

        def __hash__(self) -> int:
            if Key.interrupt and signal is not None:
                Key.interrupt = False
                raise_like_a_signal(signal)  # Signalled: from a real SIGUSR1 handler
            return 1

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Key)

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and frame.f_code.co_name == "_own" and arg is any:
            Key.interrupt = True  # the next hash of the key: _put_back's

    go_a, go_b = asyncio.Event(), asyncio.Event()
    calls = 0

    @request_memo
    async def f(x: object) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # task A
            f.cache_delete(x)
            await go_a.wait()
            if signal is not None:
                sys.setprofile(profile)
            return "A"
        if calls == 3:  # task B
            await go_b.wait()
            return "B"
        return "warm"

    async with request_scope():
        await f(0)
        a = asyncio.create_task(f(Key()))
        await _until(lambda: calls == 2)
        b = asyncio.create_task(f(Key()))
        await _until(lambda: calls == 3)
        go_a.set()
        try:
            if signal is not None:
                with pytest.raises(signal):
                    await a
                assert not Key.interrupt, "the signal never came: the test tests nothing"
            else:
                assert await a == "A"
        finally:
            sys.setprofile(None)
        go_b.set()
        assert await b == "B"
        if signal is None:
            assert await f(Key()) == "B" and calls == 3  # B's value stored


async def test_a_record_whose_key_cannot_be_put_back_has_its_waiters_start_again() -> None:
    """_flight._put_back: a computation whose key was deleted meanwhile ends after another
    caller registered the key, and puts that caller's record back, in a ``try`` for a key
    whose hash raises then (a model whose save has set its pk to None for that moment:
    here its hash raises there alone). Without it, the hash's error went out of the first
    computation, which had a value to return, and the other record, dropped, was not
    restarted: its waiter waited until its second one-second look. Now the first returns
    its value and the waiter starts again at once (it computes the key: nobody else does)."""

    class Key:
        unsaved = False
        raised = 0

        def __hash__(self) -> int:
            if Key.unsaved and sys._getframe(1).f_code.co_name == "_put_back":
                Key.raised += 1
                raise TypeError("Model instances without primary key value are unhashable")
            return 1

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Key)

    go_a, go_b = asyncio.Event(), asyncio.Event()
    calls = 0

    @request_memo
    async def f(x: object) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # task A
            f.cache_delete(x)
            await go_a.wait()
            Key.unsaved = True
            return "A"
        if calls == 3:  # task B
            await go_b.wait()
            return "B"
        return "C" if calls == 4 else "warm"

    async with request_scope() as store:
        await f(0)  # past the first miss
        a = asyncio.create_task(f(Key()))
        await _until(lambda: calls == 2)
        b = asyncio.create_task(f(Key()))
        await _until(lambda: calls == 3)
        c = asyncio.create_task(f(Key()))  # waits for B
        await _until(lambda: _somebody_waits(store))
        go_a.set()
        try:
            assert await asyncio.wait_for(a, WAIT) == "A"  # not the key's TypeError
            assert await asyncio.wait_for(c, 1.5) == "C"  # at once, not at its 2nd look
        finally:
            Key.unsaved = False
            go_b.set()
        assert await asyncio.wait_for(b, WAIT) == "C"  # the value stored: one per key
        assert not store._flights
        assert Key.raised == 1, "the hash never raised as put back: the test tests nothing"


def test_a_waiter_gets_the_error_of_a_computation_whose_store_raised() -> None:
    """_flight.abandon: storing the value raised (a colliding key's
    __eq__): the waiters get that error at once, not, seconds later, a turn to compute."""
    import time

    armed = False
    registered = threading.Event()
    release = threading.Event()

    class K:
        def __init__(self, n: int) -> None:
            self.n = n

        def __hash__(self) -> int:
            return 7

        def __eq__(self, other: object) -> bool:
            if armed:
                raise RuntimeError("compared")
            return isinstance(other, K) and other.n == self.n

    k0, k1 = K(0), K(1)

    @request_memo
    def f(k: K) -> int:
        if k is k1 and not registered.is_set():
            registered.set()
            release.wait(5)
        return k.n

    with request_scope() as store:
        f(k0)  # a colliding key, stored (and the first miss past)
        outcome_main: list[object] = []
        outcome: list[object] = []

        def call(out: list[object]) -> None:
            started = time.monotonic()
            try:
                out.append(f(k1))
            except RuntimeError as exc:
                out.append(exc)
            out.append(time.monotonic() - started)

        main = threading.Thread(target=bind_scope(call), args=(outcome_main,), daemon=True)
        main.start()
        registered.wait(5)
        thread = threading.Thread(target=bind_scope(call), args=(outcome,), daemon=True)
        thread.start()
        _until_somebody_waits(store)
        armed = True
        release.set()
        thread.join(10)
        main.join(10)
        armed = False
        assert isinstance(outcome_main[0], RuntimeError), outcome_main  # the computing call
        assert outcome and isinstance(outcome[0], RuntimeError), outcome  # its waiter
        assert outcome[1] < 1.5, outcome  # not the 2 s of polling


def test_a_computation_that_fails_after_making_its_key_unhashable_raises_its_own_error() -> None:
    """_flight.failed: unregistering a failed computation whose key's hash
    raises now (a save that failed half-way: pk None) unregisters it by identity; the
    caller gets the function's error, not the key's TypeError."""

    @request_memo
    def save(m: Model) -> int:
        if m.pk == 1:
            m.pk = None
            raise ValueError("the save failed")
        return 0

    with request_scope() as store:
        save(Model(0))  # past the first miss
        with pytest.raises(ValueError, match="the save failed"):
            save(Model(1))
        assert not store._flights


def test_a_delete_sends_the_waiters_of_a_computation_to_compute_at_once() -> None:
    """_waits.restart: a delete of a key being computed invalidates the
    computation; its waiters compute again at once (read your writes), not after the
    two seconds in which their polling would notice the record gone."""
    import time

    release = threading.Event()
    started = threading.Event()

    def slow() -> int:
        started.set()
        release.wait(5)
        return 1

    with request_scope() as store:
        first = threading.Thread(
            target=bind_scope(lambda: store.get_or_set("k", slow)), daemon=True
        )
        first.start()
        started.wait(5)
        took: list[float] = []

        def waiter() -> None:
            t = time.monotonic()
            assert store.get_or_set("k", lambda: 2) == 2
            took.append(time.monotonic() - t)

        second = threading.Thread(target=bind_scope(waiter), daemon=True)
        second.start()
        _until_somebody_waits(store)
        store.pop("k", None)  # invalidates the computation in flight
        second.join(5)
        release.set()
        first.join(5)
        assert took and took[0] < 1.5, took  # not the 2 s of polling


def test_a_recursive_miss_returning_a_generator_is_refused_not_cached() -> None:
    """_flight._unshared: the inner call of a recursion (computed without
    sharing) refuses a generator result as any miss does, so nothing one-shot is cached."""
    calls = 0

    @request_memo
    def f(x: int) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return "warm"  # f(0): past the first miss
        if calls == 2:
            return f(x)  # the outer call recurses on its own key
        return (i for i in range(3))  # the inner call, computed unshared

    with request_scope():
        f(0)
        with pytest.raises(TypeError, match="generator"):
            f(1)
        calls = 1
        with pytest.raises(TypeError, match="generator"):
            f(1)  # nothing was cached: refused again


# -- a computation left pending on an event loop closed under it ---------------------------


@request_memo
async def _pending_user(user_id: int) -> str:
    if _PENDING_FOREVER:
        await asyncio.sleep(3600)  # its loop is closed while it waits here
    return f"user {user_id}"


_PENDING_FOREVER = True


def _leave_pending(user_id: int) -> None:
    """Start ``_pending_user(user_id)`` on a loop that is then closed without cancelling its
    tasks (a worker running ``run_until_complete`` per message)."""

    loop = asyncio.new_event_loop()
    loop.run_until_complete(_started(_pending_user(user_id)))  # registered, now waiting
    loop.close()


def test_a_caller_of_a_key_computed_on_a_closed_loop_computes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_waits.gone: the task computing the key was left pending on a loop closed under it,
    so it never ends. A caller on another loop computes the key; before, it waited for it
    for ever (as a caller that started waiting before the loop closed still would)."""
    with request_scope():
        _leave_pending(1)
        monkeypatch.setattr(sys.modules[__name__], "_PENDING_FOREVER", False)
        got = asyncio.run(asyncio.wait_for(_pending_user(1), 5))
        assert got == "user 1"


def _first_call_pends() -> Any:
    """A memo whose first call pends (an hour); the others answer at once."""
    computing = threading.Event()

    @request_memo
    async def user(user_id: int) -> str:
        if not computing.is_set():
            computing.set()
            await asyncio.sleep(3600)
            return "the stopped loop's"
        return f"user {user_id}"

    return user


def test_a_waiter_whose_computation_is_left_on_a_closed_loop_computes_it() -> None:
    """_waits.result_async: a task of another thread waits for a computation whose loop is
    then closed; its looks see the computation never ends and it computes the key itself."""
    waited: list[str] = []
    user = _first_call_pends()

    def wait() -> None:
        waited.append(asyncio.run(asyncio.wait_for(user(1), 8)))

    with request_scope() as store:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(_started(user(1)))
        waiter = threading.Thread(target=bind_scope(wait))
        waiter.start()
        _until_somebody_waits(store)
        loop.close()
        waiter.join(10)
    assert waited == ["user 1"]


def test_a_closed_store_holds_no_computation_left_on_a_closed_loop() -> None:
    """_records.drop_dead at close: a long scope that closed a loop per message with a memo
    pending keeps no record of them once closed (each held the task and its arguments)."""
    with request_scope() as store:
        for user_id in range(20):
            _leave_pending(user_id)
        assert len(store._flights) == 20  # until their keys are asked for again
    assert not store._flights


def test_a_shared_memo_left_pending_on_a_loop_per_message_keeps_a_bounded_number() -> None:
    """_records.drop_dead in ``_flight.run_async``: a ``shared=`` memo left pending on each loop
    of a worker that closes a loop per message (``run_until_complete``, no cancelling) kept a
    record of each, with its task and arguments, in its process-wide cache's flights: for
    the life of the process. At most ``FLIGHTS`` now (a request store's: until it closes)."""
    cache = cachetools.LRUCache(1000)

    @request_memo(shared=cache)
    async def pending(user_id: int) -> str:
        await asyncio.sleep(3600)  # its loop is closed while it waits here
        return f"user {user_id}"

    for user_id in range(3 * FLIGHTS):
        with request_scope():
            loop = asyncio.new_event_loop()
            loop.run_until_complete(_started(pending(user_id)))
            loop.close()
    assert 0 < len(_shared._guarded[id(cache)]._flights) <= FLIGHTS


def test_a_live_computation_stays_registered_while_dead_ones_are_dropped() -> None:
    """_records.drop_dead unregisters dead records in place: it emptied the cache's flights
    and filed the live ones again (take_out), and a thread registering meanwhile (callers
    register without the lock) found a key in flight free and computed it a second time
    (a review's finding: ``h(1) computed twice``)."""
    cache = cachetools.LRUCache(1000)
    go, absent = threading.Event(), []

    @request_memo(shared=cache)
    def h(x: int) -> int:
        assert go.wait(WAIT)
        return x * 10

    @request_memo(shared=cache)
    async def pending(n: int) -> int:
        await asyncio.sleep(3600)  # its loop is closed while it waits here
        return n

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event != "c_return" or frame.f_code.co_name not in ("drop_dead", "_drop", "take_out"):
            return
        if not any(record is live for record in list(flights.values())):
            absent.append(getattr(arg, "__name__", arg))

    with ThreadPoolExecutor(1) as pool, request_scope():
        go.set(), h(0), go.clear()  # past the first miss
        computing = pool.submit(bind_scope(h), 1)
        flights = _shared._guarded[id(cache)]._flights
        deadline = time.monotonic() + WAIT
        while not flights and time.monotonic() < deadline:
            time.sleep(0.01)
        (live,) = flights.values()
        try:
            for n in range(2 * FLIGHTS):  # a loop per message, closed with its memo pending
                loop = asyncio.new_event_loop()
                sys.setprofile(watch)
                try:
                    loop.run_until_complete(_started(pending(n)))
                finally:
                    sys.setprofile(None)
                loop.close()
            assert len(flights) <= FLIGHTS, "no look for dead records: the test tests nothing"
        finally:
            go.set()
        assert computing.result(WAIT) == 10
    assert not absent, f"the live record was out of the flights as {absent[0]} returned"


@pytest.mark.parametrize("call", ["clear", "setdefault", "append"])
@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_anywhere_in_take_out_leaves_no_live_record_out(
    signal: type[BaseException], call: str
) -> None:
    """_records.take_out popped every record before its ``try`` (a review's finding): a
    signal as a ``popitem()`` returned left those popped so far out of the flights, their
    values unstored, their waiters computing again after two one-second looks."""
    live = [Waited(1000 + n) for n in range(5)]
    stale = Waited(2000)
    keys = [("spec", n) for n in range(6)]
    flights: dict[Any, Any] = dict(zip(keys, [*live[:3], stale, *live[3:]], strict=True))
    at = RaiseAfter(signal, call, "take_out" if call != "setdefault" else "_file")
    at.armed = True
    sys.setprofile(at)
    try:
        _records.take_out(flights, lambda _, record: record is stale)
    except signal:
        pass
    finally:
        sys.setprofile(None)
    assert not at.armed, "the signal never came: the test tests nothing"
    for key, record in zip([*keys[:3], *keys[4:]], live, strict=True):
        assert flights.get(key) is record, f"{key}'s live record left out"
        assert not record.future.done(), "a live computation's waiters told to retry"
    assert keys[3] not in flights and stale.future.done()  # taken out: its waiters retry


def test_computations_on_a_loop_stopped_between_messages_are_kept() -> None:
    """_records.drop_dead looks past ``FLIGHTS`` for tasks that never end: those of a loop that
    is only stopped (one kept, ``run_until_complete`` per message) go on when it runs again
    and store their values, each computed once."""
    calls: list[int] = []
    loop = asyncio.new_event_loop()
    release = asyncio.Event()

    @request_memo
    async def user(user_id: int) -> str:
        calls.append(user_id)
        await release.wait()
        return f"user {user_id}"

    @request_memo
    async def other(user_id: int) -> str:
        return f"other {user_id}"

    try:
        with request_scope() as store:
            keys = range(FLIGHTS)
            tasks = [loop.run_until_complete(_started(user(k))) for k in keys]
            assert asyncio.run(other(-1)) == "other -1"  # another loop's miss (a first one,
            assert asyncio.run(other(-2)) == "other -2"  # in run_async), past the cap: a look
            assert len(store._flights) == len(keys)  # none dropped
            loop.call_soon(release.set)
            got = loop.run_until_complete(asyncio.wait_for(asyncio.gather(*tasks), 5))
            assert got == [f"user {k}" for k in keys]
            assert loop.run_until_complete(user(5)) == "user 5"  # stored
            assert calls == list(keys) and not store._flights
    finally:
        loop.close()


async def test_many_computations_in_flight_at_once_are_never_dropped() -> None:
    """_records.drop_dead looks for dead records once more than ``FLIGHTS`` are in flight: live
    ones (their loop running) stay, each computed once however many wait."""
    calls: list[int] = []
    release = asyncio.Event()

    @request_memo
    async def user(user_id: int) -> str:
        calls.append(user_id)
        await release.wait()
        return f"user {user_id}"

    async with request_scope() as store:
        await asyncio.wait_for(asyncio.gather(release.set() or user(-1)), 5)  # first miss
        release.clear()
        keys = range(3 * FLIGHTS)
        tasks = [asyncio.create_task(user(k)) for k in keys for _ in range(2)]
        await asyncio.sleep(0.01)
        assert len(store._flights) == len(keys)  # each registered once, none dropped
        release.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert got == [f"user {k}" for k in keys for _ in range(2)]
    assert sorted(calls) == [-1, *keys]


@pytest.mark.parametrize("how", ["deleted", "saved"])
async def test_a_nested_computation_that_loses_its_record_never_takes_its_callers(
    how: str,
) -> None:
    """_flight._mine: a task is the ``me`` of every computation it nests. One whose record a
    delete took, or whose key's hash changed (a model saved), took the task's first record
    by identity, its caller's: the caller's waiters got the inner key's value."""

    @request_memo
    async def g(m: Model) -> str:
        await asyncio.sleep(0.01)
        if how == "deleted":
            g.cache_delete(m)
        else:
            m.pk = 99
        return "g"

    @request_memo
    async def f(x: int) -> str:
        await asyncio.sleep(0)  # the waiter joins
        await g(Model(x))
        return "f"

    async with request_scope():
        await g(Model(0)), await f(-1)  # past each function's first miss
        owner = asyncio.create_task(f(1))
        await asyncio.sleep(0)
        assert await asyncio.gather(owner, f(1)) == ["f", "f"]
        assert await f(1) == "f"


def test_a_caller_of_a_key_computed_on_a_stopped_loop_computes_it() -> None:
    """_waits.gone: the task computing the key was left pending on a loop that stopped and
    is kept (a worker thread's loop between two run_until_complete calls). A caller on
    another loop computes the key, and its value is the one stored; before, it waited until
    that loop ran again, for ever if it never did."""
    user = _first_call_pends()

    with request_scope():
        loop = asyncio.new_event_loop()
        try:
            pending = loop.run_until_complete(_started(user(1)))
            assert asyncio.run(asyncio.wait_for(user(1), 5)) == "user 1"
            assert asyncio.run(user(1)) == "user 1"  # stored
        finally:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(pending)
            loop.close()


def test_a_computation_resumed_after_its_key_was_taken_over_returns_the_value_stored() -> None:
    """_flight.end: a computation paused on a stopped loop is taken over (computed and
    stored by a caller on another loop); when its loop runs again and it ends, its caller
    gets the value stored, not its own: one value per key. Before, it got its own."""
    calls: list[int] = []
    release: list[asyncio.Event] = []

    @request_memo
    async def user(user_id: int) -> str:
        calls.append(user_id)
        if len(calls) == 1:
            await release[0].wait()
            return "the paused loop's"
        return "the other loop's"

    async def resume(task: asyncio.Task[str]) -> str:
        release[0].set()
        return await task

    with request_scope():
        loop = asyncio.new_event_loop()
        release.append(asyncio.Event())
        try:
            pending = loop.run_until_complete(_started(user(1)))
            other = asyncio.run(asyncio.wait_for(user(1), 5))  # that loop is stopped
            resumed = loop.run_until_complete(asyncio.wait_for(resume(pending), 5))
        finally:
            loop.close()
        assert (resumed, other, asyncio.run(user(1))) == ("the other loop's",) * 3


def _paused_then_taken_over(delete: bool) -> tuple[list[str], list[str]]:
    """A computation paused on a stopped loop (a worker thread's persistent loop between
    two run_until_complete calls) is taken over by a caller on another loop; the paused one
    resumes and ends while the other still computes (``delete``: after a delete of the key).
    Returns what the request read of the key, and the computations."""
    calls: list[str] = []
    other_started, paused_ended = threading.Event(), threading.Event()

    @request_memo
    async def user(user_id: int) -> str:
        calls.append(name := ("paused", "other", "later")[min(len(calls), 2)])
        if name == "other":
            other_started.set()
            while not paused_ended.is_set():
                await asyncio.sleep(0.005)
        else:
            await asyncio.sleep(0.01)
        return name

    with request_scope():
        loop = asyncio.new_event_loop()
        try:
            pending = loop.run_until_complete(_started(user(1)))  # the loop stops: paused
            helper = threading.Thread(target=bind_scope(lambda: read.append(asyncio.run(user(1)))))
            read: list[str] = []
            helper.start()
            assert other_started.wait(5)
            if delete:
                user.cache_delete(1)
            read.append(loop.run_until_complete(asyncio.wait_for(pending, 5)))
            paused_ended.set()
            helper.join(5)
        finally:
            loop.close()
        read.append(asyncio.run(user(1)))
    return read, calls


def test_a_computation_resumed_while_its_taker_computes_stores_its_value() -> None:
    """_records.resumed: the paused computation ends first and stores its value (no delete
    came), which the one that took over then returns: one value per key. Before, it stored
    nothing and returned its own, and the other stored its own: the request read two."""
    read, calls = _paused_then_taken_over(delete=False)
    assert (read, calls) == (["paused"] * 3, ["paused", "other"])


def test_a_computation_resumed_after_a_delete_stores_nothing() -> None:
    """_records.resumed: a delete came after the takeover: the paused value is stale, kept out."""
    read, calls = _paused_then_taken_over(delete=True)
    assert read[0] == "paused" and read[2] == "later" and calls == ["paused", "other", "later"]


async def _started(call: Any) -> asyncio.Task[Any]:
    """``call`` in a task of the running loop, started: it has registered its key."""
    task = asyncio.ensure_future(call)
    await asyncio.sleep(0)
    return task


# -- a wait inside a wait (a finalizer run by a collection in a waiting thread) -------------


def test_a_wait_nested_in_a_wait_gives_back_the_outer_waits_for_entry() -> None:
    """_waits.done_waiting: a collection can run a finalizer inside a thread's wait loop,
    and the finalizer can wait for a memo too. Its end of waiting popped the thread's only
    waits-for entry, the outer wait's: a caller the thread waits for, then waiting for the
    thread, saw no cycle and waited for ever. The outer entry is given back; an end of
    waiting that made no entry (the future was done) leaves the entry alone."""
    from concurrent.futures import Future

    from perrequest._waits import done_waiting, may_wait

    me, other, third = threading.get_ident(), -1, -2
    outer, inner, done = Future[Any](), Future[Any](), Future[Any]()
    done.set_result(None)
    try:
        assert may_wait(me, other, outer)
        done_waiting(me, done)  # a wait on a done future: may_wait was never asked
        assert may_wait(me, third, inner)  # the finalizer's wait
        done_waiting(me, inner)
        assert not may_wait(other, me, Future())  # other waits for me, who waits for it
    finally:
        done_waiting(me, outer)
    last = Future[Any]()
    assert may_wait(other, me, last)  # no wait of mine left: no cycle
    done_waiting(other, last)


def test_a_cycle_through_a_thread_whose_finalizer_waited_is_still_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The promise behind the test above, with threads: T computes x and waits for a (U
    computes it); inside T's wait a finalizer waits for b (V computes it) and ends; then U
    needs x. Before: T's waits-for entry was gone, U waited for T, T for U, for ever."""
    from perrequest import _waits

    gates = {name: threading.Event() for name in ("a", "b", "release b", "u needs x")}
    local, nested = threading.local(), []

    @request_memo
    def f(name: str) -> str:
        if name == "x":  # T's computation; U's, once it sees the cycle, is plain
            return "x" + f("a") if getattr(local, "t", False) else "x"
        if name == "a":  # U
            gates["a"].set()
            assert gates["u needs x"].wait(WAIT)
            return "a" + f("x")
        gates["b"].set()  # V
        assert gates["release b"].wait(WAIT)
        return "b"

    real_gone = _waits.gone

    def gone(owner: Any) -> bool:  # in T's wait loop, each second: where a finalizer runs
        if getattr(local, "t", False) and not nested:
            threading.Timer(0.2, gates["release b"].set).start()
            nested.append(f("b"))  # a wait for V's computation, inside the wait for U's
            gates["u needs x"].set()
        return real_gone(owner)

    def t_computes_x() -> str:
        local.t = True
        return f("x")

    monkeypatch.setattr(_waits, "gone", gone)
    with request_scope(), ThreadPoolExecutor(3) as pool:
        u = pool.submit(bind_scope(f), "a")
        v = pool.submit(bind_scope(f), "b")
        assert gates["a"].wait(WAIT) and gates["b"].wait(WAIT)
        t = pool.submit(bind_scope(t_computes_x))
        # U saw the cycle and computed x itself, stored first: T's x returns that (one
        # value per key in a request).
        assert u.result(WAIT) == "ax" and t.result(WAIT) == "x" and v.result(WAIT) == "b"
    assert nested == ["b"]


def test_a_nested_wait_that_ended_shows_the_wait_it_was_nested_in() -> None:
    """_waits.may_wait: between a nested wait's future ending and its thread's
    done_waiting, the thread is about to wait again for the outer owner: a caller that
    owner is, asking then, must see the cycle (a review found it waiting for ever)."""
    from concurrent.futures import Future

    from perrequest._waits import done_waiting, may_wait

    a, b, c = -11, -12, -13
    for_b, for_c, for_a = Future[Any](), Future[Any](), Future[Any]()
    try:
        assert may_wait(a, b, for_b)
        assert may_wait(a, c, for_c)  # a's finalizer, nested
        for_c.set_result(None)  # ended; a has not said so yet
        assert not may_wait(b, a, for_a)  # b waits for a, who waits for b
    finally:
        done_waiting(a, for_c)
        done_waiting(a, for_b)
    assert may_wait(b, a, for_a)
    done_waiting(b, for_a)


def test_ending_a_wait_never_waits_for_the_waits_lock() -> None:
    """_waits.done_waiting takes no lock: a collection inside may_wait (which holds the
    lock) can run a finalizer that waits for the very thread now ending its wait: that
    thread blocked on the lock, and neither moved again (a review found it)."""
    from concurrent.futures import Future

    from perrequest import _waits

    me, future = threading.get_ident(), Future[Any]()
    assert _waits.may_wait(me, -21, future)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _waits._waits_lock:
            held.set()
            release.wait(WAIT)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(WAIT)
        ended = threading.Thread(target=_waits.done_waiting, args=(me, future))
        ended.start()
        ended.join(2)
        assert not ended.is_alive()
    finally:
        release.set()
        holder.join(WAIT)
    assert me not in _waits._waits


def test_an_interrupt_as_a_wait_begins_leaves_no_waits_for_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_flight.interrupted: a KeyboardInterrupt right after ``may_wait`` recorded that this
    thread waits (before the wait's ``try``) drops that entry. Before, it stayed: a later
    wait nested over it, and a caller this thread never waited for saw a cycle (it then
    computed the key a second time)."""
    from perrequest import _waits

    started, release = threading.Event(), threading.Event()

    @request_memo
    def slow(n: int) -> int:
        started.set()
        release.wait(WAIT)
        return n

    real = _waits.may_wait

    def interrupted_after(*args: Any) -> bool:
        assert real(*args)
        raise KeyboardInterrupt

    me = threading.get_ident()
    with request_scope(), ThreadPoolExecutor(1) as pool:
        computing = pool.submit(bind_scope(slow), 1)
        assert started.wait(WAIT)
        monkeypatch.setattr(_waits, "may_wait", interrupted_after)
        try:
            with pytest.raises(KeyboardInterrupt):
                slow(1)
            assert me not in _waits._waits
        finally:
            release.set()
        assert computing.result(WAIT) == 1


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring: CPython 3.12+")
@pytest.mark.parametrize("ended", [1, 2], ids=["walk-on", "past-nested-waits"])
def test_a_signal_at_a_back_edge_of_may_waits_walk_leaves_its_lock_free(ended: int) -> None:
    """_waits.may_wait: an exception raised at a loop's back edge in the walk along who waits
    for whom (CPython runs signal handlers there), walking on to the next waiter or past
    nested waits that ended, leaves ``_waits_lock`` free. On 3.13 such an exception skipped
    the ``with`` around the loop (python/cpython#130279): the lock stayed held, and every
    other thread's next wait hung. (A real signal there: 3.13; raised as a JUMP event of
    sys.monitoring, on 3.12 too.)"""
    from concurrent.futures import Future

    from perrequest import _waits

    done, pending = Future[None](), Future[None]()
    done.set_result(None)
    owner, other = -1, -2  # idents no thread has: ``owner`` waits for ``other``, nested
    entry: Any = (other, weakref.ref(pending), None)
    for _ in range(ended):
        entry = (other, weakref.ref(done), entry)
    _waits._waits[owner] = entry
    try:
        with raising_at_a_back_edge(_waits.__file__, Interrupt), pytest.raises(Interrupt):
            _waits.may_wait(-3, owner, Future())
    finally:
        _waits._waits.pop(owner, None)

    assert free_for_another_thread(_waits._waits_lock)
    assert -3 not in _waits._waits
