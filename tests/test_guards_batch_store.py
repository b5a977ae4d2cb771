"""Guards of a batch's store (_entries._fill_many on a closed store) that no other test needed:
each test here fails with its guard deleted (a block-deletion mutation pass of the core, 5
December 2026)."""

from __future__ import annotations

import asyncio
import logging

import pytest

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
