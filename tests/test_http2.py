"""HTTP/2: requests multiplexed on one connection, streams reset or abandoned mid-body.

Over HTTP/2 many requests share one connection and one server task, and a
client cancels one stream (RST_STREAM, as a browser does) without closing the
connection: the server reports the disconnect, and the stream's store closes
then. A stream the client only stops reading (httpx, leaving a response early,
sends no RST_STREAM) stays parked, its store with it, until the connection
closes. Each stream is one ASGI call with a store of its own. Real servers
(hypercorn and granian, HTTP/2 over cleartext with prior knowledge),
tests/http2_apps.py.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
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
            break  # leaves: httpx stops reading (sends no RST_STREAM), the connection stays


async def _live_after_abandoned_streams(base: str) -> tuple[int, int]:
    """Open stores while a connection holds 6 abandoned streams; and after it closes."""
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
def test_an_abandoned_streams_store_closes_by_the_time_its_connection_closes(
    server: str,
) -> None:
    port = free_port()
    with serve_subprocess(_argv(server, port), port) as base:
        during, after = asyncio.run(_live_after_abandoned_streams(base))
        tally = asyncio.run(_report(base))
    assert during <= 7  # the abandoned streams' (if still running) and /report's own
    assert after == 1, (during, after)  # only /report's own: every other store closed
    assert tally["bad"] == [], tally["bad"]


def _reset_streams(base: str, port: int) -> tuple[int, int]:
    """Open stores while 6 streams are mid-body; and once they were reset with RST_STREAM,
    the connection still open (h2 by hand: httpx sends no RST_STREAM)."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        streams = {}
        for n in range(6):
            stream = conn.get_next_available_stream_id()
            headers = [(":method", "GET"), (":path", f"/stream?rid=reset{n}")]
            headers += [(":scheme", "http"), (":authority", f"{HOST}:{port}")]
            conn.send_headers(stream, headers, end_stream=True)
            streams[stream] = 0
        sock.sendall(conn.data_to_send())
        while min(streams.values()) < 20_000:  # every body has sent chunks
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id] += len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            sock.sendall(conn.data_to_send())
        during = int(asyncio.run(_report(base))["live"])  # type: ignore[call-overload]
        for stream in streams:
            conn.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        while True:  # the connection stays open meanwhile
            after = int(asyncio.run(_report(base))["live"])  # type: ignore[call-overload]
            if after == 1 or time.monotonic() > deadline:
                return during, after
            time.sleep(0.1)


@pytest.mark.parametrize("server", ["hypercorn", "granian"])
def test_a_reset_streams_store_closes_while_its_connection_stays_open(server: str) -> None:
    """asgi.md said a reset stream stayed parked until its connection closed: its test had
    httpx abandon streams, which it never resets (a probe, 7 December 2026). Reset, the
    server reports the disconnect and the store closes, the connection open."""
    port = free_port()
    with serve_subprocess(_argv(server, port), port) as base:
        during, after = _reset_streams(base, port)
        tally = asyncio.run(_report(base))
    assert during == 7, during  # the six streams mid-body, and /report's own
    assert after == 1, (during, after)  # only /report's own: the reset streams' closed
    assert tally["cleanups"] == 6 and tally["bad"] == [], tally
