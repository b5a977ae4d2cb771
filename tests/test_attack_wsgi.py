"""The WSGI and thread side, attacked as an adversarial user would, on real servers.

Bodies that fail in odd places, threads forked or pooled around a request's
store: after each, the server's thread holds no store and every scope is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import multiprocessing
import socket
import struct
import sys
import threading
import time
import wsgiref.simple_server
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync
from servers import HOST, free_port, serve_gunicorn, serve_subprocess

import perrequest
from perrequest import bind_scope, request_batch, request_memo, request_scope
from perrequest.scope import _current
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware

pytestmark = pytest.mark.timeout(60)

StartResponse = Callable[..., Any]


class _Quiet(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def log_exception(self, exc_info: Any) -> None:  # the server's own traceback print
        pass


class _QuietServer(wsgiref.simple_server.WSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def _raw(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    """No middleware: what perrequest's variable holds in the server's thread."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{perrequest.in_request_scope()} {perrequest.get('who')} {_current.get()!r}".encode()]


@contextmanager
def _wsgiref(app: Callable[..., Iterable[bytes]], requests: int) -> Iterator[str]:
    """wsgiref serving ``requests`` requests, one after the other in one thread (as a
    pooled thread would), ``/raw`` going to an app without the middleware."""

    def dispatch(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return (_raw if environ["PATH_INFO"] == "/raw" else app)(environ, start_response)

    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, dispatch, server_class=_QuietServer, handler_class=_Quiet
    )
    thread = threading.Thread(target=lambda: [server.handle_request() for _ in range(requests)])
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        thread.join(10)
        server.server_close()


class _CloseRaisesOnLookup:
    """A body whose ``close`` is a property that raises (a proxy over a gone resource)."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"alice's data"

    @property
    def close(self) -> Callable[[], None]:
        raise OSError("the resource behind this body is gone")


class _ClassRaises:
    """A body whose ``__class__`` raises: ``isinstance`` against the server's file
    wrapper looks it up."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"alice's data"

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise LookupError("no context for this proxy")


@pytest.mark.parametrize("body", [_CloseRaisesOnLookup, _ClassRaises], ids=["close", "class"])
def test_a_body_failing_on_attribute_lookup_leaves_nothing_in_the_server_thread(
    body: type,
) -> None:
    """The lookup of the body's ``close`` (or its class, for the file-wrapper check) raising
    left the request's scope open and active in the server's thread: the next request's
    code there, outside the middleware, ran in alice's scope and read her values."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Any:
        perrequest.set("who", "alice")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body()

    with _wsgiref(RequestScopeMiddleware(app), requests=2) as url:
        with contextlib.suppress(httpx.HTTPError):  # the server may cut the failed response
            httpx.get(f"{url}/alice", timeout=10)
        assert httpx.get(f"{url}/raw", timeout=10).text == "False None None"
    assert live_scopes() == 0


# -- apps served by real servers in subprocesses (this module is importable by them) -----

EVENTS: deque[tuple[str, str | None, Any]] = deque(maxlen=2000)
"""(where, the request it ran for, the request id it read): every read must match."""


@request_memo
def slow_id(key: int) -> Any:
    time.sleep(0.3)
    # Read once the request has ended: on a loaded machine its body may still be being
    # sent after 0.3 s (a scope still open after 10 s reads its id, and fails the test).
    deadline = time.monotonic() + 10
    while perrequest.in_request_scope() and time.monotonic() < deadline:
        time.sleep(0.01)
    return perrequest.get("id")


@request_memo
async def async_id(key: int) -> Any:
    await asyncio.sleep(0.001)
    return perrequest.get("id")


def _attack_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """One request's attack, by path; every read of the request's id is recorded."""
    rid = environ["QUERY_STRING"]
    perrequest.set("id", rid)
    path = environ["PATH_INFO"]
    if path == "/pool-timeout":
        # The view gives up on the bound computation; its scope closes while one pool
        # thread computes and another waits for it: both finish, nothing is stranded.
        futures = [_POOL.submit(perrequest.bind_scope(slow_id), 1) for _ in range(2)]
        with contextlib.suppress(FutureTimeout):
            futures[0].result(timeout=0.05)
        for future in futures:
            future.add_done_callback(lambda f: EVENTS.append(("pool", rid, f.result())))
    elif path == "/a2s":  # a memo filled on async_to_sync's loop, hit in the view
        EVENTS.append(("a2s", rid, async_to_sync(async_id)(1)))
        EVENTS.append(("a2s", rid, async_to_sync(async_id)(1)))
        EVENTS.append(("a2s-hits", rid, async_id.cache_info().hits))
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body() -> Iterator[bytes]:
        try:
            for _ in range(int(environ.get("HTTP_X_CHUNKS", "3"))):
                EVENTS.append(("chunk", rid, perrequest.get("id")))
                yield b"x" * 65536
        finally:
            EVENTS.append(("finally", rid, perrequest.get("id")))

    return body()


def _state(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "application/json")])
    state = {"live": live_scopes(), "events": list(EVENTS), "var": repr(_current.get())}
    return [json.dumps(state).encode()]


_POOL = ThreadPoolExecutor(4)
_scoped = RequestScopeMiddleware(_attack_app)


def served_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """What the servers run: /raw and /_state without the middleware, the rest with it."""
    path = environ["PATH_INFO"]
    app = _raw if path == "/raw" else _state if path == "/_state" else _scoped
    return app(environ, start_response)


def _hang_up_mid_body(base: str, target: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Chunks: 2000\r\n\r\n".encode())
        sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST


def _attack(base: str, paths: tuple[str, ...], hang_ups: int) -> dict[str, Any]:
    """Concurrent requests on every path, clients hanging up mid-body, then every
    server thread probed outside the middleware; the server's state once all is done."""

    def one(n: int) -> None:
        path = paths[n % len(paths)]
        if n < hang_ups:
            _hang_up_mid_body(base, f"{path}?h{n}")
        else:
            assert httpx.get(f"{base}{path}?r{n}", timeout=20).status_code == 200

    with ThreadPoolExecutor(8) as clients:
        list(clients.map(one, range(40)))
    pools = sum(1 for n in range(40) if paths[n % len(paths)] == "/pool-timeout")
    deadline = time.monotonic() + 15
    state = httpx.get(f"{base}/_state", timeout=10).json()
    while time.monotonic() < deadline and (
        state["live"] or _count(state, "finally") < 40 or _count(state, "pool") < 2 * pools
    ):
        time.sleep(0.1)
        state = httpx.get(f"{base}/_state", timeout=10).json()
    state["raw"] = {httpx.get(f"{base}/raw", timeout=10).text for _ in range(20)}
    return state


