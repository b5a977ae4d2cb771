"""HTTP/2: requests multiplexed on one connection, streams reset mid-body.

Over HTTP/2 many requests share one connection and one server task, and a
client cancels one stream (RST_STREAM) without closing the connection. Each
stream is still one ASGI call, so each gets its own store, and a reset stream's
store closes at the latest with its connection. Real servers (hypercorn and
granian, HTTP/2 over cleartext with prior knowledge), tests/http2_apps.py.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import pytest
from servers import HOST, free_port, serve_subprocess

STREAMS = 40


def _argv(server: str, port: int) -> list[str]:
    if server == "hypercorn":
        argv = ["-m", "hypercorn", "http2_apps:app", "--bind", f"{HOST}:{port}"]
    else:
        argv = ["-m", "granian", "--interface", "asgi", "--http", "2"]
        argv += ["--host", HOST, "--port", str(port), "http2_apps:app"]
    return [sys.executable, *argv, "--log-level", "warning"]


def _client(base: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base, http1=False, http2=True, timeout=15)


async def _multiplexed(base: str) -> list[dict[str, object]]:
    async with _client(base) as client:
        replies = await asyncio.gather(
            *(client.get("/echo", params={"rid": f"r{n}"}) for n in range(STREAMS))
        )
    assert {reply.http_version for reply in replies} == {"HTTP/2"}
    return [reply.json() for reply in replies]


async def _report(base: str) -> dict[str, object]:
    async with _client(base) as client:
        reply = await client.get("/report")
    return dict(reply.json())


async def _abandon(client: httpx.AsyncClient, rid: str) -> None:
    async with client.stream("GET", "/stream", params={"rid": rid}) as reply:
        assert reply.http_version == "HTTP/2"
        async for _ in reply.aiter_raw():
            break  # leaves: httpx resets the stream, the connection stays


async def _live_after_reset_streams(base: str) -> tuple[int, int]:
    """Open stores while a connection holds 6 reset streams; and after it closes."""
    async with _client(base) as other:
        async with _client(base) as client:
            await asyncio.gather(*(_abandon(client, f"s{n}") for n in range(6)))
            # Before the echo: its scope closes as its app returns, after the response's
            # last frame, so it could still be open (one more) when /report runs.
            during = (await other.get("/report")).json()["live"]
            await client.get("/echo", params={"rid": "same-connection"})
        deadline = time.monotonic() + 10
        while True:
            after = (await other.get("/report")).json()["live"]
            if after == 1 or time.monotonic() > deadline:
                return during, after
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
def test_multiplexed_streams_each_get_their_own_store(server: str) -> None:
    port = free_port()
    with serve_subprocess(_argv(server, port), port) as base:
        replies = asyncio.run(_multiplexed(base))
        for _ in range(2):
            replies += asyncio.run(_multiplexed(base))
        tally = asyncio.run(_report(base))
    for reply in replies:
        assert reply["seen"] == [reply["rid"]] * 3, reply
        assert reply["misses"] == 1, reply  # three concurrent calls, one computation
    assert tally["bad"] == [], tally["bad"]
    assert tally["checks"] >= 3 * STREAMS * 4


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
def test_a_reset_streams_store_closes_by_the_time_its_connection_closes(server: str) -> None:
    port = free_port()
    with serve_subprocess(_argv(server, port), port) as base:
        during, after = asyncio.run(_live_after_reset_streams(base))
        tally = asyncio.run(_report(base))
    assert during <= 7  # the reset streams' (if still running) and /report's own
    assert after == 1, (during, after)  # only /report's own: every other store closed
    assert tally["bad"] == [], tally["bad"]
