"""The shared tiers attacked on real servers with real faults: gunicorn (``sync`` and
``gthread``, several workers) with Flask, ``uvicorn --workers 2`` with Starlette, and a
real redis-server that is killed, restarted and paused while requests run.

Apps: ``tests/redis_attack_apps.py``. Every computation is a line in a log file that
every worker appends to, so "computed once" is counted across processes, also while
Redis is down.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import HOST, free_port, serve_gunicorn, serve_subprocess

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # a server farm

# A loaded machine can make one Redis operation outlast the apps' default op_timeout
# (0.5 s): the tier fails open and computes again, or counts an error. The tests that
# count computations or errors, with Redis up and no lock left behind to take over,
# give Redis time enough; those about a slow or stopped Redis set their own.
PATIENT = {"OP_TIMEOUT": "5"}


class App:
    """A served app, its log of computations, and an HTTP client that opens a new
    connection per request (a kept-alive one stays with one worker)."""

    def __init__(self, base: str, log: Path, workers: int) -> None:
        self.base, self.log, self.workers = base, log, workers
        limits = httpx.Limits(max_keepalive_connections=0, max_connections=64)
        self.http = httpx.Client(base_url=base, timeout=30, limits=limits)

    def get(self, path: str, *, http: httpx.Client | None = None, **kw: Any) -> dict[str, Any]:
        response = (http or self.http).get(path, **kw)
        assert response.status_code == 200, (path, response.status_code, response.text[:2000])
        return dict(response.json())

    def post(self, path: str, body: Any, **kw: Any) -> dict[str, Any]:
        response = self.http.post(path, json=body, **kw)
        assert response.status_code == 200, (path, response.status_code, response.text[:2000])
        return dict(response.json())

    def computed(self, kind: str | None = None) -> list[list[str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        rows = [line.split(" ") for line in lines]
        return [r for r in rows if kind is None or r[0] == kind]

    def burst(self, path: str, n: int) -> list[dict[str, Any]]:
        def one(_: int) -> dict[str, Any]:
            with httpx.Client(base_url=self.base, timeout=30) as http:  # one per thread
                return self.get(path, http=http)

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    def states(self, workers: int, rounds: int = 200) -> dict[int, dict[str, Any]]:
        """``/_state`` of every worker (new connections until each has answered)."""
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(rounds):
            got = self.get("/_state")  # one at a time: no other request is live
            seen[got["pid"]] = got
            if len(seen) >= workers:
                return seen
            time.sleep(0.02)
        raise AssertionError(f"only {len(seen)} of {workers} workers answered")

    def settled(self, workers: int, within: float = 10) -> dict[int, dict[str, Any]]:
        """``states()`` once every worker has no live scope but ``/_state``'s own.

        A server sends the last byte before it closes the body (gunicorn's gthread
        calls ``close()`` after the write), so a request the client has finished can
        still be closing its scope for a moment; a scope that outlives its request
        fails here after ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            states = self.states(workers)
            if all(s["live"] == 1 for s in states.values()):
                return states
            assert time.monotonic() < deadline, f"a scope outlived its request: {states}"
            time.sleep(0.05)


@contextmanager
def served(
    kind: str, port: int, tmp: Path, workers: int = 2, threads: int = 4, **env: str
) -> Iterator[App]:
    full_env = {"REDIS_PORT": str(port), "LOG_DIR": str(tmp), **env}
    if kind == "uvicorn":
        http_port = free_port()
        argv = [
            sys.executable, "-m", "uvicorn", "redis_attack_apps:starlette_app", "--host", HOST,
            "--port", str(http_port), "--workers", str(workers), "--log-level", "warning",
        ]  # fmt: skip
        server = serve_subprocess(argv, http_port, env={**full_env, "APP": "starlette"})
    else:
        threads = 1 if kind == "sync" else threads  # (more threads make it gthread)
        server = serve_gunicorn(
            "redis_attack_apps:flask_app", worker_class=kind, threads=threads, workers=workers,
            env={**full_env, "APP": "flask"},
        )  # fmt: skip
    with server as base:
        app = App(base, tmp / "computed", workers)
        try:
            # every worker up (uvicorn's children import after the port is bound)
            app.states(workers)
            yield app
        finally:
            app.http.close()


