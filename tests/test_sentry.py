"""perrequest beside Sentry, which most production apps run: Sentry wraps the app (and,
for Django, each middleware in a span), copies contexts into threads and keeps its own
scopes in ContextVars. Each framework under a real server with tracing on: requests keep
their own store, memos share their values within a request, every store closes, and
Sentry still reports the error of a failing view.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import HOST, free_port, serve_gunicorn, serve_subprocess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SERVERS = {
    "fastapi-uvicorn": ("fastapi", "uvicorn", "sentry_apps:app"),
    "flask-gunicorn-gthread": ("flask", "gunicorn", "sentry_apps:app"),
    "django-gunicorn-gthread": ("django", "gunicorn", "sentry_apps:wsgi"),
    "django-uvicorn": ("django", "uvicorn", "sentry_apps:asgi"),
}


@pytest.fixture(params=list(SERVERS))
def base(request: pytest.FixtureRequest) -> Iterator[str]:
    framework, server, spec = SERVERS[request.param]
    env = {"SENTRY_APP": framework}
    if server == "gunicorn":
        with serve_gunicorn(spec, worker_class="gthread", threads=4, env=env) as url:
            yield url
        return
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", spec, "--host", HOST, "--port", str(port)]
    if framework == "django":  # Django refuses the lifespan scope, and Sentry reports it
        argv += ["--lifespan", "off"]
    with serve_subprocess([*argv, "--log-level", "warning"], port, env=env) as url:
        yield url


def test_requests_keep_their_own_store_with_sentry_on(base: str) -> None:
    async def one(client: httpx.AsyncClient, n: int) -> dict[str, Any]:
        rid = f"r{n}"
        response = await client.get("/sync" if n % 2 else "/async", params={"rid": rid})
        assert response.status_code == 200, response.text
        seen: dict[str, Any] = response.json()
        assert seen["before"] is None and seen["seen"] == rid, seen
        assert seen["first"] == seen["second"] and seen["first"].startswith(f"{rid}:"), seen
        return seen

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            await asyncio.gather(*(one(client, n) for n in range(80)))
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            # A connection of its own: uvicorn closes the one an app's error escaped on.
            assert (await client.get("/boom")).status_code == 500
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for _ in range(100):  # the last close may still be on its way
                state = (await client.get("/_state")).json()
                if state["live"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert state["live"] == 0, state
            # Sentry was on, and saw no other error.
            assert [error.split(":")[0] for error in state["captured"]] == ["RuntimeError"], state

    asyncio.run(burst())
