"""Real servers on 127.0.0.1 for the tests: started on a free port, always stopped.

uvicorn and hypercorn run in a thread of the test process, so the test can
read ``live_scopes()`` directly; gunicorn forks, so it runs as a subprocess and
the app under test reports its own state through an endpoint.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int,
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            output = log.read_text() if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {HOST}:{port} within {timeout} s")


@contextmanager
def serve_uvicorn(app: Any, **config: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, **config))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


# hypercorn 0.18 waits at shutdown for every open connection on CPython 3.12.1 and later,
# whatever its graceful_timeout (asyncio's Server.wait_closed waits for connections since):
# pgjones/hypercorn#308, with or without perrequest. Where it cannot stop, its shutdown
# tests do not run.
HYPERCORN_STOPS_MID_REQUEST = sys.version_info < (3, 12, 1)
STOPPING_HYPERCORN = pytest.param(
    "hypercorn",
    marks=pytest.mark.skipif(
        not HYPERCORN_STOPS_MID_REQUEST,
        reason="hypercorn waits for open connections at shutdown on CPython 3.12.1+ "
        "(pgjones/hypercorn#308)",
    ),
)


@contextmanager
def serve_hypercorn(app: Any) -> Iterator[str]:
    """Run ``app`` under hypercorn (asyncio) in a thread; yields the base URL."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    port = free_port()
    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.loglevel = "WARNING"
    config.graceful_timeout = 2
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]

    thread = threading.Thread(target=run, name="hypercorn", daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        yield f"http://{HOST}:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        loop.close()


@contextmanager
def serve_subprocess(
    argv: Sequence[str], port: int, *, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run a server command that listens on ``port``; yields the base URL."""
    with run_process(argv, cwd=cwd, env=env) as (proc, log):
        wait_for_port(port, proc=proc, log=log)
        yield f"http://{HOST}:{port}"


@contextmanager
def run_process(
    argv: Sequence[str],
    *,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    stop_timeout: float = 15,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run ``argv`` with this checkout first on the path, its output in a log file; stopped
    (killed if it hangs) and the log removed afterwards. Yields the process and the log.

    The process gets a temporary directory of its own as ``TMPDIR``, removed once it has
    stopped: what it makes there (the Django example's SQLite files, say) goes with it,
    also when it was killed before its ``atexit`` handlers could run."""
    tmp = Path(tempfile.mkdtemp(prefix="perrequest-server-"))
    full_env = {
        **os.environ,
        # This checkout's src first: from another worktree, the editable install
        # would otherwise bring in another checkout's perrequest.
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), str(ROOT)]),
        "TMPDIR": str(tmp),
        **(env or {}),
    }
    log = tmp / "server.log"
    try:
        with log.open("w+b") as log_file:
            proc = subprocess.Popen(
                list(argv), cwd=cwd, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            yield proc, log
        finally:
            proc.terminate()
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def in_forked_child(report: Callable[[], str]) -> str:
    """Fork here; the child returns ``report()`` through a pipe and exits at once."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.write(write, report().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    result = os.read(read, 1000).decode()
    os.close(read)
    assert status == 0, result
    return result


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python process of its own, this checkout's perrequest first on
    its path (for what patches a process for good: Django settings, instrumentations)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )


@contextmanager
def serve_gunicorn(
    app_spec: str,
    *,
    worker_class: str = "sync",
    threads: int = 1,
    workers: int = 1,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run a WSGI app (``module:attr``) under gunicorn; yields the base URL."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{HOST}:{port}",
        "--worker-class",
        worker_class,
        "--threads",
        str(threads),
        "--workers",
        str(workers),
        "--graceful-timeout",
        "2",
        "--timeout",
        "60",
        "--keep-alive",  # not 2 s: a client starved of CPU that long met a closing socket
        "30",
        "--log-level",
        "warning",
        app_spec,
    ]
    with serve_subprocess(argv, port, cwd=cwd, env=env) as url:
        yield url


def fetch_all(
    base: str, targets: Sequence[str], connections: int, timeout: float = 60
) -> list[tuple[int, bytes]]:
    """GET every target (a path and its query) of ``base``, over ``connections`` keep-alive
    connections at once; each response's status and body, in the order of ``targets``.

    For the load loops of thousands of requests: a thread per connection with
    ``http.client`` costs the test process about 0.1 ms of CPU a request, where an
    ``httpx.AsyncClient`` with 20 connections costs 2 ms (its pool's bookkeeping grows
    with the connections), and the test measured its client more than the server."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    results: list[tuple[int, bytes]] = [(0, b"")] * len(targets)

    def run(first: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            for n in range(first, len(targets), connections):
                conn.request("GET", targets[n])
                response = conn.getresponse()
                results[n] = (response.status, response.read())
        finally:
            conn.close()

    with ThreadPoolExecutor(connections) as pool:
        for done in [pool.submit(run, first) for first in range(connections)]:
            done.result()
    return results


def read_part_then_reset(port: int, path: str) -> None:
    """A client that reads the start of a long body, then goes away (RST)."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        received = 0
        while received < 64 * 1024:
            data = sock.recv(65536)
            assert data, "the server closed the stream early"
            received += len(data)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