def _hammer(
    app: App, names: list[str], stop: threading.Event, limit: float
) -> Callable[[], tuple[list[float], list[str]]]:
    """Threads requesting ``/value/<name>`` until ``stop``; returns a join that gives
    the durations and the failures (any status but 200, any answer over ``limit`` s)."""
    durations: list[float] = []
    failures: list[str] = []

    def run(i: int) -> None:
        n = i
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=app.base, limits=limits) as http:  # one per thread
            while not stop.is_set():
                n = one(http, n)

    def one(http: httpx.Client, n: int) -> int:
        n += 1
        name = names[n % len(names)]
        start = time.monotonic()
        try:
            got = app.get(f"/value/{name}", http=http, timeout=limit + 10)
            assert got["arg"] == name and got["repeatable"], got
        except Exception as exc:  # counted, reported
            failures.append(f"{name}: {type(exc).__name__}: {exc}"[:500])
        elapsed = time.monotonic() - start
        durations.append(elapsed)
        if elapsed > limit:
            failures.append(f"{name}: took {elapsed:.2f} s")
        return n

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()

    def join() -> tuple[list[float], list[str]]:
        stop.set()
        for thread in threads:
            thread.join(60)
        return durations, failures

    return join


def _shared_again(app: App, name: str) -> None:
    """A new key, asked by concurrent requests on every worker: computed once. A loaded
    machine can make one Redis operation outlast a short ``op_timeout``; that request
    fails open, as it must, and computes: a try during which the workers counted such a
    failure, and only such a try, is made again with another key."""
    for attempt in range(3):
        failed = _failed(app)
        before = len(app.computed())
        answers = app.burst(f"/value/{name}{'-again' * attempt}", 12)
        if len({a["at"] for a in answers}) == 1 and len(app.computed()) == before + 1:
            return
        assert _failed(app) > failed, answers  # computed twice, and nothing failed: a bug
    raise AssertionError(f"{name}: computed more than once in three tries: {answers}")


def _failed(app: App) -> int:
    """Redis operations that failed, and lock waits that gave up, in every worker."""
    states = app.states(app.workers).values()
    return sum(s["stats"]["errors"] + s["stats"]["lock_timeouts"] for s in states)


# -- Redis killed, restarted and paused while requests run ------------------------------


@pytest.mark.parametrize(
    ("kind", "pool"),
    [("gthread", "plain"), ("sync", "plain"), ("uvicorn", "blocking")],
)  # fmt: skip
def test_redis_killed_paused_and_restarted_under_workers(
    kind: str, pool: str, own_redis: Any, tmp_path: Path
) -> None:
    redis_server = own_redis()
    env = {"OP_TIMEOUT": "0.3", "RETRY_AFTER": "0.5", "COMPUTE": "0.05", "POOL": pool}
    workers, threads = 2, 4 if kind == "gthread" else 1
    with served(kind, redis_server.port, tmp_path, workers, threads, **env) as app:
        _shared_again(app, "warm")
        stop = threading.Event()
        # op_timeout (0.3 s) for the GET, the CLAIM, the STORE, plus the computation,
        # plus a worker's queue under load (1.2 s was always enough here).
        join = _hammer(app, [f"k{i}" for i in range(20)], stop, limit=2.5)
        time.sleep(1)
        redis_server.pause()
        time.sleep(2)
        redis_server.resume()
        time.sleep(1)
        redis_server.kill()
        time.sleep(1.5)
        redis_server.start()
        time.sleep(1)
        redis_server.pause()
        time.sleep(0.5)
        redis_server.kill()  # killed while stopped: its clients' sockets are reset
        redis_server.start()
        time.sleep(1.5)
        durations, failures = join()
        assert not failures, failures[:10]
        assert len(durations) > 50
        time.sleep(0.6)  # retry_after
        _shared_again(app, "after")  # no worker wedged, values shared again
        states = app.settled(workers)  # one live scope each: the /_state request's
        assert sum(s["stats"]["errors"] for s in states.values()) >= 1
        # connections: no more than the requests in flight need, and no more over time
        clients = _clients(redis_server)
        assert clients <= workers * 8, clients
        for i in range(4):
            app.burst(f"/value/more{i}", 6)
        assert _clients(redis_server) <= max(clients, 6 * workers), _clients(redis_server)
        rss = {pid: s["rss"] for pid, s in states.items()}
        for pid, s in app.states(workers).items():
            assert s["rss"] - rss[pid] < 4 * 2**20


