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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import reliability_apps as apps
from servers import serve_gunicorn, serve_uvicorn

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


def test_uvicorn_asyncio_requests_never_see_another_requests_values() -> None:
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

    with serve_uvicorn(apps.asgi_app) as base:
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
