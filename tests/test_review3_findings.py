"""_records.drop_dead and what it lets go (a second review of the split out of _waits): a
live computation in a process-wide shared tier must stay registered, not for a moment out
of the flights, or a thread registering then (without the lock) computes its key too."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cachetools
import pytest
from keys import Model

from perrequest import _shared, request_memo, request_scope
from perrequest._records import FLIGHTS

WAIT = 10


@pytest.fixture(autouse=True)
def _collect_tasks_left_pending() -> Iterator[None]:
    tracing = sys.gettrace()  # coverage's, when it measures
    yield
    sys.settrace(tracing)  # whatever a failed test left set: gone
    logging.getLogger("asyncio").disabled = True
    try:
        gc.collect()
    finally:
        logging.getLogger("asyncio").disabled = False


def _in_a_loop(call: Callable[[], Any], name: str) -> threading.Thread:
    """``call()`` awaited in a scope on a new loop of a new thread, started."""

    async def main() -> None:
        async with request_scope():
            await call()

    thread = threading.Thread(target=lambda: asyncio.run(main()), name=name, daemon=True)
    thread.start()
    return thread


def _parked_before_registering(
    call: Callable[[], Any], name: str, until: threading.Event
) -> threading.Thread:
    """``call()`` in a thread that stops between the shared tier's locked lookup (a miss)
    and its lock-free registration until ``until``: where any thread may be preempted."""
    parked = threading.Event()

    def trace(frame: Any, event: str, arg: Any) -> None:
        if (
            event == "call"
            and frame.f_code.co_name in ("run", "run_async")
            and frame.f_back is not None
            and frame.f_back.f_code.co_name in ("get", "get_async")
        ):
            parked.set()
            until.wait(WAIT)

    def body() -> None:
        previous = sys.gettrace()  # coverage's, when it measures: left running after
        sys.settrace(trace)
        try:
            call()
        finally:
            sys.settrace(previous)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    assert parked.wait(WAIT)
    return thread


def test_a_dead_record_whose_key_moved_never_unregisters_live_ones() -> None:
    """drop_dead could not find a dead record whose key's hash moved by its key, and took it
    out with take_out, which empties the flights and files the live ones again: a thread
    registering meanwhile found a live key free and computed it too (HEAD 8998fef)."""
    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(10_000)
    calls, release, refiling = [], threading.Event(), threading.Event()

    class Slow:  # hashed as the look files its key again: the window, made wide
        def __hash__(self) -> int:
            if threading.current_thread().name == "trigger" and not refiling.is_set():
                refiling.set()
                time.sleep(0.5)
            return 1

    @request_memo(shared=cache)
    async def pending(m: Model) -> None:
        if m.pk == 0:
            m.pk = 10_000  # the key's hash moves (a save assigning the pk)
        await asyncio.Event().wait()  # its loop is closed while it waits here

    @request_memo(shared=cache)
    async def quick(n: int) -> int:
        return n

    @request_memo(shared=cache)
    def work(s: Slow) -> int:
        calls.append(threading.current_thread().name)
        release.wait(WAIT)
        return 1

    loop = asyncio.new_event_loop()
    with request_scope():  # the tasks copy its context: its store
        for n in range(FLIGHTS - 1):
            loop.create_task(pending(Model(n)))  # noqa: RUF006 (left pending)
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()
    slow = Slow()

    def compute() -> None:
        with request_scope():
            work(slow)

    try:
        first = threading.Thread(target=compute, name="first", daemon=True)
        first.start()
        flights = _shared._guarded[id(cache)]._flights
        deadline = time.monotonic() + WAIT
        while len(flights) < FLIGHTS and time.monotonic() < deadline:
            time.sleep(0.01)
        second = _parked_before_registering(compute, "second", refiling)
        _in_a_loop(lambda: quick(1), "trigger").join(WAIT)  # past FLIGHTS: a look
        assert len(flights) < FLIGHTS, "no look: the test tests nothing"
        refiling.set()  # the second registers now, if it has not yet
        time.sleep(0.3)
        during = list(calls)
    finally:
        refiling.set()
        release.set()
    first.join(WAIT)
    second.join(WAIT)
    assert during == ["first"], f"work(slow) computed twice at once: {during}"


def _run_in_scope(call: Any) -> Any:
    async def main() -> Any:
        async with request_scope():
            return await call

    return asyncio.run(main())


def test_a_dropped_task_collected_never_unregisters_the_live_computation_of_its_key() -> None:
    """A dead task that drop_dead unregistered is collected: its coroutine closes, and
    _flight.failed popped whatever was filed under its key since, the record of the caller
    computing it now, to put it back: in between a thread registering found the key free
    and computed it too (HEAD 8998fef)."""
    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(10_000)
    calls, go, window = [], threading.Event(), threading.Event()

    @request_memo(shared=cache)
    async def user(n: int) -> int:
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "closed":
            await asyncio.Event().wait()  # its loop is closed while it waits here
        while not go.is_set():
            await asyncio.sleep(0.01)
        return n

    @request_memo(shared=cache)
    async def quick(n: int) -> int:
        return n

    def leave_pending() -> None:
        loop = asyncio.new_event_loop()
        with request_scope():  # the tasks copy its context: its store
            for n in range(FLIGHTS):
                loop.create_task(user(n))  # noqa: RUF006 (collected: the test)
            loop.run_until_complete(asyncio.sleep(0.05))
            loop.close()

    met: list[object] = []

    def put_back(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code.co_name == "failed":
            cache_, key = frame.f_locals.get("cache"), frame.f_locals.get("key")
            if cache_ is _shared._guarded[id(cache)] and cache_._flights.get(key) is not None:
                met.append(key)  # a dropped task ends where a live one computes its key now
        if (
            event == "call"
            and frame.f_code.co_name == "_put_back"
            and frame.f_locals.get("record") is not None
            and not window.is_set()
        ):
            window.set()
            time.sleep(0.5)
        return put_back if event == "call" else None

    gc.disable()
    try:
        closed = threading.Thread(target=leave_pending, name="closed")
        closed.start()
        closed.join(WAIT)
        flights = _shared._guarded[id(cache)]._flights
        _in_a_loop(lambda: quick(1), "trigger").join(WAIT)  # past FLIGHTS: a look
        assert len(flights) < FLIGHTS, "no look: the test tests nothing"
        live = _in_a_loop(lambda: user(1), "live")
        deadline = time.monotonic() + WAIT
        while "live" not in calls and time.monotonic() < deadline:
            time.sleep(0.01)
        other = _parked_before_registering(lambda: _run_in_scope(user(1)), "other", window)
        previous = sys.gettrace()  # coverage's, when it measures: left running after
        sys.settrace(put_back)
        try:
            gc.enable()
            gc.collect()  # the dropped tasks: their coroutines close, each in _flight.failed
        finally:
            sys.settrace(previous)
        assert met, "no dropped task ended where another computes: the test tests nothing"
        window.set()  # the other registers now, if it has not yet
        time.sleep(0.3)
        during = [name for name in calls if name != "closed"]
    finally:
        gc.enable()
        window.set()
        go.set()
    live.join(WAIT)
    other.join(WAIT)
    assert during == ["live"], f"user(1) computed twice at once: {during}"