# -- the stampede, errors, slow computations, values Redis cannot take ---------------------


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_a_stampede_over_workers_computes_once_and_errors_are_copies(
    kind: str, redis_server: Any, tmp_path: Path
) -> None:
    env = {"COMPUTE": "0.5", **PATIENT}
    with served(kind, redis_server.port, tmp_path, workers=2, threads=8, **env) as app:
        answers = app.burst("/value/hot", 24)
        assert len({a["at"] for a in answers}) == 1 and all(a["repeatable"] for a in answers)
        assert len(app.computed("value") + app.computed("avalue")) == 1
        errors = app.burst("/boom/b", 24)
        for error in errors:
            assert error["type"] == "AppError" and error["message"] == "('b failed', 1)", error
            assert not error["cause"], error
            # the original only for the caller that computed it; no waiter's traceback
            # holds the computing frame
            assert error["original"] == error["computed_here"], error
        computed = app.computed("boom")
        assert 1 <= len(computed) <= len(errors)
        # a process's waiters got copies: fewer computations than requests
        assert sum(e["original"] for e in errors) == len(computed)
        assert len(computed) < len(errors)
        app.settled(2)


def test_a_computation_slower_than_its_lock(redis_server: Any, tmp_path: Path) -> None:
    env = {"LOCK_TIMEOUT": "1"}
    with served("gthread", redis_server.port, tmp_path, workers=2, threads=4, **env) as app:
        start = time.monotonic()
        answers = app.burst("/slow/s?s=2.5", 8)
        elapsed = time.monotonic() - start
        assert elapsed < 2.5 * 3 + 3, elapsed  # nobody waits for ever
        computed = app.computed("slow")
        assert 1 <= len(computed) <= 2 * 2, computed  # per worker: its single-flight
        stored = app.get("/slow/s?s=2.5")  # the value kept, read back at once
        assert stored["at"] in {a["at"] for a in answers}
        with redis_server.client() as client:
            assert not [k for k in client.scan_iter("*:lock")]  # no lock left behind


def test_values_redis_cannot_take(redis_server: Any, tmp_path: Path) -> None:
    with served("gthread", redis_server.port, tmp_path, workers=2, threads=4, **PATIENT) as app:
        start = time.monotonic()
        for _ in range(6):  # a clear error each time, and no lock held for lock_timeout
            got = app.get("/unstorable/u")
            assert "unstorable" in got["error"] and "serializer 'json'" in got["error"], got
            assert "set" in got["error"]
        assert time.monotonic() - start < 5
        with redis_server.client() as client:
            assert not list(client.scan_iter("*unstorable*"))
        # over max_value_bytes: computed, returned, not stored; under it: shared
        big = [app.get("/sized/2000000") for _ in range(4)]
        assert all(b["length"] == 2_000_000 for b in big)
        assert len(app.computed("sized")) == 4
        fits = [app.get("/sized/900000") for _ in range(6)]
        assert all(b["length"] == 900_000 for b in fits)
        assert len(app.computed("sized")) == 5
        states = app.states(2)
        assert sum(s["stats"]["too_large"] for s in states.values()) == 4
        assert sum(s["stats"]["errors"] for s in states.values()) == 0


ODD = ["a*b?[c]\\", "ключ 🔑", "\n\r:\t", "", " ", "x" * 5000, "a:b:lock", "{}", "\u0000"]


