"""Attacks on @request_batch: several event loops in one thread and scope, and
bind_scope carrying the batch fetch it is called in."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from perrequest import bind_scope, request_batch, request_scope


def _async_loader(delay: float = 0.05) -> tuple[Any, list[list[int]]]:
    calls: list[list[int]] = []

    @request_batch
    async def users(keys: list[int]) -> list[str]:
        calls.append(list(keys))
        await asyncio.sleep(delay)
        return [f"u{k}" for k in keys]

    return users, calls


def test_a_loop_run_again_after_another_loop_in_its_thread_joins_its_own_flight() -> None:
    """A worker's loop (run_until_complete per job) left a key in flight; an
    asyncio.run in the same thread and scope came between; the next job on the first
    loop loaded that key again: it joins the flight, never fetches it twice at once."""
    users, calls = _async_loader()

    async def start() -> Any:
        future = users.load(1)
        for _ in range(3):
            await asyncio.sleep(0)  # the batch's task has started
        return future

    async def other() -> str:
        return str(await users.load(2))

    loop = asyncio.new_event_loop()
    try:
        with request_scope():
            first = loop.run_until_complete(start())
            assert calls == [[1]]
            assert asyncio.run(other()) == "u2"

            async def again() -> list[str]:
                return list(await asyncio.gather(first, users.load(1)))

            assert loop.run_until_complete(again()) == ["u1", "u1"]
            assert calls == [[1], [2]]  # before: [[1], [2], [1]]
    finally:
        loop.close()


def test_a_loop_run_again_with_a_batch_pending_shares_it() -> None:
    """The same with the first loop's batch still pending (its start scheduled, not run):
    the key loaded again in the next job joins that batch."""
    users, calls = _async_loader()

    async def start() -> Any:
        return users.load(1)  # pending: the loop stops before the batch starts

    async def other() -> str:
        return str(await users.load(2))

    loop = asyncio.new_event_loop()
    try:
        with request_scope():
            first = loop.run_until_complete(start())
            assert asyncio.run(other()) == "u2"

            async def again() -> list[str]:
                return list(await asyncio.gather(first, users.load(1)))

            assert loop.run_until_complete(again()) == ["u1", "u1"]
            assert sorted(calls) == [[1], [2]]
    finally:
        loop.close()


def test_a_load_in_a_thread_whose_former_loop_now_runs_in_another_gets_its_own_loops() -> None:
    """A loop run in one thread, then (its job not done) in another: a load in the first
    thread, on a loop of its own, gets a future of that loop and its own batch, not one
    of the loop running elsewhere (which its task cannot await)."""
    users, calls = _async_loader(delay=0.3)

    async def start() -> Any:
        future = users.load(1)
        for _ in range(3):
            await asyncio.sleep(0)
        return future

    loop = asyncio.new_event_loop()
    try:
        with request_scope():
            first = loop.run_until_complete(start())
            out: list[Any] = []

            def elsewhere() -> None:
                async def finish() -> Any:
                    return await first

                out.append(loop.run_until_complete(finish()))

            thread = threading.Thread(target=bind_scope(elsewhere), daemon=True)
            thread.start()
            while not loop.is_running():
                pass

            async def here() -> str:
                return str(await asyncio.wait_for(users.load(2), 5))

            assert asyncio.run(here()) == "u2"  # before: RuntimeError (another loop's future)
            thread.join(5)
            assert out == ["u1"]
            assert sorted(calls) == [[1], [2]]
    finally:
        for _ in range(500):  # the other thread's run ends with its batch
            if not loop.is_running():
                break
            time.sleep(0.01)
        loop.close()
