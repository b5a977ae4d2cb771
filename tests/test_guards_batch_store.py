"""Guards of a batch's store (_entries._fill_many on a closed store) that no other test needed:
each test here fails with its guard deleted (a block-deletion mutation pass of the core, 5
December 2026)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
from typing import Any

import pytest
from keys import Model
from signals import Interrupt, RaiseAfter, RaiseAtCall, Signalled, interrupted_by

from perrequest import bind_scope, request_batch, request_scope
from perrequest._batching import _BatchSpec


async def test_a_batch_that_ends_after_its_request_stores_nothing_and_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batch is pending as the scope closes; it is called all the same, its caller
    gets the value, and storing into the closed store is a quiet no-op (no ERROR)."""

    @request_batch
    async def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    async def handler_task() -> int:
        return await rows.load(7)

    with caplog.at_level(logging.DEBUG, logger="perrequest"):
        async with request_scope() as store:
            late = asyncio.create_task(handler_task())
            await asyncio.sleep(0)
        assert await asyncio.wait_for(late, 5) == 70
    assert len(store) == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_signal_as_a_sync_batch_unregisters_a_key_reaches_the_caller() -> None:
    """_batching._end: unregistering each fetched key is in a ``try`` for keys whose hash
    raises now. An exception a signal handler raised as that pop returned (Celery's soft
    time limit) was taken for such a key and dropped: the call returned as if nothing had
    happened. Nothing stays registered either way."""
    at = RaiseAfter(Signalled, "pop", "_end")

    @request_batch
    def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    with request_scope() as store:
        assert rows.load_many([1]) == [10]
        at.armed = True
        sys.setprofile(at)
        try:
            with pytest.raises(Signalled):
                rows.load_many([2, 3])
        finally:
            sys.setprofile(None)
        assert not at.armed, "the signal never came: the test tests nothing"
        assert not store._flights  # its other key unregistered all the same
        assert rows.load_many([2, 3]) == [20, 30]


def test_a_signal_in_a_keys_own_hash_as_a_sync_batch_unregisters_it_reaches_the_caller() -> None:
    """_batching._end: an ``Exception`` a signal handler raised inside the key's own
    ``__hash__`` as the fetched key is unregistered (told by type) goes on, not
    taken for a key whose hash raises now; the fetch is unregistered all the same."""
    at = RaiseAtCall(Signalled, "__hash__", "_end")

    @request_batch
    def rows(keys: list[Model]) -> list[int]:
        return [k.pk * 10 for k in keys]  # type: ignore[operator]

    with request_scope() as store:
        assert rows.load_many([Model(1)]) == [10]
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            rows.load_many([Model(2)])
        assert not store._flights
        assert rows.load_many([Model(2), Model(3)]) == [20, 30]


def _line_of(function: Any, text: str) -> int:
    """The number of the line of ``function`` that holds ``text``."""
    lines, first = inspect.getsourcelines(function)
    (at,) = [n for n, line in enumerate(lines, first) if text in line]
    return at


def test_a_fetch_that_ended_with_a_key_still_registered_is_not_waited_for() -> None:
    """_batching._fetch: a registered fetch that has ended (``other.ended``) counts as
    absent. An exception between registering a key (``flights[...] = me``) and noting it
    in ``me.keys`` leaves the key registered to a fetch whose end, unregistering the keys
    it noted, does not see it: here a KeyboardInterrupt a trace function raises (as a
    debugger's can; CPython looks for pending signals nowhere between those two lines, so
    no other way in was found). Without the check, a thread that then loads the key waits
    for that fetch, gives up after two one-second looks (it has ended), finds the same
    record again, and waits again: for ever."""
    code, line = _BatchSpec._fetch.__code__, _line_of(_BatchSpec._fetch, "me.keys.append(ck)")
    fired: list[int] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            at_it = event == "line" and frame.f_lineno == line and not fired
            if at_it and frame.f_locals["ck"] == 2:
                fired.append(2)
                raise Interrupt  # key 2 registered, not noted: key 1 was
            return local

        return local

    @request_batch
    def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    got: list[int] = []
    with request_scope() as store:
        assert rows.load_many([0]) == [0]  # past the loader's first load
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            with pytest.raises(Interrupt):
                rows.load_many([1, 2])
        finally:
            sys.settrace(previous)
        assert fired, "the interrupt never came: the test tests nothing"
        left = list(store._flights.values())
        assert len(left) == 1 and left[0].ended  # the case: ended, and still registered
        thread = threading.Thread(target=bind_scope(lambda: got.append(rows.load(2))))
        thread.daemon = True
        thread.start()
        thread.join(5)
        stranded = thread.is_alive()
        if stranded:  # the bug: let it go (it fetches the key once the record is gone)
            store._flights.clear()
            thread.join(5)
        assert not stranded, "the thread waits for a fetch that has ended, for ever"
        assert got == [20]
        assert not store._flights  # the thread's fetch took the stale record's place
        assert rows.load_many([1, 2]) == [10, 20]