def test_odd_keys_two_namespaces_and_invalidation_across_workers(
    redis_server: Any, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with (
        served("gthread", redis_server.port, tmp_path, workers=2, threads=4, **PATIENT) as app,
        served("sync", redis_server.port, other, workers=2, NS="atk*[x]?", **PATIENT) as app2,
    ):
        first = {arg: app.post("/echo", {"arg": arg}) for arg in ODD}
        for arg in ODD:  # read back, from any worker
            for _ in range(3):
                assert app.post("/echo", {"arg": arg}) == first[arg]
        assert len(app.computed("echo")) == len(ODD)
        # the other app (another namespace, the same functions) shares nothing
        second = {arg: app2.post("/echo", {"arg": arg}) for arg in ODD}
        assert all(second[a]["ns"] == "atk*[x]?" and second[a]["at"] != first[a]["at"] for a in ODD)
        # a delete in one worker: every worker computes anew, once
        for arg in ODD:
            assert app.post("/delete/echo", {"args": [arg]})["deleted"] is True
            again = [app.post("/echo", {"arg": arg}) for _ in range(3)]
            assert len({a["at"] for a in again}) == 1 and again[0]["at"] != first[arg]["at"]
        assert app.post("/delete/echo", {"args": ["never"]})["deleted"] is False
        # cache_clear in one namespace leaves the other's values, globs and all
        app2.post("/delete/echo?all=1", {})
        for arg in ODD:
            assert app.post("/echo", {"arg": arg})["ns"] == "atk"
        assert len(app.computed("echo")) == 2 * len(ODD)  # nothing computed again
        with redis_server.client() as client:
            ours = [k for k in client.scan_iter("atk:*echo:1:*") if not k.endswith(b":gen")]
            assert len(ours) == len(ODD)
            assert not [
                k for k in client.scan_iter("atk\\*\\[x\\]\\?:*echo:1:*") if not k.endswith(b":gen")
            ]


# -- the in-process tier under gunicorn gthread ------------------------------------------


def test_the_in_process_tier_under_gthread_threads(redis_server: Any, tmp_path: Path) -> None:
    env = {"COMPUTE": "0.1"}
    with served("gthread", redis_server.port, tmp_path, workers=1, threads=8, **env) as app:
        answers = app.burst("/local/hot", 16)
        assert len({a["at"] for a in answers}) == 1 and all(a["same"] for a in answers)
        assert len(app.computed("local")) == 1
        nxt = app.get("/local/hot", headers={"X-User": "bob"})  # the next request: a hit
        assert nxt["at"] == answers[0]["at"] and nxt["mine"] == "secret of bob"
        assert nxt["store_user"] == "bob"
        # bounded: LRUCache(maxsize=50); 120 computations of 0.1 s each, on the 8 threads
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(lambda i: app.get(f"/local/n{i}", headers={"X-User": f"u{i}"}), range(120))
            )
        # errors are not cached: the failure, then a value
        assert app.get("/local_flaky/f") == {"error": "('f failed once', 0)"}
        assert app.get("/local_flaky/f")["arg"] == "f"
        (state,) = app.settled(1).values()
        assert state["local_size"] == 50
        keys = " ".join(state["local_keys"])
        assert "secret of" not in keys and "whoami" not in keys and "u1" not in keys


# -- nothing left behind: scopes, connections, memory ------------------------------------


def _clients(redis_server: Any) -> int:
    with redis_server.client() as client:
        return len(client.client_list()) - 1  # not this one


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_many_requests_leave_nothing_behind(kind: str, redis_server: Any, tmp_path: Path) -> None:
    env = {"COMPUTE": "0", **PATIENT}
    with served(kind, redis_server.port, tmp_path, workers=1, threads=4, **env) as app:
        paths = ["/value/{i}", "/boom/{i}", "/value/same"]
        if kind == "gthread":
            paths += ["/local/{i}", "/unstorable/{i}", "/sized/{i}"]

        def round_(start: int, n: int) -> None:
            with ThreadPoolExecutor(4) as pool:
                list(
                    pool.map(
                        lambda i: app.get(paths[i % len(paths)].format(i=i)),
                        range(start, start + n),
                    )
                )

        round_(0, 300)  # warm up: every connection the pool will have
        time.sleep(0.2)
        clients, (before,) = _clients(redis_server), app.states(1).values()
        for start in range(300, 2100, 300):
            round_(start, 300)
        time.sleep(0.2)
        (after,) = app.settled(1).values()
        assert _clients(redis_server) <= clients + 1, (clients, _clients(redis_server))
        assert after["rss"] - before["rss"] < 8 * 2**20, (before["rss"], after["rss"])
        assert after["threads"] <= before["threads"]
        assert after["stats"]["errors"] == 0


