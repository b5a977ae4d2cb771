"""Apps for the shared tiers' attack tests under real servers: a Flask app (gunicorn
``sync``/``gthread``, several workers) and a Starlette app (``uvicorn --workers 2``), on
a real redis-server (``REDIS_PORT``) and an in-process ``cachetools`` tier.

Every computation is recorded as a line in ``LOG_DIR/computed`` (``O_APPEND``), the one
place every worker can write to while Redis is down. ``/_state`` reports the worker's
own state: live scopes, RSS, threads, the caches' counters.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from typing import Any

import cachetools
import redis
import redis.asyncio

import perrequest
from perrequest import SharedComputationError, request_memo
from perrequest.redis import RedisCache
from perrequest.testing import live_scopes

ENV = os.environ
PORT = int(ENV.get("REDIS_PORT", "6379"))
LOG = os.path.join(ENV.get("LOG_DIR", "/tmp"), "computed")
NS = ENV.get("NS", "atk")
OPTIONS: dict[str, Any] = {
    "ttl": float(ENV.get("TTL", "60")),
    "namespace": NS,
    "lock_timeout": float(ENV.get("LOCK_TIMEOUT", "5")),
    "op_timeout": float(ENV.get("OP_TIMEOUT", "0.5")),
    "retry_after": float(ENV.get("RETRY_AFTER", "1")),
    "serializer": ENV.get("SERIALIZER", "json"),
    "secret": ENV.get("SECRET") or None,
}
COMPUTE = float(ENV.get("COMPUTE", "0.2"))  # seconds one computation takes


class AppError(Exception):
    """Raised by ``boom``: a message, and an attribute that is plain data."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message, code)
        self.code = code


# Every exception ``boom`` raised in this process and still alive (a request that got one
# holds it). Weakly: the last 50, held, kept their tracebacks' frames, whose turnover left
# the worker's RSS 6 to 11 MB above where the old warm-up measured it before settling
# (CPython 3.12: past test_many_requests_leave_nothing_behind's 8 MB; 0.5 MB without them).
ORIGINALS: weakref.WeakSet[BaseException] = weakref.WeakSet()


def record(kind: str, arg: object) -> None:
    line = f"{kind} {arg!r} {os.getpid()} {time.time()!r}\n".encode()
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _value(kind: str, arg: Any) -> dict[str, Any]:
    record(kind, arg)
    return {"arg": arg, "pid": os.getpid(), "at": time.time(), "ns": NS}


def _boom(name: str) -> None:
    record("boom", name)
    private = {"request": f"data of {os.getpid()}"}  # a local a frame would keep
    error = AppError(f"{name} failed", code=len(private))
    ORIGINALS.add(error)
    raise error


