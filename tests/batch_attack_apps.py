"""Apps that tests/test_attack_batch_servers.py serves: @request_batch under uvicorn,
hypercorn (asyncio and trio) and gunicorn gthread, each run as a subprocess.

Every request stores its id (``rid``); the batch functions read it back and make each
value ``"rid:key"``, so a value that reached a request from another's batch shows.
Each batch call is recorded per request (``FETCHED[rid][key]``): a key fetched twice in
one request, or a batch whose function saw another request's id, lands in ``BAD``.
``/state`` is served outside perrequest: what the process holds after the attack.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import sniffio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import perrequest
from perrequest import bind_scope, request_batch, request_memo
from perrequest._active import _current
from perrequest._batch_tick import _running
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

_lock = threading.Lock()
BAD: list[str] = []
TWICE: list[str] = []
FETCHED: dict[str, Counter[Any]] = {}
LATE: Counter[str] = Counter()  # what batch functions saw after their sleep: own/none/other


def bad(message: str) -> None:
    with _lock:
        if len(BAD) < 50:
            BAD.append(message)


def record(keys: list[Any]) -> str | None:
    """Note a batch call of this request's keys; its id (None: outside any scope). A
    key fetched twice in a request is noted in ``TWICE`` (allowed under trio only)."""
    rid = perrequest.get("rid")
    with _lock:
        counts = FETCHED.setdefault(str(rid), Counter())
        for key in keys:
            counts[key] += 1
            if counts[key] == 2 and rid is not None and len(TWICE) < 50:
                TWICE.append(f"{rid} fetched {key!r} twice")
    return rid  # type: ignore[no-any-return]


async def sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


async def gather(*awaitables: Any) -> list[Any]:
    """asyncio.gather that runs under trio too (anyio); the first failure is raised."""
    out: list[Any] = [None] * len(awaitables)

    async def one(i: int, awaitable: Any) -> None:
        out[i] = await awaitable

    async with anyio.create_task_group() as tg:
        for i, awaitable in enumerate(awaitables):
            tg.start_soon(one, i, awaitable)
    return out


@request_batch
async def items(keys: list[int]) -> list[str]:
    rid = record(keys)
    await sleep(perrequest.get("delay", 0.01))
    after = perrequest.get("rid")
    with _lock:
        LATE["own" if after == rid else "none" if after is None else "other"] += 1
    return [f"{rid}:{key}" for key in keys]


@request_batch
def items_sync(keys: list[int]) -> dict[int, str]:
    rid = record([("sync", k) for k in keys])
    return {key: f"{rid}:{key}" for key in keys}


@request_batch(max_batch_size=3)
async def tree(keys: list[int]) -> list[tuple[int, ...]]:
    """Each key's path to the root 1: a node's parent is key // 2, loaded through itself
    (a key in flight that it loads is fetched again, as documented: not recorded)."""
    if perrequest.get("rid") is None:
        bad(f"tree{keys} outside its request")
    parents = [await tree.load(k // 2) if k > 1 else () for k in keys]
    return [(*parent, k) for parent, k in zip(parents, keys, strict=True)]


@request_memo
async def label(key: int) -> str:
    return f"label({await items.load(key)})"


@request_batch
async def labelled(keys: list[int]) -> list[str]:
    record([("labelled", k) for k in keys])
    return [await label(k) for k in keys]


class Boom(Exception):
    pass


class NotAnException(BaseException):
    pass


@request_batch
async def weird(keys: list[Any]) -> Any:
    mode = perrequest.get("mode")
    await sleep(0)
    if mode == "some":
        return [Boom(f"key {k}") if k % 2 else f"v{k}" for k in keys]
    if mode == "few":
        return [f"v{k}" for k in keys[:-1]]
    if mode == "many":
        return [f"v{k}" for k in [*keys, 99]]
    if mode == "wrong":
        return {k + 1000: "x" for k in keys}
    if mode == "set":
        return {f"v{k}" for k in keys}
    if mode == "raise":
        raise Boom("all")
    if mode == "base":
        raise NotAnException("not an exception")
    if mode == "inner-cancel":
        inner = asyncio.ensure_future(asyncio.sleep(5))
        inner.cancel()
        await inner
    if mode == "self-cancel":  # its own task cancelled, every time it is asked
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        await asyncio.sleep(0)
    if mode == "none":
        return None
    if mode == "unhashable-values":
        return [[k] for k in keys]
    return [f"v{k}" for k in keys]


class SavedKey:
    """A key whose hash changes when it is saved, as the batch function does: a model
    instance hashed by a primary key the save assigns, say."""

    def __init__(self, n: int) -> None:
        self.n, self.saved = n, False

    def __hash__(self) -> int:
        return hash((self.n, self.saved))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SavedKey) and (other.n, other.saved) == (self.n, self.saved)


@request_batch
async def save(keys: list[SavedKey]) -> list[str]:
    rid = record([("save", k.n) for k in keys])
    await sleep(0)
    for key in keys:
        key.saved = True
    return [f"{rid}:{key.n}" for key in keys]


async def save_view(request: Request) -> JSONResponse:
    """Loads of keys the batch function changes: each caller gets its value, the server
    goes on."""
    rid = _begin(request)
    keys = [SavedKey(n) for n in range(4)]
    values = await gather(*(save.load(k) for k in keys))
    values += await save.load_many([SavedKey(n) for n in range(4, 8)])
    values.append(await save.load(keys[0]))  # stored as it is now: a hit
    _mine(rid, values)
    return JSONResponse({"values": values, "fetched": _fetched(rid)})


def _outcome(value: Any) -> Any:
    return f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else value


async def _each(load: Any, keys: list[Any]) -> list[Any]:
    out = []
    for key in keys:
        try:
            out.append(await load(key))
        except Exception as exc:
            out.append(_outcome(exc))
    return out


def _begin(request: Request) -> str:
    rid = request.query_params["rid"]
    perrequest.set("rid", rid)
    perrequest.set("delay", float(request.query_params.get("delay", 0.01)))
    return rid


def _mine(rid: str, values: list[Any]) -> None:
    for value in values:
        if not str(value).startswith(f"{rid}:"):
            bad(f"{rid} got {value!r}")


def _fetched(rid: str) -> dict[str, int]:
    with _lock:
        return {str(k): n for k, n in FETCHED.pop(rid, Counter()).items()}


async def gather_view(request: Request) -> JSONResponse:
    """Several tasks of the request load overlapping windows, then load each again."""
    rid = _begin(request)
    first = int(request.query_params.get("first", 0))
    keys = list(range(first, first + 20))
    results: dict[int, list[str]] = {}

    async def part(n: int) -> None:
        await sleep(0)
        results[n] = await items.load_many(keys[n * 4 : n * 4 + 8])

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(part, n)
    again = [await items.load(k) for k in keys]
    for values in results.values():
        _mine(rid, values)
    _mine(rid, again)
    return JSONResponse({"again": again, "fetched": _fetched(rid)})


async def slow_view(request: Request) -> JSONResponse:
    """A slow batch: the client hangs up before it ends (or not)."""
    rid = _begin(request)
    keys = [int(k) for k in request.query_params["keys"].split(",")]
    if "leave" in request.query_params:  # the batch is still pending when the request ends
        items.load_many(keys)
        return JSONResponse({"values": [], "fetched": {}})
    values = await items.load_many(keys)
    _mine(rid, values)
    return JSONResponse({"values": values, "fetched": _fetched(rid)})


async def timeout_view(request: Request) -> JSONResponse:
    """A load timed out (asyncio.timeout or anyio.fail_after); then, unless ``leave``, the
    same keys loaded again: they join the batch still in flight."""
    rid = _begin(request)
    keys = [int(k) for k in request.query_params["keys"].split(",")]
    how = request.query_params["how"]
    timed_out = False
    try:
        if how == "asyncio":
            async with asyncio.timeout(0.05):
                await items.load_many(keys)
        else:
            with anyio.fail_after(0.05):
                await items.load(keys[0])
    except TimeoutError:
        timed_out = True
    values: list[str] = []
    if "leave" not in request.query_params:
        values = await items.load_many(keys)
        _mine(rid, values)
    return JSONResponse({"timed_out": timed_out, "values": values, "fetched": _fetched(rid)})


async def weird_view(request: Request) -> JSONResponse:
    perrequest.set("mode", request.query_params["mode"])
    keys = [1, 2, 3, 4]
    first = await _each(weird.load, keys)
    try:
        many: Any = await weird.load_many(keys)
    except Exception as exc:
        many = _outcome(exc)
    try:
        await weird.load([1])  # an unhashable key
        unhashable = None
    except Exception as exc:
        unhashable = _outcome(exc)
    perrequest.set("mode", "ok")
    after = await _each(weird.load, keys)  # failures were not cached; values were
    return JSONResponse({"first": first, "many": many, "unhashable": unhashable, "after": after})


async def tree_view(request: Request) -> JSONResponse:
    rid = _begin(request)
    keys = [int(k) for k in request.query_params["keys"].split(",")]
    paths = await gather(*(tree.load(k) for k in keys))
    return JSONResponse({"paths": paths, "fetched": _fetched(rid)})


async def mix_view(request: Request) -> JSONResponse:
    rid = _begin(request)
    keys = list(range(10))
    labels = await gather(*(labelled.load(k) for k in keys), *(label(k) for k in keys))
    for value in labels:
        if not str(value).startswith(f"label({rid}:"):
            bad(f"{rid} got {value!r}")
    return JSONResponse({"labels": labels, "fetched": _fetched(rid)})


async def threads_view(request: Request) -> JSONResponse:
    """A sync loader from Starlette's thread pool (several at once) and a bound pool."""
    rid = _begin(request)
    keys = list(range(int(request.query_params.get("first", 0)), 30))
    parts = await gather(
        *(run_in_threadpool(items_sync.load_many, keys[n : n + 12]) for n in range(0, 20, 6))
    )
    with ThreadPoolExecutor(3) as pool:
        bound = list(pool.map(bind_scope(items_sync.load), keys))
    for part in parts:
        _mine(rid, part)
    _mine(rid, bound)
    return JSONResponse({"fetched": _fetched(rid)})


