"""Findings of a second review of the signal-by-traceback fixes (58bdc5f..e4c4676, 6
December, night): each test fails on e4c4676. Each docstring says what broke."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import weakref
from typing import Any

import pytest
from keys import Model
from signals import RaiseAtCall, Signalled, raise_like_a_signal

import perrequest
from perrequest import bind_scope, request_memo, request_scope


class _Key:
    """Equal to every other ``_Key``; its next hash in the main thread, once ``interrupt``
    is set, is interrupted by a real SIGUSR1 handler raising ``Signalled``."""

    interrupt = False

    def __hash__(self) -> int:
        if _Key.interrupt and threading.current_thread() is threading.main_thread():
            _Key.interrupt = False
            raise_like_a_signal(Signalled)
        return 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key)


def _at_put_back(frame: Any, event: str, arg: Any) -> None:
    """A profile function: the key's next hash is ``_flight._put_back``'s (``_own`` has
    just looked for its own record with ``any``)."""
    if event == "c_return" and frame.f_code.co_name == "_own" and arg is any:
        _Key.interrupt = True


async def test_a_signal_as_another_callers_record_is_put_back_does_not_freeze_its_waiter() -> None:
    """356b243: ``_flight._put_back`` restarts the record it could not put back, then
    raises the signal. ``end`` (inside ``finish``) lets it go to ``abandon``, which calls
    ``_put_back`` once more with the same record: it is filed again, its future already
    resolved (RESTART). A task waiting for it (C, for B's computation) gets RESTART, looks
    again, finds that resolved record, gets RESTART at once, without ever awaiting
    (``result_async`` returns a done future's result): it spins and the event loop is
    frozen (B never runs again). Here a watchdog thread unfreezes it after 2 s by clearing
    ``_flights``; without it the loop hangs for good."""
    go_a, go_b = asyncio.Event(), asyncio.Event()
    calls = 0

    @request_memo
    async def f(x: object) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:  # task A: its record invalidated, B registers the key meanwhile
            f.cache_delete(x)
            await go_a.wait()
            sys.setprofile(_at_put_back)
            return "A"
        if calls == 3:  # task B
            await go_b.wait()
            return "B"
        return f"call {calls}"

    async def until(check: Any) -> None:
        for _ in range(1000):
            if check():
                return
            await asyncio.sleep(0.001)

    frozen: list[float] = []
    async with request_scope() as store:
        await f(0)
        a = asyncio.create_task(f(_Key()))
        await until(lambda: calls == 2)
        b = asyncio.create_task(f(_Key()))
        await until(lambda: calls == 3)
        c = asyncio.create_task(f(_Key()))  # waits for B
        await asyncio.sleep(0.01)
        ticked = time.monotonic()

        def watchdog() -> None:
            time.sleep(2)
            if time.monotonic() - ticked >= 2 and not c.done():
                frozen.append(time.monotonic() - ticked)
                with store._lock:
                    store._flights.clear()  # C takes the key over and computes: unfrozen

        threading.Thread(target=watchdog, daemon=True).start()
        go_a.set()
        try:
            outcome = await asyncio.gather(a, return_exceptions=True)
        finally:
            sys.setprofile(None)
        ticked = time.monotonic()
        await asyncio.sleep(0.01)  # C runs here
        go_b.set()
        await asyncio.gather(b, c, return_exceptions=True)
    assert type(outcome[0]) is Signalled and not _Key.interrupt, "the signal never came"
    assert not frozen, f"the event loop was frozen by a spinning waiter ({frozen[0]:.1f} s)"


def test_a_signal_as_another_callers_record_is_put_back_does_not_fail_that_computation() -> None:
    """356b243, with threads: the main thread (A) finishes a computation whose key a
    delete invalidated meanwhile; thread B registered the key since, thread C waits for
    B. The signal in the key's hash as A puts B's record back restarts it (C computes),
    then ``abandon`` files it again, already resolved: C busy-loops on it until B ends,
    and B's ``end`` sets the result of a done future: B's caller gets
    ``InvalidStateError`` instead of its value."""
    from perrequest._waits import Waited

    go_b, b_running = threading.Event(), threading.Event()
    got: dict[str, str] = {}

    @request_memo
    def f(x: object) -> str:
        role = threading.current_thread().name
        if role == "MainThread" and isinstance(x, _Key):
            f.cache_delete(x)
            b.start()
            b_running.wait(5)
            c.start()
            for _ in range(1000):  # until C waits for B
                if any(type(r) is Waited for r in list(store._flights.values())):
                    break
                time.sleep(0.005)
            sys.setprofile(_at_put_back)
            return "A"
        if role == "B":
            b_running.set()
            go_b.wait(10)
            return "B"
        return role

    def call(name: str) -> None:
        try:
            got[name] = f(_Key())
        except BaseException as exc:
            got[name] = f"{type(exc).__name__}"

    with request_scope() as store:
        b = threading.Thread(target=bind_scope(lambda: call("B")), name="B", daemon=True)
        c = threading.Thread(target=bind_scope(lambda: call("C")), name="C", daemon=True)
        f(0)
        try:
            with pytest.raises(Signalled):
                f(_Key())
        finally:
            sys.setprofile(None)
        left = [r for r in list(store._flights.values()) if type(r) is Waited]
        time.sleep(0.2)
        go_b.set()
        b.join(10)
        c.join(10)
    assert got["B"] in ("B", "C") and got["C"] == got["B"], got  # B: InvalidStateError
    assert not any(r.future.done() for r in left), "a resolved record is filed again"


def _evict_through_refile(store: Any, deleted: Model, value: object) -> RaiseAtCall:
    """Fill a store of 2 with the deleted model's entry and Model(2)'s; a real SIGUSR1
    handler's exception lands in Model(2)'s hash as the third write evicts the deleted
    model's entry (``_refile``: its probe of each other key)."""
    at = RaiseAtCall(Signalled, "__hash__", "__init__")  # Probe(filed): hash(filed)
    perrequest.set(deleted, value)
    perrequest.set(Model(2), 2)
    deleted.pk = None
    at.armed = True
    sys.setprofile(at)
    try:
        with pytest.raises(Signalled):
            perrequest.set(3, 3)  # evicts the deleted model's entry: _refile
    finally:
        sys.setprofile(None)
    assert not at.armed, "the signal never came: the test tests nothing"
    return at


def test_a_signal_as_an_eviction_refiles_leaves_the_store_bounded() -> None:
    """e4c4676: ``_refile`` raises the signal it met once the rebuild is done: the store
    keeps its bound and its recency order in step with its entries. (The entry the
    eviction took is not counted in ``evictions`` then: ``_evict`` never gets it back;
    docs/workers.md.)"""
    with request_scope(max_entries=2) as store:
        _evict_through_refile(store, Model(1), "a")
        for n in range(4, 10):
            perrequest.set(n, n)
        assert sorted(store.values()) == [8, 9] and len(store) == 2
        assert 6 <= store.stats.evictions <= 7


def test_a_signal_as_an_eviction_refiles_leaves_no_cycle() -> None:
    """e4c4676 and f1e2c07: ``_take`` keeps any error of the evicted key's hash in its local
    ``signal`` (the deleted model's TypeError), cleared only on its way out by return.
    When ``_refile`` raises the signal, ``_take``'s frame keeps that TypeError, whose
    traceback holds that frame: a cycle, and with it the function's old dict and the
    evicted value (the request's data), kept after the scope closed until a collection."""

    class Payload:
        pass

    gc.collect()
    gc.disable()
    try:
        with request_scope(max_entries=2) as store:
            payload = Payload()
            ref = weakref.ref(payload)
            _evict_through_refile(store, Model(1), payload)
            del payload
        assert ref() is None, "the evicted value is kept by a reference cycle"
    finally:
        gc.enable()


def test_an_error_of_a_class_made_in_a_request_is_not_handed_to_another_requests_waiter() -> None:
    """8a25a33 checks a class among an error's values by a lookup along its name (a class
    made at run time may hold its request's data), but the error's own class is still
    only checked for ``<locals>`` in its name (``_Copy.error``): an error whose class was
    made by ``type()`` in the request (no ``<locals>``) is copied as an instance of that
    very class, and the waiter in another request reaches the request's data through
    ``type(error)``. (Django's ``Model.DoesNotExist`` passes the lookup.)"""
    from perrequest._shared_errors import Call, Raised

    class Payload:
        pass

    payload = Payload()
    row_error = type("RowError", (LookupError,), {"payload": payload})  # made per request
    assert "<locals>" not in row_error.__qualname__
    copy = Raised(Call(), row_error("no such row")).error_for(Call())
    assert getattr(type(copy), "payload", None) is not payload, (
        "the waiter's copy holds the computing request's data"
    )


def test_a_member_of_an_enum_made_in_a_request_is_not_handed_to_another_requests_waiter() -> None:
    """The same for enum members (``_Copy.value``): a member of an enum made at run time
    by the functional API has no ``<locals>`` in its class's name, and is passed as-is;
    its class may hold the request's data."""
    import enum

    from perrequest._shared_errors import Call, Raised

    class Payload:
        pass

    payload = Payload()
    status = enum.Enum("Status", {"MISSING": 1})  # made per request
    status.payload = payload  # type: ignore[attr-defined]
    copy = Raised(Call(), ValueError("no such row", status.MISSING)).error_for(Call())
    assert all(getattr(type(value), "payload", None) is not payload for value in copy.args), (
        "the waiter's copy holds the computing request's data"
    )