def report_error(exc: BaseException, code: object) -> dict[str, Any]:
    """What a request got when ``boom`` raised: never the original for a waiter."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "shared_error": isinstance(exc, SharedComputationError),
        "original": any(exc is e for e in ORIGINALS),
        "computed_here": code in frames,
        "cause": exc.__cause__ is not None or exc.__context__ is not None,
        "pid": os.getpid(),
    }


def state(extra: dict[str, Any]) -> dict[str, Any]:
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {
        "pid": os.getpid(),
        "live": live_scopes(),
        "rss": rss_pages * os.sysconf("SC_PAGE_SIZE"),
        "threads": threading.active_count(),
        "in_scope": perrequest.in_request_scope(),
        **extra,
    }


# -- sync: Flask, for gunicorn --------------------------------------------------------


def _client(module: Any) -> Any:
    """A client on a plain pool, or (``POOL=blocking``) on a blocking pool of 2."""
    if ENV.get("POOL") != "blocking":
        return module.Redis(host="127.0.0.1", port=PORT)
    pool = module.BlockingConnectionPool(host="127.0.0.1", port=PORT, max_connections=2)
    return module.Redis(connection_pool=pool)


sync_cache = RedisCache(_client(redis), **OPTIONS)
local_cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(maxsize=50)
_fails: dict[str, int] = {}


@request_memo(shared=sync_cache)
def value(name: str) -> dict[str, Any]:
    time.sleep(COMPUTE)
    return _value("value", name)


@request_memo(shared=sync_cache)
def slow(name: str, seconds: float) -> dict[str, Any]:
    time.sleep(seconds)
    return _value("slow", name)


@request_memo(shared=sync_cache)
def hang(name: str) -> dict[str, Any]:
    """Until ``LOG_DIR/release`` exists (10 s at most): a computation to kill."""
    record("hang_started", name)
    deadline = time.monotonic() + 10
    while not os.path.exists(os.path.join(os.path.dirname(LOG), "release")):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return _value("hang", name)


@request_memo(shared=sync_cache)
def boom(name: str) -> None:
    time.sleep(COMPUTE)
    _boom(name)


@request_memo(shared=sync_cache)
def unstorable(name: str) -> Any:
    record("unstorable", name)
    return {name, 1}  # a set: JSON has none


@request_memo(shared=sync_cache)
def sized(n: int) -> str:
    record("sized", n)
    return "x" * n


@request_memo(shared=sync_cache)
def echo(arg: Any) -> dict[str, Any]:
    return _value("echo", arg)


@request_memo(shared=local_cache)
def local(name: str) -> dict[str, Any]:
    time.sleep(COMPUTE)
    return _value("local", name)


@request_memo(shared=local_cache)
def local_flaky(name: str) -> dict[str, Any]:
    _fails[name] = _fails.get(name, 0) + 1
    if _fails[name] == 1:
        record("local_flaky_failed", name)
        raise AppError(f"{name} failed once")
    return _value("local_flaky", name)


@request_memo
def whoami(user: str) -> str:  # a request-only memo: never in a shared tier
    return f"secret of {user}"


def make_flask() -> Any:
    from flask import Flask, jsonify, request

    from perrequest.flask import PerRequest

    app = Flask(__name__)
    PerRequest(app)

    @app.get("/value/<name>")
    def get_value(name: str) -> Any:
        first = value(name)
        return jsonify({**first, "repeatable": value(name) == first, "served_by": os.getpid()})

    @app.get("/slow/<name>")
    def get_slow(name: str) -> Any:
        return jsonify({**slow(name, float(request.args["s"])), "served_by": os.getpid()})

    @app.get("/hang/<name>")
    def get_hang(name: str) -> Any:
        return jsonify(hang(name))

    @app.get("/boom/<name>")
    def get_boom(name: str) -> Any:
        try:
            boom(name)
        except Exception as exc:
            return jsonify(report_error(exc, _boom.__code__))
        return jsonify({"type": None})

    @app.get("/unstorable/<name>")
    def get_unstorable(name: str) -> Any:
        try:
            unstorable(name)
        except TypeError as exc:
            return jsonify({"error": str(exc)})
        return jsonify({"error": None})

    @app.get("/sized/<int:n>")
    def get_sized(n: int) -> Any:
        return jsonify({"length": len(sized(n)), "info": sized.cache_info()._asdict()})

    @app.post("/echo")
    def post_echo() -> Any:
        return jsonify(echo(request.get_json()["arg"]))

    @app.post("/delete/<fn>")
    def delete(fn: str) -> Any:
        target = {"value": value, "echo": echo, "local": local}[fn]
        args = request.get_json().get("args", [])
        if request.args.get("all"):
            target.cache_clear()
            return jsonify({"deleted": None})
        return jsonify({"deleted": target.cache_delete(*args)})

    @app.get("/local/<name>")
    def get_local(name: str) -> Any:
        user = request.headers.get("X-User", "")
        mine = whoami(user)
        perrequest.current_store()["user"] = user
        got = local(name)
        got_again = local(name)
        return jsonify({
            **got, "mine": mine, "same": got is got_again,
            "store_user": perrequest.current_store()["user"],
        })  # fmt: skip

    @app.get("/local_flaky/<name>")
    def get_local_flaky(name: str) -> Any:
        try:
            return jsonify(local_flaky(name))
        except AppError as exc:
            return jsonify({"error": str(exc)})

    @app.get("/_state")
    def get_state() -> Any:
        return jsonify(state({
            "stats": sync_cache.stats()._asdict(),
            "local_size": len(local_cache),
            "local_keys": [repr(k) for k in list(local_cache.keys())],
        }))  # fmt: skip

    return app


flask_app = make_flask() if ENV.get("APP") == "flask" else None
if ENV.get("WARM"):  # gunicorn --preload: the master uses Redis before it forks
    with perrequest.request_scope():
        value("warm")


# -- async: Starlette, for uvicorn --workers 2 -----------------------------------------

async_cache = RedisCache(_client(redis.asyncio), **OPTIONS)


@request_memo(shared=async_cache)
async def avalue(name: str) -> dict[str, Any]:
    await asyncio.sleep(COMPUTE)
    return _value("avalue", name)


@request_memo(shared=async_cache)
async def aboom(name: str) -> None:
    await asyncio.sleep(COMPUTE)
    _boom(name)


def make_starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from perrequest.asgi import RequestScopeMiddleware

    async def get_value(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        first = await avalue(name)
        again = await avalue(name)
        return JSONResponse({**first, "repeatable": again == first, "served_by": os.getpid()})

    async def get_boom(request: Request) -> JSONResponse:
        try:
            await aboom(request.path_params["name"])
        except Exception as exc:
            return JSONResponse(report_error(exc, _boom.__code__))
        return JSONResponse({"type": None})

    async def delete(request: Request) -> JSONResponse:
        return JSONResponse({"deleted": avalue.cache_delete(request.path_params["name"])})

    async def get_state(request: Request) -> JSONResponse:
        loops = len(async_cache._loops)  # the test's own look: one pool per event loop
        return JSONResponse(state({"stats": async_cache.stats()._asdict(), "loops": loops}))

    app = Starlette(
        routes=[
            Route("/value/{name}", get_value),
            Route("/boom/{name}", get_boom),
            Route("/delete/{name}", delete, methods=["POST"]),
            Route("/_state", get_state),
        ]
    )
    app.add_middleware(RequestScopeMiddleware)
    return app


starlette_app = make_starlette() if ENV.get("APP") == "starlette" else None