async def threads_timeout_view(request: Request) -> JSONResponse:
    """A sync fetch in anyio's thread pool, and a second thread waiting for its key: the
    request stops waiting for both (move_on_after; the threads are abandoned, as
    run_in_threadpool's are not) and ends while they run."""
    _begin(request)
    perrequest.set("delay", 0.3)
    run = anyio.to_thread.run_sync
    with anyio.move_on_after(0.05) as scope:
        await gather(
            run(slow_sync.load_many, [1, 2], abandon_on_cancel=True),
            run(slow_sync.load, 2, abandon_on_cancel=True),
        )
    return JSONResponse({"timed_out": scope.cancelled_caught, "fetched": {}})


async def unique_view(request: Request) -> JSONResponse:
    """Keys no other request loads, values of 2 kB: what a leak would keep."""
    n = int(request.query_params["n"])
    perrequest.set("rid", "u")
    values = await unique.load_many(range(n * 20, n * 20 + 20))
    values += [await unique.load(k) for k in range(n * 20, n * 20 + 20)]
    return JSONResponse({"count": len(values)})


@request_batch
async def unique(keys: list[int]) -> list[str]:
    await sleep(0)
    return ["x" * 2048 + str(key) for key in keys]


def _rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def state_view() -> dict[str, Any]:
    """Outside perrequest: what this task's context holds, and the process."""
    gc.collect()
    backend = sniffio.current_async_library()
    tasks: list[str] = []  # ours (perrequest's, this module's): the server's are its own
    if backend == "asyncio":
        for task in asyncio.all_tasks():
            code = getattr(task.get_coro(), "cr_code", None)
            where = "" if code is None else code.co_filename
            if not task.done() and ("perrequest" in where or __name__ in where):
                tasks.append(f"{where}:{code.co_name}")
    with _lock:
        return {
            "live": live_scopes(),
            "var": repr(_current.get()),
            "running": sum(len(t) for t in _running.values()),
            "tasks": tasks,
            "rss_kb": _rss_kb(),
            "bad": list(BAD),
            "twice": list(TWICE),
            "late": dict(LATE),
            "fetched_left": sorted(FETCHED),
        }