# -- a slow server, one that closes idle connections, a preloaded master ------------------


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_a_slow_redis_and_one_closing_idle_connections(
    kind: str, own_redis: Any, tmp_path: Path
) -> None:
    redis_server = own_redis("--timeout", "1")  # idle clients closed after 1 s
    env = {"OP_TIMEOUT": "0.4", "COMPUTE": "0.05"}
    with served(kind, redis_server.port, tmp_path, workers=2, threads=4, **env) as app:
        for _ in range(2):
            _shared_again(app, f"idle{time.monotonic()}")
            _until_closed_as_idle(redis_server)  # every pooled connection
        assert sum(s["stats"]["errors"] for s in app.states(2).values()) == 0
        stop = threading.Event()
        # 8 s: a waiter whose holder's release was cut (CLIENT KILL) waits out the lock's
        # lock_timeout (5 s, docs/redis.md), then a few op_timeouts; a loaded machine
        # took 5.05 s against the 4 s this was once. A hang would take the client's 18 s.
        join = _hammer(app, [f"s{i}" for i in range(10)], stop, limit=8)
        with redis_server.client() as admin:
            for _ in range(2):  # writes (and so scripts) paused, then all paused
                admin.execute_command("CLIENT", "PAUSE", "1200", "WRITE")
                time.sleep(1.5)
                admin.execute_command("CLIENT", "PAUSE", "800", "ALL")
                time.sleep(1)
                for _ in range(5):  # a proxy restarting: every connection cut
                    admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                    time.sleep(0.1)
        _, failures = join()
        assert not failures, failures[:10]
        _until_quiet(app)
        _shared_again(app, "after-pauses")


def _until_closed_as_idle(redis_server: Any) -> None:
    """Until the server (``--timeout 1``) has closed every connection the apps had open
    now, for being idle (at most 10 s)."""
    with redis_server.client() as admin:
        me = admin.client_id()
        idle = {c["id"] for c in admin.client_list() if c["id"] != str(me)}
        assert idle, "the apps keep no connection to close"
        deadline = time.monotonic() + 10
        while idle & {c["id"] for c in admin.client_list()}:
            assert time.monotonic() < deadline, admin.client_list()
            time.sleep(0.1)


def _until_quiet(app: App, quiet: float = 1.5) -> None:
    """Until no worker has counted a failure for ``quiet`` s (longer than retry_after): a
    request the hammer gave up on may still run in its worker, and fail there, after the
    hammer has stopped; Redis is then left alone a while, and a key computed meanwhile is
    computed in each worker, with the failure counted before the burst looked (15 s at most)."""
    deadline, last, since = time.monotonic() + 15, _failed(app), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.1)
        if (now := _failed(app)) != last:
            last, since = now, time.monotonic()


def test_gunicorn_preload_forks_a_master_that_used_redis(redis_server: Any, tmp_path: Path) -> None:
    env = {"GUNICORN_CMD_ARGS": "--preload", "WARM": "1", **PATIENT}
    with served("gthread", redis_server.port, tmp_path, workers=2, threads=4, **env) as app:
        assert len(app.computed("value")) == 1  # the master's
        assert {a["arg"] for a in app.burst("/value/warm", 8)} == {"warm"}
        assert len(app.computed("value")) == 1
        _shared_again(app, "forked")
        states = app.states(2)
        assert sum(s["stats"]["errors"] for s in states.values()) == 0


