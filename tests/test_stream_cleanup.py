"""A streaming body abandoned on a client disconnect cleans up in its own scope or none.

DESIGN.md, Lifetime: code of one request that runs after its response (a
streaming body's cleanup after a disconnect, run later by the garbage
collector or an async-generator finalizer) never reads or writes another
request's store. Real servers, real sockets reset mid-body, and other
requests in whose middle the collector runs (tests/stream_apps.py).
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from typing import Any

import httpx
import pytest
from servers import HOST, free_port, read_part_then_reset, serve_subprocess

# "uvicorn": uvloop and httptools (uvicorn[standard]); "uvicorn-asyncio": asyncio and h11;
# "hypercorn-trio": its trio worker, where an async generator left suspended at a disconnect
# is finalized later, by trio, outside any scope (docs/frameworks/asgi.md).
SERVERS = ("uvicorn", "uvicorn-asyncio", "hypercorn", "hypercorn-trio", "granian")
DISCONNECTS = 30
# ``make check`` (the fast loop) tries uvicorn's two; the others' runs are marked slow.
SERVERS_FAST_FIRST = [
    server if server.startswith("uvicorn") else pytest.param(server, marks=pytest.mark.slow)
    for server in SERVERS
]


def _argv(server: str, port: int, app: str = "stream_apps:app") -> list[str]:
    """The command that serves ``app`` (``module:attribute``) on ``port``."""
    argv = [sys.executable, "-m", server.split("-")[0]]
    if server == "uvicorn":
        argv += [app, "--host", HOST, "--port", str(port), "--loop", "uvloop"]
    elif server == "uvicorn-asyncio":
        argv += [app, "--host", HOST, "--port", str(port), "--loop", "asyncio", "--http", "h11"]
    elif server.startswith("hypercorn"):
        argv += [app, "--bind", f"{HOST}:{port}"]
        argv += ["--worker-class", "trio"] if server == "hypercorn-trio" else []
    else:
        argv += ["--interface", "asgi", "--host", HOST, "--port", str(port), app]
    return [*argv, "--log-level", "warning"]


def _stall_then_reset(port: int, path: str) -> None:
    """A client that reads a little and stops (the server's writes block: the body waits
    in ``send``), then goes away (RST)."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert sock.recv(1000), "the server closed the stream early"
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# The servers under which an async generator body is closed at once, in its own store.
AT_ONCE = ("uvicorn", "uvicorn-asyncio", "hypercorn")


def _cleanups(server: str, body: str, leave: Any, disconnects: int) -> dict[str, int]:
    """Clients leave ``disconnects`` streams (``leave``) while other requests run, with
    collections in their middle; what the abandoned bodies' cleanups saw."""
    port = free_port()
    with (
        serve_subprocess(_argv(server, port), port) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        for n in range(disconnects):
            leave(port, f"/stream/{body}?rid=stream-{n}")
            if n % 3 == 2:
                assert client.get("/collect", params={"rid": f"other-{n}"}).text == "True"
        for n in range(3):
            assert client.get("/collect", params={"rid": f"last-{n}"}).text == "True"
        counts: dict[str, int] = client.get("/counts").json()
    assert counts["other"] == 0, counts
    assert counts["cleanups"] > 0, counts  # the scenario happened
    return counts


@pytest.mark.parametrize("body", ["sync", "async", "async-bare"])
@pytest.mark.parametrize("server", SERVERS_FAST_FIRST)
def test_abandoned_stream_cleanups_never_see_another_requests_store(server: str, body: str) -> None:
    counts = _cleanups(server, body, read_part_then_reset, DISCONNECTS)
    if body != "sync" and server in AT_ONCE:  # docs/frameworks/asgi.md
        assert counts["own"] == counts["cleanups"], counts


@pytest.mark.slow  # a pause per client
@pytest.mark.parametrize("server", SERVERS)
def test_a_client_that_stops_reading_leaves_cleanups_in_their_own_store_or_none(
    server: str,
) -> None:
    """The body waits in the server's send when the client goes: an async generator with
    no await between chunks is then suspended at its yield (under trio, closed later by
    trio's finalizer, outside any scope)."""
    counts = _cleanups(server, "async-bare", _stall_then_reset, 6)
    if server in AT_ONCE:
        assert counts["own"] == counts["cleanups"], counts
