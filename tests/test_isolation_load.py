"""Isolation under load: thousands of concurrent requests through real servers.

Every request stores its own id and memoizes a function whose key is the same
in every request (see ``reliability_apps``); it yields, then reads its values
back in the handler, the streaming body, a background task (ASGI) and the
body's close() (WSGI). Any value from another request is counted as a
mismatch. The tests assert that there were none, *and* that every check ran,
so a test that checked nothing cannot pass.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import reliability_apps as apps
from servers import HOST, free_port, serve_gunicorn, serve_subprocess, serve_uvicorn
from test_stream_cleanup import _argv

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

REQUESTS = 2000
CLIENTS = 16  # concurrent connections, each with its own keep-alive client

# Checks made by one request, by place (see reliability_apps).
ASGI_ASYNC_CHECKS = {
    "fresh": 1,
    "handler": 1,
    "handler.memo": 2,
    "stream": apps.CHUNKS,
    "stream.memo": 2 * apps.CHUNKS,
    "background": 1,
    "background.memo": 2,
}
ASGI_SYNC_CHECKS = {
    "fresh": 1,
    "handler_sync": 1,
    "handler_sync.memo": 1,
    "background_sync": 1,
    "background_sync.memo": 1,
}
WSGI_CHECKS = {
    "thread": 1,
    "fresh": 1,
    "handler": 1,
    "handler.memo": 1,
    "stream": apps.CHUNKS,
    "stream.memo": apps.CHUNKS,
    "close": 1,
    "close.memo": 1,
}


def expected_places(*parts: tuple[int, dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for requests, checks in parts:
        for where, count in checks.items():
            total[where] = total.get(where, 0) + requests * count
    return total


def wait_for_checks(read: Callable[[], dict[str, Any]], total: int) -> dict[str, Any]:
    """Background tasks and close() run after the client has its response: wait for them."""
    deadline = time.monotonic() + 20
    tally = read()
    while tally["checks"] < total and time.monotonic() < deadline:
        time.sleep(0.05)
        tally = read()
    return tally


# uvicorn picks uvloop and httptools when installed (``uvicorn[standard]``, the usual
# production install), and asyncio with h11 otherwise: both run.
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_uvicorn_asyncio_requests_never_see_another_requests_values(loop: str) -> None:
    apps.TALLY.reset()
    paths = [f"/iso/a{i}" if i % 4 else f"/iso-sync/s{i}" for i in range(REQUESTS)]
    bad_bodies: list[str] = []

    async def client(base: str, chunk: list[str]) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            for path in chunk:
                response = await http.get(path)
                rid = path.rsplit("/", 1)[-1]
                if response.status_code != 200 or response.content != apps.expected_body(rid):
                    bad_bodies.append(f"{path}: {response.status_code} {response.content!r}")

    async def clients(base: str) -> None:
        await asyncio.gather(*(client(base, paths[i::CLIENTS]) for i in range(CLIENTS)))

    http = "httptools" if loop == "uvloop" else "h11"
    with serve_uvicorn(apps.asgi_app, loop=loop, http=http) as base:
        asyncio.run(clients(base))
        sync_requests = sum(1 for path in paths if path.startswith("/iso-sync/"))
        expected = expected_places(
            (REQUESTS - sync_requests, ASGI_ASYNC_CHECKS), (sync_requests, ASGI_SYNC_CHECKS)
        )
        tally = wait_for_checks(apps.TALLY.snapshot, sum(expected.values()))
        served = httpx.get(f"{base}/tally").json()

    assert bad_bodies == []
    assert tally["mismatches"] == 0, tally["examples"]
    assert tally["where"] == expected
    assert tally["checks"] == sum(expected.values()) > 20_000
    # tag() ran exactly once per request: memoized within it, never shared across.
    assert tally["tag_calls"] == REQUESTS
    assert served["checks"] == tally["checks"]  # the endpoint reports the same tally


def test_gunicorn_gthread_requests_never_see_another_requests_values() -> None:
    paths = [f"/iso/w{i}" for i in range(REQUESTS)]

    def client(base: str, chunk: list[str]) -> list[str]:
        bad: list[str] = []
        with httpx.Client(base_url=base, timeout=30) as http:
            for path in chunk:
                response = http.get(path)
                rid = path.rsplit("/", 1)[-1]
                if response.status_code != 200 or response.content != apps.expected_body(rid):
                    bad.append(f"{path}: {response.status_code} {response.content!r}")
        return bad

    with serve_gunicorn("reliability_apps:wsgi_app", worker_class="gthread", threads=8) as base:
        chunks = [paths[i::CLIENTS] for i in range(CLIENTS)]
        with ThreadPoolExecutor(CLIENTS) as pool:
            bad_bodies = [
                bad for result in pool.map(client, [base] * CLIENTS, chunks) for bad in result
            ]
        expected = expected_places((REQUESTS, WSGI_CHECKS))
        tally = wait_for_checks(lambda: httpx.get(f"{base}/tally").json(), sum(expected.values()))

    assert bad_bodies == []
    assert tally["mismatches"] == 0, tally["examples"]
    assert tally["where"] == expected
    assert tally["checks"] == sum(expected.values()) > 20_000
    assert tally["tag_calls"] == REQUESTS


# -- many clients at once under uvicorn, hypercorn and granian, some hanging up -----------

HANGUPS = 300


async def _stream_then_hang_up(port: int, path: str, keep: int, reset: bool) -> None:
    """Read ``keep`` bytes of a long body (0: none), then close, with a RST if ``reset``."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await writer.drain()
    received = 0
    while received < keep:
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data:
            break
        received += len(data)
    if reset:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _pipelined(port: int, stream: str, paths: list[str]) -> bytes:
    """A short stream, whose background task runs as the requests pipelined behind it
    start (uvicorn starts them from its task), then those requests; all answers."""
    reader, writer = await asyncio.open_connection(HOST, port)
    requests = [stream + "&chunks=3", *paths]
    writer.write(b"".join(f"GET {p} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() for p in requests))
    received = b""
    last = paths[-1].rsplit("/", 1)[-1].encode()
    while not received.endswith(b"%s %s" % (last, last)):
        data = await asyncio.wait_for(reader.read(65536), 10)
        if not data:
            break
        received += data
    writer.close()
    return received


async def _hang_ups_and_requests(base: str, port: int) -> list[str]:
    """HANGUPS requests, 40 at a time: abandoned streams, requests whose answer is read, and
    short streams with requests pipelined behind them."""
    rng = random.Random(1)
    limit = asyncio.Semaphore(40)
    wrong: list[str] = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def one(n: int) -> None:
            path = f"{rng.choice(['', '/sub'])}/%s/r-{n}"
            async with limit:
                stream = path % "stream" + f"?kind={rng.choice(['sync', 'async'])}"
                if n % 5 < 2:
                    keep = rng.choice([0, 20_000, 200_000])
                    await _stream_then_hang_up(port, stream, keep, rng.random() < 0.5)
                elif n % 5 == 2:
                    behind = [f"/plain/r-{n}-{k}" for k in range(2)]
                    received = await _pipelined(port, stream, behind)
                    answers = [f"r-{n}-{k} r-{n}-{k}".encode() for k in range(2)]
                    if answers[0] not in received or not received.endswith(answers[1]):
                        wrong.append(f"pipelined behind {stream}: {received[-200:]!r}")
                else:
                    response = await client.get(path % rng.choice(["plain", "plain-sync"]))
                    if response.text != f"r-{n} r-{n}":
                        wrong.append(f"{path % '...'}: {response.status_code} {response.text}")

        await asyncio.gather(*(one(n) for n in range(HANGUPS)))
    return wrong


@pytest.mark.parametrize(
    ("server", "base_http"),
    [
        ("uvicorn", "none"),
        ("uvicorn-asyncio", "inside"),
        ("hypercorn", "outside"),
        ("granian", "inside"),
    ],
)
def test_hang_ups_under_load_never_show_a_request_another_requests_values(
    server: str, base_http: str
) -> None:
    """Streams abandoned mid-body (FIN or RST) while other requests run, with collections
    in their middle, on each server; a sub-app with its own middleware; Starlette's
    BaseHTTPMiddleware outside or inside ours. Every read in every place (stream_apps's
    load_app) sees its own request's values, none once its scope has closed (a task and a
    thread that outlive the request), never another request's, and every scope closes."""
    port = free_port()
    argv = _argv(server, port, "stream_apps:load_app")
    env = {"PERREQUEST_TEST_BASE_HTTP": base_http}
    with serve_subprocess(argv, port, env=env) as base:
        wrong = asyncio.run(_hang_ups_and_requests(base, port))
        deadline = time.monotonic() + 20
        while True:
            tally = httpx.get(f"{base}/tally", timeout=10).json()
            checks = tally["checks"]
            streams = checks.get("handler", 0)
            done = checks.get("outliving task") == checks.get("outliving thread") == streams
            if (done and tally["live"] == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert wrong == []
    assert tally["bad"] == [], tally
    assert tally["live"] == 0, tally
    assert done, tally
    assert streams > 50 and checks["handler thread"] + checks["sync handler"] > 100, checks
    assert checks["sync chunk"] > 0 and checks["async chunk"] > 0, checks