def test_a_worker_aborted_mid_computation_releases_its_lock(
    redis_server: Any, tmp_path: Path
) -> None:
    """gunicorn's worker timeout sends SIGABRT, which a sync worker turns into
    ``sys.exit(1)`` in the middle of the computation: its lock goes with it, so that the
    other worker's next request computes at once, not after lock_timeout."""
    with served("sync", redis_server.port, tmp_path, workers=2, LOCK_TIMEOUT="20") as app:
        with ThreadPoolExecutor(1) as pool:
            doomed = pool.submit(lambda: app.http.get("/hang/h"))
            deadline = time.monotonic() + 10
            while not app.computed("hang_started"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            (started,) = app.computed("hang_started")
            os.kill(int(started[2]), signal.SIGABRT)
            with pytest.raises(httpx.HTTPError):
                doomed.result(15).raise_for_status()
        (tmp_path / "release").touch()
        start = time.monotonic()
        got = app.get("/hang/h")
        assert time.monotonic() - start < 5, "waited for the dead worker's lock"
        assert got["arg"] == "h" and int(started[2]) != got["pid"]
        with redis_server.client() as client:
            assert not list(client.scan_iter("*:lock"))


def test_a_server_refusing_clients_fails_open(own_redis: Any, tmp_path: Path) -> None:
    redis_server = own_redis("--maxclients", "3")
    with (
        served("uvicorn", redis_server.port, tmp_path, workers=2, COMPUTE="0.05") as app,
        redis_server.client() as hog1,
        redis_server.client() as hog2,
    ):
        hog1.ping(), hog2.ping()  # the server is nearly full: refusals fail open
        for _ in range(3):
            answers = app.burst("/value/full", 12)
            assert {a["arg"] for a in answers} == {"full"}


@pytest.mark.parametrize("rounds", [5])
def test_async_invalidation_across_workers(redis_server: Any, tmp_path: Path, rounds: int) -> None:
    env = {"COMPUTE": "0.05", **PATIENT}
    with served("uvicorn", redis_server.port, tmp_path, workers=2, **env) as app:
        first = app.get("/value/inv")
        assert app.get("/value/inv")["at"] == first["at"]
        for _ in range(rounds):
            assert app.post("/delete/inv", {})["deleted"] is True
            again = app.burst("/value/inv", 6)
            assert len({a["at"] for a in again}) == 1 and again[0]["at"] != first["at"], again
            first = again[0]


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_a_hot_key_expiring_under_load_is_computed_once_per_expiry(
    kind: str, redis_server: Any, tmp_path: Path
) -> None:
    env = {"TTL": "0.5", "COMPUTE": "0.1", **PATIENT}
    with served(kind, redis_server.port, tmp_path, workers=2, threads=8, **env) as app:
        stop = threading.Event()
        join = _hammer(app, ["hot"], stop, limit=5)
        time.sleep(4)
        _, failures = join()
        assert not failures, failures[:5]
        ends = sorted(float(r[-1]) for r in app.computed() if r[0] in ("value", "avalue"))
        assert len(ends) >= 4
        gaps = [b - a for a, b in itertools.pairwise(ends)]
        # a value lives 0.5 s once stored: the next computation ends 0.5 s + at least
        # the computation's 0.1 s later
        assert min(gaps) > 0.5, gaps


def test_a_worker_frozen_mid_computation_neither_blocks_nor_overwrites(
    redis_server: Any, tmp_path: Path
) -> None:
    """A lock holder's process stopped (SIGSTOP: a VM pause, a debugger) past its lock:
    the other worker computes after lock_timeout; the frozen one, resumed, answers its
    own request and leaves the newer value in Redis."""
    with served("sync", redis_server.port, tmp_path, workers=2, LOCK_TIMEOUT="1") as app:
        with ThreadPoolExecutor(1) as pool:
            frozen = pool.submit(lambda: app.get("/hang/f"))
            deadline = time.monotonic() + 10
            while not app.computed("hang_started"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            pid = int(app.computed("hang_started")[0][2])
            os.kill(pid, signal.SIGSTOP)
            try:
                (tmp_path / "release").touch()
                start = time.monotonic()
                fresh = app.get("/hang/f")  # the other worker: the frozen one accepts nothing
                assert time.monotonic() - start < 4 and fresh["pid"] != pid
            finally:
                os.kill(pid, signal.SIGCONT)
            old = frozen.result(15)
        assert old["pid"] == pid and old["at"] > fresh["at"]  # it finished last
        for _ in range(4):  # the value computed while the holder was frozen stays
            assert app.get("/hang/f")["at"] == fresh["at"]


def test_two_apps_in_one_namespace_with_other_serializers_or_secrets(
    redis_server: Any, tmp_path: Path
) -> None:
    """A misconfiguration: three deployments share a namespace, one on JSON, two on
    pickle with different secrets. Each refuses the others' values (a miss, counted),
    none fails a request or reads a value it did not write."""
    dirs = [tmp_path / n for n in ("json", "a", "b")]
    for d in dirs:
        d.mkdir()
    envs = [
        {},
        {"SERIALIZER": "pickle", "SECRET": "a" * 32},
        {"SERIALIZER": "pickle", "SECRET": "b" * 32},
    ]
    with (
        served("gthread", redis_server.port, dirs[0], workers=1, **envs[0]) as json_app,
        served("sync", redis_server.port, dirs[1], workers=1, **envs[1]) as a,
        served("sync", redis_server.port, dirs[2], workers=1, **envs[2]) as b,
    ):
        apps = [json_app, a, b]
        for _ in range(3):
            for app in apps:
                got = app.get("/value/mixed")
                assert got["arg"] == "mixed"
                assert got["pid"] == app.states(1).popitem()[0]  # its own value, never another's
        refused = sum(app.states(1).popitem()[1]["stats"]["bad_values"] for app in apps)
        assert refused >= 6


@pytest.mark.parametrize("kind", ["gthread", "uvicorn"])
def test_clients_gone_while_redis_is_stopped_leave_no_scope(
    kind: str, own_redis: Any, tmp_path: Path
) -> None:
    redis_server = own_redis()
    with served(kind, redis_server.port, tmp_path, workers=1, threads=4, COMPUTE="0.3") as app:
        redis_server.pause()
        try:
            with ThreadPoolExecutor(8) as pool:
                gone = pool.map(lambda i: app.http.get(f"/value/gone{i}", timeout=0.1), range(8))
                with pytest.raises(httpx.TimeoutException):
                    list(gone)
        finally:
            redis_server.resume()
        app.settled(1)
        _shared_again(app, "back")


class Latency:
    """A TCP relay to a redis-server on 127.0.0.1 through which every client write
    arrives ``delay`` seconds late (a far server: latency, not bandwidth)."""

    def __init__(self, port: int, delay: float) -> None:
        self.upstream, self.delay = port, delay
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection((HOST, self.upstream))
            for source, sink, delay in ((client, server, self.delay), (server, client, 0.0)):
                threading.Thread(target=self._pump, args=(source, sink, delay), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

        def send() -> None:
            while (item := chunks.get()) is not None:
                time.sleep(max(0.0, item[0] - time.monotonic()))
                with contextlib.suppress(OSError):
                    sink.sendall(item[1])

        threading.Thread(target=send, daemon=True).start()
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                chunks.put((time.monotonic() + delay, data))
        chunks.put(None)

    def close(self) -> None:
        self.listener.close()


def test_a_far_redis_whose_round_trip_fits_in_op_timeout_is_shared(
    redis_server: Any, tmp_path: Path
) -> None:
    """Each round trip (0.72 s) fits in op_timeout (2 s). A new connection's handshake
    (HELLO 3, then CLIENT SETINFO) cost two more round trips, so an async operation on
    a new connection never finished within op_timeout: cancelled, its connection closed,
    and the next one new again. The tier was off for good, each request paying op_timeout.
    (Async: bounded end to end. A sync read gets op_timeout/2, too close to a round trip
    here for a loaded machine.)"""
    from perrequest import _redis_scripts

    with redis_server.client() as client:  # loaded: only the handshake is tested here
        for script in (_redis_scripts.CLAIM, _redis_scripts.EXTEND, _redis_scripts.STORE):
            client.script_load(script)
    link = Latency(redis_server.port, 0.72)  # as below: a read's half leaves 0.28 s
    try:
        env = {"OP_TIMEOUT": "2", "COMPUTE": "0.05"}
        with served("uvicorn", link.port, tmp_path, workers=2, **env) as app:
            _shared_again(app, "far")
            assert sum(s["stats"]["errors"] for s in app.states(2).values()) == 0
    finally:
        link.close()


def test_a_far_redis_that_has_not_seen_the_scripts_is_shared_at_once(
    redis_server: Any, tmp_path: Path
) -> None:
    """A script's first use on a server (a new one, a restarted one) was EVALSHA, then
    SCRIPT LOAD, then EVALSHA: three round trips within one op_timeout. Over a link
    with a round trip over op_timeout/3, each script's first use failed (fail open:
    computed again in every worker, Redis left alone for retry_after), one script
    after the other. A round trip of 0.36 of op_timeout: over its third (three of them
    outlast it: the old protocol fails, the more so on a loaded machine), and 0.14 of it
    under the half that one read may take (0.4 of 1 s left a loaded CI run 0.1 s, and
    one read outlasted it)."""
    link = Latency(redis_server.port, 0.72)
    try:
        env = {"OP_TIMEOUT": "2", "COMPUTE": "0.05"}
        with served("uvicorn", link.port, tmp_path, workers=2, **env) as app:
            _shared_again(app, "first")
            _shared_again(app, "second")
            assert sum(s["stats"]["errors"] for s in app.states(2).values()) == 0
    finally:
        link.close()
