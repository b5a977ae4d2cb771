"""A streaming body abandoned on a client disconnect cleans up in its own scope or none.

DESIGN.md, Lifetime: code of one request that runs after its response (a
streaming body's cleanup after a disconnect, run later by the garbage
collector or an async-generator finalizer) never reads or writes another
request's store. Real servers, real sockets reset mid-body, and other
requests in whose middle the collector runs (tests/stream_apps.py).
"""

from __future__ import annotations

import sys

import httpx
import pytest
from servers import HOST, free_port, read_part_then_reset, serve_subprocess

# "uvicorn": uvloop and httptools (uvicorn[standard]); "uvicorn-asyncio": asyncio and h11.
SERVERS = ("uvicorn", "uvicorn-asyncio", "hypercorn", "granian")
DISCONNECTS = 30


def _argv(server: str, port: int, app: str = "stream_apps:app") -> list[str]:
    """The command that serves ``app`` (``module:attribute``) on ``port``."""
    argv = [sys.executable, "-m", server.split("-")[0]]
    if server == "uvicorn":
        argv += [app, "--host", HOST, "--port", str(port), "--loop", "uvloop"]
    elif server == "uvicorn-asyncio":
        argv += [app, "--host", HOST, "--port", str(port), "--loop", "asyncio", "--http", "h11"]
    elif server == "hypercorn":
        argv += [app, "--bind", f"{HOST}:{port}"]
    else:
        argv += ["--interface", "asgi", "--host", HOST, "--port", str(port), app]
    return [*argv, "--log-level", "warning"]


@pytest.mark.parametrize("body", ["sync", "async"])
@pytest.mark.parametrize("server", SERVERS)
def test_abandoned_stream_cleanups_never_see_another_requests_store(server: str, body: str) -> None:
    port = free_port()
    with (
        serve_subprocess(_argv(server, port), port) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        for n in range(DISCONNECTS):
            read_part_then_reset(port, f"/stream/{body}?rid=stream-{n}")
            if n % 3 == 2:  # other requests, with collections in their middle
                assert client.get("/collect", params={"rid": f"other-{n}"}).text == "True"
        for n in range(3):
            assert client.get("/collect", params={"rid": f"last-{n}"}).text == "True"
        counts = client.get("/counts").json()
    assert counts["other"] == 0, counts
    assert counts["cleanups"] > 0, counts  # the scenario happened