starlette = Starlette(
    routes=[
        Route("/gather", gather_view),
        Route("/slow", slow_view),
        Route("/timeout", timeout_view),
        Route("/weird", weird_view),
        Route("/tree", tree_view),
        Route("/mix", mix_view),
        Route("/threads", threads_view),
        Route("/unique", unique_view),
        Route("/save", save_view),
        Route("/threads-timeout", threads_timeout_view),
    ]
)
wrapped = RequestScopeMiddleware(starlette)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/state`` outside perrequest; the rest through its middleware."""
    if scope["type"] == "http" and scope["path"] == "/state":
        body = json.dumps(await state_view()).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await wrapped(scope, receive, send)


# -- WSGI: Flask under gunicorn gthread, sync loaders in threads, async views' own loops --

from concurrent.futures import TimeoutError as FutureTimeout  # noqa: E402

from flask import Flask, jsonify  # noqa: E402
from flask import request as flask_request  # noqa: E402

from perrequest.flask import PerRequest  # noqa: E402


@request_batch
def slow_sync(keys: list[int]) -> list[str]:
    rid = record([("slow", k) for k in keys])
    import time

    time.sleep(perrequest.get("delay", 0.3))
    after = perrequest.get("rid")
    with _lock:
        LATE["own" if after == rid else "none" if after is None else "other"] += 1
    return [f"{rid}:{k}" for k in keys]


@request_memo
def sync_label(key: int) -> str:
    return f"label({items_sync.load(key)})"


flask_app = Flask(__name__)


def _flask_begin() -> str:
    rid = flask_request.args["rid"]
    perrequest.set("rid", rid)
    perrequest.set("delay", float(flask_request.args.get("delay", 0.3)))
    return rid


@flask_app.get("/sync")
def flask_sync() -> Any:
    """A bound pool's threads, the request's thread and a memo load overlapping keys."""
    rid = _flask_begin()
    first = int(flask_request.args.get("first", 0))
    keys = list(range(first, first + 24))
    with ThreadPoolExecutor(3) as pool:
        parts = list(pool.map(bind_scope(items_sync.load_many), [keys[:12], keys[6:18], keys[12:]]))
        labels = list(pool.map(bind_scope(sync_label), keys))
    values = items_sync(keys)
    for part in [*parts, values, [v[len("label(") :] for v in labels]]:
        _mine(rid, part)
    return jsonify({"values": values, "fetched": _fetched(rid)})


@flask_app.get("/sync-timeout")
def flask_sync_timeout() -> Any:
    """A pool thread fetches slowly, another waits for its key; the request gives up on
    both and ends while they run (the pool is not waited for)."""
    _flask_begin()
    perrequest.set("delay", 1.0)  # longer than both waits, on a loaded machine too
    pool = ThreadPoolExecutor(2)
    fetching = pool.submit(bind_scope(slow_sync.load_many), [1, 2])
    waiting = pool.submit(bind_scope(slow_sync.load), 2)
    timed_out = 0
    for future in (fetching, waiting):
        try:
            future.result(timeout=0.05)
        except FutureTimeout:
            timed_out += 1
    pool.shutdown(wait=False)
    return jsonify({"timed_out": timed_out})


@flask_app.get("/async")
async def flask_async() -> Any:
    """An async view: a loop of its own per request (asgiref), loads from several tasks;
    ``leave``: one more load never awaited, pending when the loop ends."""
    rid = _flask_begin()
    keys = list(range(int(flask_request.args.get("first", 0)), 15))
    values = await asyncio.gather(*(items.load(k) for k in keys))
    if "leave" in flask_request.args:
        items.load(999)
    _mine(rid, values)
    return jsonify({"values": values, "fetched": _fetched(rid)})


PerRequest(flask_app)


def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
    """``/state`` outside perrequest (what this worker thread holds); the rest: Flask."""
    if environ["PATH_INFO"] != "/state":
        return flask_app(environ, start_response)
    gc.collect()
    with _lock:
        state = {
            "live": live_scopes(),
            "var": repr(_current.get()),
            "running": sum(len(t) for t in _running.values()),
            "tasks": [],
            "rss_kb": _rss_kb(),
            "bad": list(BAD),
            "twice": list(TWICE),
            "late": dict(LATE),
            "fetched_left": sorted(FETCHED),
        }
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(state).encode()]


# -- Django under uvicorn: async views' batches, sync views' loaders (thread-sensitive
# thread), an async loader called from a sync view through async_to_sync -------------------


def django_asgi() -> Any:
    """uvicorn --factory: Django's ASGI handler with perrequest's middleware; ``/state``
    beside it, outside both."""
    import django
    from django.conf import settings
    from django.core.asgi import get_asgi_application
    from django.urls import path

    settings.configure(
        DEBUG=False,
        SECRET_KEY="perrequest-batch-attack",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],
        INSTALLED_APPS=[],
        DATABASES={},
    )
    django.setup()
    globals()["urlpatterns"] = [
        path("dj/async", django_async_view),
        path("dj/sync", django_sync_view),
    ]
    handler = get_asgi_application()

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/state":
            await app(scope, receive, send)
        else:
            await handler(scope, receive, send)

    return asgi


def _django_begin(request: Any) -> str:
    rid = request.GET["rid"]
    perrequest.set("rid", rid)
    perrequest.set("delay", 0.02)
    return rid  # type: ignore[no-any-return]


async def django_async_view(request: Any) -> Any:
    from django.http import JsonResponse

    rid = _django_begin(request)
    first = int(request.GET.get("first", 0))
    values = await asyncio.gather(*(items.load(k) for k in range(first, first + 15)))
    values += await items.load_many(range(first, first + 20))
    _mine(rid, values)
    return JsonResponse({"values": values, "fetched": _fetched(rid)})


def django_sync_view(request: Any) -> Any:
    from asgiref.sync import async_to_sync
    from django.http import JsonResponse

    rid = _django_begin(request)
    first = int(request.GET.get("first", 0))
    keys = list(range(first, first + 20))
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(bind_scope(items_sync.load_many), [keys[:12], keys[8:]]))
    looped = async_to_sync(items.load_many)(keys)  # on the server's loop, in this request
    for part in [*parts, looped, items_sync(keys)]:
        _mine(rid, part)
    return JsonResponse({"fetched": _fetched(rid)})
