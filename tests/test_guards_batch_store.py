"""Guards of a batch's store (_entries._fill_many on a closed store) that no other test needed:
each test here fails with its guard deleted (a block-deletion mutation pass of the core, 5
December 2026)."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from keys import Model
from signals import RaiseAfter, RaiseAtCall, Signalled, interrupted_by

from perrequest import request_batch, request_scope


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
    ``__hash__`` as the fetched key is unregistered (told by its traceback) goes on, not
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
