"""waitress, cheroot, Tornado's ``WSGIContainer``, Twisted's ``WSGIResource``, hypercorn's
own WSGI interface and daphne, served for real and loaded.

The apps are in tests/more_servers_apps.py (a Flask app wrapped by ``PerRequest``
for the WSGI servers, a Starlette app with the ASGI middleware for daphne, each
beside an app that perrequest does not wrap). Under concurrent clients no
request sees another's values, every scope is closed once the responses are
sent, and the servers' threads (and Tornado's executor threads, and its loop)
hold nothing between requests; clients that hang up mid-body leave no scope
open, and no body's cleanup sees another request's store.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from more_servers_apps import WORKER_THREADS
from servers import HOST, free_port, read_part_then_reset, serve_subprocess

import perrequest
from perrequest._active import _current
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware

# Server farms: CI runs them (make test); make check, the fast loop, skips them.
pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

# hypercorn serves a WSGI app itself: it calls, iterates and closes it in the loop's default
# executor (no context copied), and sends each chunk through run_coroutine_threadsafe.
WSGI_SERVERS = ("waitress", "cheroot", "tornado", "tornado-inline", "twisted", "hypercorn")
SERVERS = (*WSGI_SERVERS, "daphne")
CLIENTS = 8
REQUESTS = 160  # per test: half views, half short streamed bodies
CHUNKS = 20  # of a short streamed body (more_servers_apps' default)


@contextmanager
def _serve(server: str) -> Iterator[str]:
    port = free_port()
    if server == "daphne":
        argv = [sys.executable, "-m", "daphne", "-b", HOST, "-p", str(port)]
        argv += ["-v", "0", "more_servers_apps:asgi_app"]
    elif server == "hypercorn":
        argv = [sys.executable, "-m", "hypercorn", "-b", f"{HOST}:{port}"]
        argv += ["more_servers_apps:wsgi_app"]
    else:
        argv = [sys.executable, "tests/more_servers_apps.py", server, str(port)]
    with serve_subprocess(argv, port) as url:
        yield url


def _state(client: httpx.Client, expect: dict[str, int], cleanups: int = 0) -> dict[str, Any]:
    """The tally once every check expected has run, ``cleanups`` bodies have run their
    ``finally``, and every scope has closed (bodies finish, and close, after the client
    has its bytes; an abandoned async body's cleanup runs in a task after its scope)."""
    deadline = time.monotonic() + 15
    while True:
        state: dict[str, Any] = client.get("/state").json()
        done = all(state["checks"].get(place, 0) >= n for place, n in expect.items())
        done = done and sum(state["finally"].values()) >= cleanups
        if (done and state["live"] == 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def _stream_query(server: str, n: int) -> str:
    if server == "daphne":
        return f"kind={('sync', 'async')[n % 2]}"
    if server == "tornado":
        # The chunks are fetched in executor threads that carry no context; each sees its
        # own store all the same. Flask's stream_with_context cannot work there (Flask's
        # contexts cross requests, the response is never sent: docs/frameworks/wsgi.md).
        return "plain=1"
    return "plain=1" if n % 4 == 1 else ""  # without stream_with_context too


def _one(client: httpx.Client, server: str, n: int) -> str | None:
    rid = f"r-{n}"
    if n % 2:
        response = client.get(f"/stream?rid={rid}&{_stream_query(server, n)}")
        return None if response.content == b"x" * 16 * CHUNKS else f"{rid}: {response.text!r}"
    seen = client.get("/iso", params={"rid": rid}).text
    return None if seen.startswith(f"{rid} {rid}") else f"{rid} saw {seen!r}"


def _raw_everywhere(client: httpx.Client, base: str) -> list[dict[str, Any]]:
    """``/raw`` from enough concurrent clients that every worker thread answers some."""

    def get(_: int) -> dict[str, Any]:
        with httpx.Client(base_url=base, timeout=10) as own:
            return own.get("/raw").json()  # type: ignore[no-any-return]

    seen: list[dict[str, Any]] = []
    with ThreadPoolExecutor(WORKER_THREADS * 2) as pool:
        for _ in range(10):
            seen += pool.map(get, range(WORKER_THREADS * 4))
            if len({s["thread"] for s in seen}) >= WORKER_THREADS or len(seen) > 50:
                break
    return seen


@pytest.mark.parametrize("server", SERVERS)
def test_concurrent_requests_keep_their_own_values_and_leave_nothing_behind(server: str) -> None:
    with _serve(server) as base, httpx.Client(base_url=base, timeout=20) as client:

        def run(worker: int) -> list[str]:
            with httpx.Client(base_url=base, timeout=20) as own:
                wrong = [
                    bad
                    for n in range(worker, REQUESTS, CLIENTS)
                    if (bad := _one(own, server, n)) is not None
                ]
                if server != "daphne":  # a file body (waitress: its wsgi.file_wrapper)
                    seen = own.get("/file", params={"rid": f"file-{worker}"}).text
                    wrong += [] if seen == f"file-{worker} file-{worker}" else [seen]
                raw = own.get("/raw").json()  # the same connection, after ours
                return wrong + ([] if raw["var"] == "None" else [f"raw saw {raw}"])

        with ThreadPoolExecutor(CLIENTS) as pool:
            wrong = [bad for bads in pool.map(run, range(CLIENTS)) for bad in bads]
        streams = REQUESTS // 2
        views = REQUESTS // 2 + (0 if server == "daphne" else CLIENTS)
        state = _state(client, {"view": views, "chunk": streams * CHUNKS})
        raw = _raw_everywhere(client, base)
        pool_state: Any = client.get("/pool").json() if server == "tornado" else None

    assert wrong == [], wrong
    assert state["bad"] == [], state["bad"]
    assert state["live"] == 0, state
    assert state["checks"]["view after sleep"] == REQUESTS // 2, state
    assert state["checks"]["chunk"] == streams * CHUNKS, state
    assert state["finally"].get("other", 0) == 0, state
    # Nothing left set in the server's threads: an app beside ours finds no store.
    assert all(r["var"] == "None" and r["in_scope"] is False for r in raw), raw
    if server == "daphne":
        assert all(r["pool"]["var"] == "None" for r in raw), raw
    else:  # every worker thread (Tornado's default runs the app on its loop)
        workers = 1 if server == "tornado-inline" else WORKER_THREADS
        assert len({r["thread"] for r in raw}) >= workers, raw
    if server == "tornado":  # with an executor of several threads
        # One body's chunks were fetched on several executor threads, and none of those
        # threads, nor the loop's, keeps a store.
        assert state["chunk_threads"] > 1, state
        assert pool_state["loop"]["var"] == "None", pool_state
        threads = {p["thread"] for p in pool_state["pool"]}
        assert len(threads) == WORKER_THREADS, pool_state
        assert all(p["var"] == "None" for p in pool_state["pool"]), pool_state


DISCONNECTS = 8


@pytest.mark.parametrize("server", SERVERS)
def test_clients_leaving_mid_body_leave_no_scope_and_no_cleanup_in_anothers(server: str) -> None:
    # Tornado buffers the whole body before it sends a byte (its WSGIContainer, with an
    # executor or inline): keep it small there, still 75 times what the client reads.
    chunks = 300 if server.startswith("tornado") else 2000
    with _serve(server) as base, httpx.Client(base_url=base, timeout=20) as client:
        port = int(base.rsplit(":", 1)[1])
        for n in range(DISCONNECTS):
            query = _stream_query(server, n)
            path = f"/stream?rid=gone-{n}&chunks={chunks}&size=16384&{query}"
            read_part_then_reset(port, path)
            assert _one(client, server, 2 * n) is None  # a view while that body unwinds
        state = _state(client, {"view": DISCONNECTS}, cleanups=DISCONNECTS)
        raw = _raw_everywhere(client, base)

    assert state["bad"] == [], state["bad"]
    assert state["live"] == 0, state
    assert state["finally"].get("other", 0) == 0, state
    assert sum(state["finally"].values()) == DISCONNECTS, state  # every body cleaned up
    assert all(r["var"] == "None" for r in raw), raw


def test_twisted_skips_close_when_a_body_fails_yet_requests_keep_their_own_store() -> None:
    """docs/frameworks/wsgi.md: Twisted's ``WSGIResource`` hands a body's error to the
    reactor thread without calling ``close()``. Requests through the middleware on the
    same pool threads see their own store; each failed body's scope closes once Twisted
    has logged the error and dropped it."""
    with _serve("twisted") as base, httpx.Client(base_url=base, timeout=20) as client:
        for n in range(12):
            own = httpx.Client(base_url=base, timeout=20)
            with own, pytest.raises(httpx.HTTPError):  # the connection ends mid-body
                own.get("/fails", params={"rid": f"failed-{n}"}).read()
            assert _one(client, "twisted", 2 * n) is None  # a view: its own store only
        state = _state(client, {"view": 12})
    assert state["bad"] == [], state["bad"]
    assert state["live"] == 0, state


def test_a_body_iterated_on_a_loop_and_fetched_in_pool_threads_sees_its_store() -> None:
    """Tornado's ``WSGIContainer`` layout, in process: the app called in a pool thread,
    ``iter(body)`` on the loop, each ``next()`` with ``run_in_executor``. The store was
    made active on the loop until ``close()``, so the chunks, in the pool's threads,
    saw none."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        perrequest.set("rid", environ["rid"])
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            for _ in range(12):
                time.sleep(0.002)  # the next fetch goes to another thread
                yield f"{perrequest.get('rid')}@{threading.get_ident()} ".encode()

        return body()

    wrapped = RequestScopeMiddleware(app)
    executor = ThreadPoolExecutor(3)

    async def serve(rid: str) -> list[str]:
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(executor, wrapped, {"rid": rid}, lambda *a: None)
        chunks, iterator = [], iter(body)
        try:
            while (chunk := await loop.run_in_executor(executor, next, iterator, None)) is not None:
                chunks.append(chunk.decode())
        finally:
            body.close()  # type: ignore[attr-defined]
        return chunks

    async def main() -> tuple[list[list[str]], Any]:
        served = await asyncio.gather(*(serve(f"r{n}") for n in range(6)))
        return served, _current.get()

    with executor:
        served, on_loop = asyncio.run(main())
        barrier = threading.Barrier(3, timeout=5)
        held = list(executor.map(lambda _: (barrier.wait(), _current.get())[1], range(3)))

    for n, chunks in enumerate(served):
        assert [c.split("@")[0] for c in chunks] == [f"r{n}"] * 12, chunks
    assert len({c.split("@")[1] for chunks in served for c in chunks}) > 1  # several threads
    assert on_loop is None and held == [None] * 3
    assert live_scopes() == 0
