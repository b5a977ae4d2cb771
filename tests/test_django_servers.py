"""The Django middleware under real servers: gunicorn (sync and gthread) and uvicorn.

gunicorn forks, so it runs the test project as a subprocess and the project
reports its open scopes at ``/_live``; uvicorn runs Django's ASGI application
in a thread of this process. One server of each kind per module.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import django_project
import httpx
import pytest
from servers import serve_gunicorn, serve_uvicorn

django_project.setup()

from django_project import settings as project_settings  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SERVERS = ["gunicorn-sync", "gunicorn-gthread", "uvicorn"]
_ENV = {"DJANGO_SETTINGS_MODULE": "django_project.settings"}


@pytest.fixture(scope="module", autouse=True)
def _project() -> Iterator[None]:
    with django_project.use_settings(project_settings):
        yield


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(kind, base URL) of a running server serving the test project."""
    kind = request.param
    if kind == "uvicorn":
        from django.core.asgi import get_asgi_application

        with serve_uvicorn(get_asgi_application()) as url:
            yield kind, url
        return
    worker = {"gunicorn-sync": ("sync", 1), "gunicorn-gthread": ("gthread", 8)}[kind]
    spec = "django_project.wsgi:application"
    with serve_gunicorn(spec, worker_class=worker[0], threads=worker[1], env=_ENV) as url:
        yield kind, url


def _get(url: str, **params: Any) -> Any:
    response = httpx.get(url, params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _live(base: str) -> dict[str, int]:
    """The server's open scopes (not counting the /_live request's own) and aborted streams."""
    return _get(f"{base}/_live")  # type: ignore[no-any-return]


def _wait_for(base: str, done: Any, what: str) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        live = _live(base)
        if done(live):
            return live
        assert time.monotonic() < deadline, f"{what}: {live}"
        time.sleep(0.05)


def test_one_store_per_request_shared_by_middleware_view_and_template(
    server: tuple[str, str],
) -> None:
    _, base = server
    lookups = []
    for path in ("shared", "sync", "async", "shared"):
        seen = _get(f"{base}/{path}/")
        assert seen["before"] is None  # nothing left over from an earlier request
        assert seen["mw"] == seen["lookup"] and seen["lookups"] == 1
        if path == "shared":
            assert seen["page"] == f"lookup={seen['lookup']}"
        lookups.append(seen["lookup"])
    assert len(set(lookups)) == 4  # never shared across requests
    _wait_for(base, lambda live: live["live"] == 0, "stores left open")


# Django warns when ASGI consumes a sync body (or WSGI an async one); that is the point here.
@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume")
@pytest.mark.parametrize("body", ["sync", "async"])
def test_streaming_body_sees_the_views_store(server: tuple[str, str], body: str) -> None:
    _, base = server
    response = httpx.get(f"{base}/stream/{body}/", timeout=30)
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert line == {
            "in_scope": True,
            "marker": response.headers["X-Marker"],
            "lookup": response.headers["X-Lookup"],
            "lookups": 1,
        }
    _wait_for(base, lambda live: live["live"] == 0, "streaming store left open")


def test_view_that_raises_closes_the_store(server: tuple[str, str]) -> None:
    _, base = server
    response = httpx.get(f"{base}/boom/", timeout=30)
    assert response.status_code == 500
    assert response.text == "500 in_scope=True marker=set-before-boom"
    _wait_for(base, lambda live: live["live"] == 0, "store of a failed request left open")


def test_client_disconnecting_mid_stream_closes_the_store(server: tuple[str, str]) -> None:
    kind, base = server
    # Under ASGI Django reads a sync streaming body to the end before sending it.
    path = "stream/slow-async/" if kind == "uvicorn" else "stream/slow/"
    aborted = _live(base)["aborted"]
    with httpx.stream("GET", f"{base}/{path}", timeout=30) as response:
        assert response.status_code == 200
        received = 0
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > 256 * 1024:
                break  # leave with most of the 64 MB body unread
    live = _wait_for(
        base,
        lambda live: live["live"] == 0 and live["aborted"] > aborted,
        "the stream's store stayed open after the client left",
    )
    assert live["aborted"] == aborted + 1


async def _fetch(base: str, target: str) -> tuple[int, bytes]:
    """A bare HTTP/1.0 GET: httpx's pool gets slow with hundreds of connections at once.
    uvicorn's httptools protocol may answer it chunked all the same: decoded here."""
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(f"GET {target} HTTP/1.0\r\nHost: {url.netloc}\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        chunks = []
        while True:
            size, _, body = body.partition(b"\r\n")
            if not int(size, 16):
                break
            chunks.append(body[: int(size, 16)])
            body = body[int(size, 16) + 2 :]
        body = b"".join(chunks)
    return int(head.split()[1]), body


@pytest.mark.slow
def test_concurrent_requests_never_see_each_other(server: tuple[str, str]) -> None:
    """300 requests at once, sync (echo) and async (aecho) views, each storing its own value."""
    _, base = server
    total = 300

    async def one(n: int) -> bool:
        view = ("echo", "aecho")[n % 2]
        value = f"{view}-{n}-{time.monotonic_ns()}"
        status, body = await _fetch(base, f"/{view}/?v={value}")
        assert status == 200, body
        return bool(json.loads(body) == {"before": None, "seen": value, "memo": value})

    async def run() -> list[bool]:
        return await asyncio.gather(*(one(n) for n in range(total)))

    results = asyncio.run(run())
    cross_talk = results.count(False)
    assert len(results) == total and cross_talk == 0
    _wait_for(base, lambda live: live["live"] == 0, "stores left open after the burst")


def _check_wrapped(base: str) -> None:
    first, second = _get(f"{base}/shared/"), _get(f"{base}/shared/")
    for seen in (first, second):
        assert seen["before"] is None and seen["lookups"] == 1
        assert seen["page"] == f"lookup={seen['lookup']}" == f"lookup={seen['mw']}"
    assert first["lookup"] != second["lookup"]
    response = httpx.get(f"{base}/stream/async/", timeout=30)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 3
    assert {line["marker"] for line in lines} == {response.headers["X-Marker"]}
    assert all(line["in_scope"] and line["lookups"] == 1 for line in lines)
    _wait_for(base, lambda live: live["live"] == 0, "stores left open")


def test_wsgi_wrapper_alternative_serves_django() -> None:
    """Django's WSGI app wrapped in perrequest.wsgi, under gunicorn, MIDDLEWARE without ours."""
    env = {"DJANGO_SETTINGS_MODULE": "django_project.settings_wrapped"}
    with serve_gunicorn("django_project.wrapped_wsgi:application", env=env) as base:
        _check_wrapped(base)


def test_asgi_wrapper_alternative_serves_django() -> None:
    """Wrapping Django's ASGI app in perrequest.asgi instead of using MIDDLEWARE.

    The store then also covers Django's own request handling around the
    middleware stack, and closes when the ASGI app returns, without relying
    on response.close() or garbage collection.
    """
    from django.core.asgi import get_asgi_application
    from django.test import override_settings

    from perrequest.asgi import RequestScopeMiddleware

    inner = [m for m in project_settings.MIDDLEWARE if not m.startswith("perrequest.")]
    with override_settings(MIDDLEWARE=inner):
        app = RequestScopeMiddleware(get_asgi_application())
    with serve_uvicorn(app) as base:
        _check_wrapped(base)
