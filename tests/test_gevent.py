"""gevent: gunicorn's gevent workers serving Flask and Django, Celery's gevent pool, and
greenlets in-process.

The servers run tests/gevent_apps.py, whose views switch greenlets (``gevent.sleep``,
socket I/O) between storing a request's value and reading it back. Each app is served
by the ``gevent`` worker loaded after gevent's monkey-patching, by the same with
``--preload`` (perrequest imported in the master, before it), and by ``gevent_pywsgi``.
The in-process checks run in a Python of their own, patched as each case says:
patching this process would change every other test's threads. eventlet is not
tested: the gunicorn installed here ships no eventlet worker, and eventlet is deprecated.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from servers import HOST, ROOT, free_port, serve_subprocess

# Server farms: CI runs them (make test); make check, the fast loop, skips them.
pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

SERVERS = ["flask", "flask-preload", "django", "django-preload", "flask-pywsgi", "django-pywsgi"]


def _gunicorn(app: str, *extra: str, worker: str = "gevent") -> tuple[list[str], int]:
    port = free_port()
    argv = [
        sys.executable, "-m", "gunicorn", "--bind", f"{HOST}:{port}", "--worker-class", worker,
        "--worker-connections", "200", "--graceful-timeout", "2", "--log-level", "warning",
        *extra, f"gevent_apps:{app}_application",
    ]  # fmt: skip
    return argv, port


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    app, _, variant = request.param.partition("-")
    preload = ["--preload"] if variant == "preload" else []
    worker = "gevent_pywsgi" if variant == "pywsgi" else "gevent"
    # --keep-alive 30: gunicorn closes a connection idle for 2 s by default, and a client
    # starved of CPU for that long sent its next request into the closing socket
    # (connection reset by peer, once in CI).
    argv, port = _gunicorn(app, "--timeout", "60", "--keep-alive", "30", *preload, worker=worker)
    with serve_subprocess(argv, port) as url:
        yield url


def _live(
    base: str, done: Any = lambda live: live["live"] == 0, path: str = "/live"
) -> dict[str, Any]:
    """The worker's open scopes (not the /live request's own), once ``done`` (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        live = httpx.get(f"{base}{path}", timeout=10).json()
        if done(live):
            return live  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, live
        time.sleep(0.05)


def _client_run(base: str, client: int, requests: int) -> list[str]:
    """One keep-alive connection: each request's value, then /raw on the same greenlet's
    connection. What went wrong, if anything."""
    errors = []
    with httpx.Client(base_url=base, timeout=30) as http:
        for i in range(requests):
            value = f"c{client}-r{i}"
            got = http.get("/echo", params={"v": value}).json()
            if (got["before"], got["seen"], got["memo"]) != (None, value, value):
                errors.append(f"{value}: {got}")
            raw = http.get("/raw").json()
            if raw != {"in_scope": False, "held": None}:
                errors.append(f"{value} then /raw: {raw}")
    return errors


def _load(base: str, clients: int, requests: int) -> list[str]:
    with ThreadPoolExecutor(clients) as pool:
        runs = [pool.submit(_client_run, base, c, requests) for c in range(clients)]
        return [error for run in runs for error in run.result(timeout=60)]


def test_isolation_under_concurrent_load(server: str) -> None:
    """16 connections at once, 25 requests each: no request sees another's value, the
    greenlet holds no store between requests, and every store is closed."""
    assert _load(server, clients=16, requests=25) == []
    _live(server)


def test_streams_see_their_own_store_to_the_end(server: str) -> None:
    def read(value: str) -> list[dict[str, Any]]:
        with httpx.stream("GET", f"{server}/stream", params={"v": value}, timeout=30) as r:
            return [json.loads(line) for line in r.iter_lines() if line.strip()]

    with ThreadPoolExecutor(8) as pool:
        values = [f"s{i}" for i in range(16)]
        for value, lines in zip(values, pool.map(read, values), strict=True):
            assert [(x["seen"], x["memo"]) for x in lines] == [(value, value)] * 5
    _live(server)


def test_client_leaving_a_stream_closes_its_store(server: str) -> None:
    """Clients that read one chunk of a long stream and hang up: each stream's generator
    is closed (its ``finally`` runs) and its store with it."""
    aborted = _live(server)["aborted"]
    for _ in range(3):  # the headers, then the first chunk
        _hang_up_mid_body(server, "/stream?v=gone&chunks=100000", b"gone")
    _live(server, lambda live: live["live"] == 0 and live["aborted"] == aborted + 3)
    assert _load(server, clients=2, requests=3) == []


def test_client_leaving_before_the_response_closes_its_store(server: str) -> None:
    """Clients that hang up while a slow handler sleeps (the greenlet switched away): the
    handler ends, its response cannot be sent, and its store is closed all the same."""
    port = int(server.rsplit(":", 1)[1])
    for i in range(5):
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(f"GET /echo?v=gone{i}&s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.3)
    _live(server)
    assert _load(server, clients=2, requests=3) == []


def test_single_flight_across_greenlets_of_a_request(server: str) -> None:
    """8 greenlets (``bind_scope``) ask for one key while one computes it, gevent.sleep
    inside: all get the value, computed once, also when perrequest was imported before
    gevent patched ``threading`` (``--preload``)."""

    def fanout(value: str) -> dict[str, Any]:
        got = httpx.get(f"{server}/fanout", params={"v": value, "n": 8}, timeout=30)
        return got.json()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(4) as pool:
        values = [f"f{i}" for i in range(8)]
        for value, got in zip(values, pool.map(fanout, values), strict=True):
            assert got == {"done": 8, "values": [f"k:{value}"] * 8, "computed": 1}
    _live(server)


def _hang_up_mid_body(base: str, path: str, until: bytes) -> None:
    """Read the response until ``until``, then reset the connection."""
    with socket.create_connection((HOST, int(base.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        seen = b""
        while until not in seen:
            seen += sock.recv(65536)
            assert seen, "the server closed the stream"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_the_django_test_project_under_gevent() -> None:
    """tests/django_project (perrequest's middleware, a project middleware, a context
    processor, sync and async streams) under the gevent worker: one lookup per request
    shared by middleware, view and template; streams in their request's store to the end;
    concurrent sync views isolated; streams left mid-body closed. (Its async views are
    not served concurrently: under gevent, Django's async_to_sync refuses to start a
    second event loop in the worker's one thread, with or without perrequest.)"""
    argv, port = _gunicorn("unused", "--timeout", "60")
    argv[-1] = "django_project.wsgi:application"
    env = {"DJANGO_SETTINGS_MODULE": "django_project.settings"}
    with serve_subprocess(argv, port, env=env) as base, httpx.Client(base_url=base) as http:
        first, second = http.get("/shared/").json(), http.get("/shared/").json()
        for seen in (first, second):
            assert seen["before"] is None and seen["lookups"] == 1
            assert seen["page"] == f"lookup={seen['lookup']}" == f"lookup={seen['mw']}"
        assert first["lookup"] != second["lookup"]
        for path in ("/stream/sync/", "/stream/async/"):
            response = http.get(path)
            lines = [json.loads(line) for line in response.text.splitlines()]
            expected = {
                "in_scope": True,
                "marker": response.headers["X-Marker"],
                "lookup": response.headers["X-Lookup"],
                "lookups": 1,
            }
            assert lines == [expected] * 3

        def client(c: int) -> list[str]:
            errors = []
            with httpx.Client(base_url=base, timeout=30) as mine:
                for i in range(10):
                    value = f"c{c}-{i}"
                    got = mine.get("/echo/", params={"v": value}).json()
                    if got != {"before": None, "seen": value, "memo": value}:
                        errors.append(f"{value}: {got}")
            return errors

        with ThreadPoolExecutor(16) as pool:
            assert [e for run in pool.map(client, range(16)) for e in run] == []
        aborted = _live(base, path="/_live")["aborted"]
        for _ in range(2):
            _hang_up_mid_body(base, "/stream/slow/", b"xxxx")
        ended = lambda live: live["live"] == 0 and live["aborted"] == aborted + 2  # noqa: E731
        _live(base, ended, path="/_live")


# -- in-process: greenlets of one scope, perrequest imported before or after patching ------

_GREENLETS = """
import json, sys
from gevent import monkey
if sys.argv[1] == "after":
    monkey.patch_all()
import cachetools, gevent, gevent.pool
import perrequest
from perrequest import bind_scope, request_batch, request_memo, request_scope
from perrequest.testing import live_scopes

calls = []
out = {}

@request_memo
def slow(key):
    calls.append(key)
    gevent.sleep(0.05)
    return f"v{key}"

@request_memo(shared=cachetools.LRUCache(100))
def shared(key):
    calls.append(key)
    gevent.sleep(0.05)
    return f"s{key}"

@request_batch
def rows(keys):
    calls.append(sorted(keys))
    gevent.sleep(0.05)
    return [f"r{k}" for k in keys]

if sys.argv[1] == "before":  # as gunicorn --preload: the app's objects made unpatched
    monkey.patch_all()

def spawn_all(fn, *argss):
    greenlets = [gevent.spawn(fn, *args) for args in argss]
    assert len(gevent.joinall(greenlets, timeout=10)) == len(greenlets), "a greenlet hangs"
    return [g.get() for g in greenlets]

with request_scope():  # one key, 6 greenlets: computed once
    out["memo"] = spawn_all(bind_scope(slow), *[("k",)] * 6), calls[:]
calls.clear()
with request_scope():  # overlapping batches: each key fetched once
    out["batch"] = spawn_all(bind_scope(rows.load_many), ([1, 2],), ([2, 3],), ([1, 3],)), calls[:]
calls.clear()
def two_scopes(key):  # the process-wide tier: greenlets of 3 requests
    with request_scope():
        return spawn_all(bind_scope(shared), *[(key,)] * 3)
out["shared"] = spawn_all(two_scopes, ("x",), ("x",), ("x",)), calls[:]
calls.clear()

# A pool: the scope closes while one greenlet computes and three wait for it.
pool = gevent.pool.Pool(8)

def one_computes_three_wait(key):  # in a scope: bound to it
    bound = bind_scope(slow)
    computing = pool.spawn(bound, key)
    gevent.sleep(0.01)
    waiting = [pool.spawn(bound, key) for _ in range(3)]
    gevent.sleep(0.01)
    return bound, computing, waiting

with request_scope():
    bound, computing, waiting = one_computes_three_wait("p")
assert pool.join(timeout=10), "a greenlet hangs"
out["closed"] = [g.get() for g in [computing, *waiting]], calls[:], live_scopes()
calls.clear()

# The computing greenlet killed while the others wait: one of them computes it.
with request_scope():
    bound, computing, waiting = one_computes_three_wait("q")
    computing.kill(block=True, timeout=5)
    assert pool.join(timeout=10), "a greenlet hangs"
    out["killed"] = [g.get() for g in waiting], calls[:]
calls.clear()

# Killed while the scope closes: its waiters restart outside it, and still end.
with request_scope():
    bound, computing, waiting = one_computes_three_wait("z")
computing.kill(block=True, timeout=5)
assert pool.join(timeout=10), "a greenlet hangs"
out["killed_closed"] = [g.get() for g in waiting], live_scopes()

# A waiter interrupted by gevent.Timeout: the computation goes on, and is kept.
with request_scope():
    bound = bind_scope(slow)
    computing = pool.spawn(bound, "t")
    gevent.sleep(0.01)
    try:
        with gevent.Timeout(0.01):
            bound("t")
    except gevent.Timeout:
        timed_out = True
    out["timeout"] = timed_out, computing.get(timeout=5), bound("t"), calls.count("t")

# Spawned without bind_scope: a greenlet starts with an empty context, sees no store.
def late():
    gevent.sleep(0.05)
    return perrequest.in_request_scope(), perrequest.get("who")
with request_scope():
    perrequest.set("who", "A")
    unbound = gevent.spawn(late)
with request_scope():
    perrequest.set("who", "B")
    out["unbound"] = unbound.get(timeout=5)
out["after"] = perrequest.in_request_scope(), live_scopes()
print(json.dumps(out))
"""


def _script(script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` in a Python of its own; what it printed last, as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("order", ["before", "after"])
def test_greenlets_of_one_scope(order: str) -> None:
    """Imported before gevent's monkey-patching (as with ``--preload``) or after: greenlets
    bound to one scope share computations (memo, batch, the shared tier), and closing the
    scope, or killing the computing greenlet, strands no waiter."""
    out = _script(_GREENLETS, order)
    assert out["memo"] == [["vk"] * 6, ["k"]]
    batch, fetched = out["batch"]
    assert batch == [["r1", "r2"], ["r2", "r3"], ["r1", "r3"]]
    assert sorted(k for keys in fetched for k in keys) == [1, 2, 3]
    assert out["shared"] == [[["sx"] * 3] * 3, ["x"]]
    assert out["closed"] == [["vp"] * 4, ["p"], 0]
    waiters, computed = out["killed"]
    assert waiters == ["vq"] * 3
    assert computed == ["q", "q"]  # the killed computation, then one waiter's
    assert out["killed_closed"] == [["vz"] * 3, 0]
    assert out["timeout"] == [True, "vt", "vt", 1]
    assert out["unbound"] == [False, None]
    assert out["after"] == [False, 0]


def _get_retrying(url: str, **params: Any) -> dict[str, Any]:
    """GET on a new connection; a worker restarting between requests is tried again."""
    for _ in range(100):
        try:
            response = httpx.get(url, params=params, timeout=30)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        if response.status_code == 200:
            return response.json()  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"{url}: no answer")


@pytest.mark.slow  # about 10 s: two worker restarts, and a --timeout
def test_worker_restarts_and_timeouts() -> None:
    """``--max-requests`` restarts the worker; one request blocking the worker's thread
    past ``--timeout`` gets it killed. The workers after each serve isolated requests,
    hold no store between them, and close every store."""
    argv, port = _gunicorn(
        "flask", "--timeout", "2", "--max-requests", "25", "--max-requests-jitter", "1"
    )
    with serve_subprocess(argv, port) as base:
        pids = set()
        # gunicorn's gevent worker looks whether to stop once a second: after its 25th
        # request it serves what comes within that second, so go on until another answers.
        deadline = time.monotonic() + 30
        for i in itertools.count():
            got = _get_retrying(f"{base}/echo", v=f"r{i}")
            assert (got["before"], got["seen"], got["memo"]) == (None, f"r{i}", f"r{i}")
            pids.add(got["pid"])
            if i >= 59 and len(pids) >= 2:
                break
            assert time.monotonic() < deadline, "the worker was never restarted"
        blocked = _live(base)["pid"]
        with pytest.raises(httpx.TransportError):  # the worker is killed under it
            httpx.get(f"{base}/block", params={"s": 30}, timeout=20)
        assert _get_retrying(f"{base}/echo", v="next")["pid"] != blocked
        assert _load(base, clients=4, requests=5) == []
        _live(base)


_CELERY = """
import json
from gevent import monkey
monkey.patch_all()
import gevent
from celery import Celery
from celery.contrib.testing.worker import start_worker
import perrequest
from perrequest import request_memo
from perrequest.celery import ScopedTask, install
from perrequest.testing import live_scopes

computed = {}
running = [0, 0]

@request_memo
def lookup(key):
    job = perrequest.get("job")
    computed[job] = computed.get(job, 0) + 1
    gevent.sleep(0.01)
    return [job, key]

def run_job(job):
    running[0] += 1
    running[1] = max(running)
    try:
        perrequest.set("job", job)
        values = [lookup(k) for k in (1, 2, 3, 1, 2, 3, 1)]
        return sum(1 for owner, _ in values if owner != job)
    finally:
        running[0] -= 1

app = Celery("g", broker="memory://", backend="cache+memory://")
app.conf.broker_transport_options = {"polling_interval": 0.01}
install(app)

@app.task
def installed_job(job):
    return run_job(job)

@app.task(base=ScopedTask)
def scoped_job(job):
    return run_job(job)

out = {}
with start_worker(app, pool="gevent", concurrency=8, perform_ping_check=False):
    for task in (installed_job, scoped_job):
        computed.clear()
        results = [task.delay(f"{task.name}-{i}") for i in range(16)]
        foreign = [r.get(timeout=20) for r in results]
        out[task.name.rsplit(".", 1)[-1]] = foreign, sorted(set(computed.values()))
    for _ in range(500):  # install() closes the scope just after the result is stored
        if live_scopes() == 0:
            break
        gevent.sleep(0.01)
    out["live"], out["peak"] = live_scopes(), running[1]
print(json.dumps(out))
"""


def test_celery_gevent_pool() -> None:
    """Celery's gevent pool, 8 tasks at once switching inside their memos: each task (by
    ``install`` or ``ScopedTask``) computes each key once, sees only its own entries, and
    its scope is closed after it."""
    out = _script(_CELERY)
    assert out["peak"] > 1, "the pool never ran two tasks at once"
    for kind in ("installed_job", "scoped_job"):
        assert out[kind] == [[0] * 16, [3]]
    assert out["live"] == 0


_REDIS = """
import json, sys
from gevent import monkey
if sys.argv[1] == "after":
    monkey.patch_all()
import gevent, redis
from perrequest import bind_scope, request_memo, request_scope
from perrequest.redis import RedisCache
from perrequest.testing import live_scopes

calls = []
cache = RedisCache(redis.Redis(host="127.0.0.1", port=int(sys.argv[2])), namespace="g", ttl=60)

@request_memo(shared=cache)
def price(key):
    calls.append(key)
    gevent.sleep(0.05)
    return f"p{key}"

if sys.argv[1] == "before":  # as gunicorn --preload: the app's objects made unpatched
    monkey.patch_all()

def request(key):
    with request_scope():
        greenlets = [gevent.spawn(bind_scope(price), key) for _ in range(4)]
        assert len(gevent.joinall(greenlets, timeout=10)) == 4, "a greenlet hangs"
        return [g.get() for g in greenlets]

requests = [gevent.spawn(request, "a") for _ in range(3)]
assert len(gevent.joinall(requests, timeout=20)) == 3, "a request hangs"
first = [r.get() for r in requests]
later = request("a")  # a request after them: Redis has the value
stats = cache.stats()
print(json.dumps([first, later, calls, stats.misses, stats.hits, live_scopes()]))
"""


@pytest.mark.parametrize("order", ["before", "after"])
def test_redis_tier_under_greenlets(order: str, redis_server: Any) -> None:
    """The Redis tier, with perrequest, the cache and the memo made before gevent's
    monkey-patching (``--preload``) or after: 3 requests of 4 greenlets each compute the
    key once, and store it: a later request reads it. (Made before, the tier stored
    nothing: the id it registered a computation by was not the one it stored it by.)"""
    first, later, calls, misses, hits, live = _script(_REDIS, order, str(redis_server.port))
    assert first == [["pa"] * 4] * 3
    assert later == ["pa"] * 4
    assert calls == ["a"]
    assert (misses, hits, live) == (1, 3, 0)