def _count(state: dict[str, Any], where: str) -> int:
    return sum(event[0] == where for event in state["events"])


def _check(state: dict[str, Any], paths: tuple[str, ...]) -> None:
    events = state["events"]
    assert state["live"] == 0 and state["raw"] == {"False None None"}
    assert _count(state, "finally") == 40  # the hung-up bodies were closed too
    # Every read in a chunk, a finally or the async side saw its own request's id.
    assert [e for e in events if e[0] in ("chunk", "finally", "a2s") and e[1] != e[2]] == []
    if "/a2s" in paths:  # the second call hit what the first filled: one store
        assert {e[2] for e in events if e[0] == "a2s-hits"} == {1}
    if "/pool-timeout" in paths:
        # Both pool threads of each request finished (the waiter was not stranded);
        # the scope had closed by then, so what they read was no store's.
        pools = sum(1 for n in range(40) if paths[n % len(paths)] == "/pool-timeout")
        assert _count(state, "pool") == 2 * pools
        assert {e[2] for e in events if e[0] == "pool"} == {None}


@pytest.mark.slow  # seconds of waiting, on purpose (make check skips it)
def test_gunicorn_gthread_survives_timeouts_async_to_sync_and_hang_ups() -> None:
    paths = ("/pool-timeout", "/a2s", "/plain")
    with serve_gunicorn(f"{__name__}:served_app", worker_class="gthread", threads=4) as base:
        state = _attack(base, paths, hang_ups=6)
    _check(state, paths)


def test_granian_wsgi_serves_each_body_in_its_own_store() -> None:
    """granian's WSGI interface (only its ASGI one was tested): it iterates and closes the
    body in the thread that called the app; a client's hang-up closes it too."""
    paths = ("/a2s", "/plain")
    port = free_port()
    argv = [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", HOST]
    argv += ["--port", str(port), "--blocking-threads", "4", "--log-level", "warning"]
    with serve_subprocess([*argv, f"{__name__}:served_app"], port) as base:
        state = _attack(base, paths, hang_ups=6)
    _check(state, paths)


# -- fork while another thread computes, from a thread outside the scope ---------------


def _in_child(out: Any, load: Callable[[], Any]) -> None:
    out.put(load())


@pytest.mark.parametrize("kind", ["memo", "memo-waited-for", "batch"])
def test_a_child_forked_outside_the_scope_computes_what_a_parent_thread_was_computing(
    kind: str,
) -> None:
    """multiprocessing forks from a thread with no scope active (a helper thread), and the
    child runs a function bound to the request's store, in which another parent thread is
    computing the key (a second one waiting for it, or a batch fetching it). Only the
    store active in the forking thread had its records dropped in the child: the child
    waited forever for a thread that stayed in the parent."""
    started, release = threading.Event(), threading.Event()

    def parent_computes_slowly() -> None:
        if multiprocessing.parent_process() is None:
            started.set()
            release.wait(10)

    @request_memo
    def triple(x: int) -> int:
        parent_computes_slowly()
        return x * 3

    @request_batch
    def triples(keys: list[int]) -> list[int]:
        parent_computes_slowly()
        return [key * 3 for key in keys]

    fn: Callable[[int], Any] = triple if kind.startswith("memo") else triples.load
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes: list[Any] = []
    with request_scope():
        threads = [threading.Thread(target=bind_scope(fn), args=(7,))]
        threads[0].start()
        assert started.wait(5)
        if kind == "memo-waited-for":
            threads.append(threading.Thread(target=bind_scope(fn), args=(7,)))
            threads[1].start()
            deadline = time.monotonic() + 5
            while triple.cache_info().hits < 1 and time.monotonic() < deadline:
                time.sleep(0.01)  # the second thread is waiting for the first
        bound = bind_scope(functools.partial(fn, 7))

        def fork() -> None:
            processes.append(context.Process(target=_in_child, args=(queue, bound)))
            processes[0].start()

        helper = threading.Thread(target=fork)  # nothing is active in it
        helper.start()
        helper.join(5)
        try:
            assert queue.get(timeout=5) == 21
        finally:
            release.set()
            for thread in threads:
                thread.join(5)
            for process in processes:
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join(5)
