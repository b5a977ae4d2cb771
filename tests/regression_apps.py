"""Apps for tests/test_regressions.py: a scope that closes while threads compute and wait.

A handler hands a slow memoized computation to two pool threads (through
``bind_scope``) and returns at once, so its scope closes while one thread
computes the key and the other waits for it. Both must finish: ``/stuck``
reports how many are still inside the call.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, jsonify
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import perrequest
from perrequest import bind_scope, request_memo
from perrequest.asgi import RequestScopeMiddleware
from perrequest.flask import PerRequest

_inside = 0
_finished = 0
_lock = threading.Lock()
_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="regression")


@request_memo
def slow_lookup(key: str) -> str:
    time.sleep(0.2)
    return f"value of {key}"


def _call(key: str) -> str:
    global _inside, _finished
    with _lock:
        _inside += 1
    try:
        return slow_lookup(key)
    finally:
        with _lock:
            _inside -= 1
            _finished += 1


def _counts() -> dict[str, int]:
    with _lock:
        return {"inside": _inside, "finished": _finished}


flask_app = Flask("regressions")
PerRequest(flask_app)


@flask_app.get("/hand-off/<key>")
def hand_off(key: str) -> Any:
    # A computes; B, a moment later, waits for A. The response is sent, and the
    # scope closed, while both are in flight.
    bound = bind_scope(_call)
    _pool.submit(bound, key)
    time.sleep(0.02)
    _pool.submit(bound, key)
    time.sleep(0.02)
    return jsonify(ok=True)


@flask_app.get("/stuck")
def stuck() -> Any:
    return jsonify(_counts())


async def starlette_hand_off(request: Request) -> JSONResponse:
    loop = asyncio.get_running_loop()
    bound = bind_scope(_call)
    key = request.path_params["key"]
    loop.run_in_executor(None, bound, key)  # uvicorn's default executor
    await asyncio.sleep(0.02)
    loop.run_in_executor(None, bound, key)
    await asyncio.sleep(0.02)
    return JSONResponse({"ok": True})


async def starlette_stuck(request: Request) -> JSONResponse:
    return JSONResponse(_counts())


starlette_app = Starlette(
    routes=[
        Route("/hand-off/{key}", starlette_hand_off),
        Route("/stuck", starlette_stuck),
    ]
)
starlette_app.add_middleware(RequestScopeMiddleware)

__all__ = ["flask_app", "perrequest", "starlette_app"]
