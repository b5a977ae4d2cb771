"""Views of the attack project. Each request sets its own ``marker``; whatever runs for
it later (a body's cleanup, a receiver, a thread) reports the marker it saw."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
from asgiref.sync import async_to_sync, sync_to_async
from django.http import FileResponse, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import etag

import perrequest
from perrequest.scope import _current
from perrequest.testing import live_scopes

from .state import EVENTS, aslow, big, count, slow, who

_CHUNK = b"x" * 65536


def _mark(request: Any) -> dict[str, Any]:
    before = perrequest.get("marker")
    perrequest.set("marker", request.GET.get("v", "-"))
    return {"before": before, "seen": perrequest.get("marker"), "memo": who()}


def _after_sleep(request: Any) -> None:
    """What a view sees once it has slept (its client may have left meanwhile)."""
    if request.GET.get("sleep"):
        EVENTS["cleanups"].append(
            {
                "v": request.GET["v"],
                "where": "after sleep",
                "in_scope": perrequest.in_request_scope(),
                "marker": perrequest.get("marker"),
                "memo": who(),
            }
        )


def mark(request: Any) -> JsonResponse:
    seen = _mark(request)
    time.sleep(float(request.GET.get("sleep", 0)))
    _after_sleep(request)
    return JsonResponse({**seen, "again": who(), "thread": threading.get_ident()})


async def amark(request: Any) -> JsonResponse:
    seen = _mark(request)
    await asyncio.sleep(float(request.GET.get("sleep", 0)))
    _after_sleep(request)
    inner = await sync_to_async(who)()  # the thread-sensitive executor, same store
    return JsonResponse({**seen, "again": who(), "thread_memo": inner})


def _cleanup(v: str, done: bool, where: str) -> None:
    try:
        EVENTS["cleanups"].append(
            {
                "v": v,
                "done": done,
                "where": where,
                "in_scope": perrequest.in_request_scope(),
                "marker": perrequest.get("marker"),
                "memo": who(),
            }
        )
    except BaseException as exc:
        EVENTS["errors"].append(f"cleanup {v}: {exc!r}")


def _stream(request: Any) -> tuple[str, int, bool, int]:
    """A stream's parameters, its marker stored: the value, the chunks, whether to pause
    between them (``fast``: a client leaving finds the body at a yield), and the chunk at
    which the body raises."""
    v, n = request.GET["v"], int(request.GET.get("n", 3))
    perrequest.set("marker", v)
    return v, n, not request.GET.get("fast"), int(request.GET.get("fail", -1))


def _chunk(v: str, i: int, fail: int) -> bytes:
    """Chunk ``i``, read in the request's own store (or the body fails at ``fail``)."""
    assert perrequest.get("marker") == v, perrequest.get("marker")
    if i == fail:
        raise RuntimeError("the body failed")
    return _CHUNK


def stream_sync(request: Any) -> StreamingHttpResponse:
    v, n, pause, fail = _stream(request)

    def body() -> Iterator[bytes]:
        done = False
        try:
            for i in range(n):
                yield _chunk(v, i, fail)
                if pause:
                    time.sleep(0.001)
            done = True
        finally:
            _cleanup(v, done, "sync")

    return StreamingHttpResponse(body())


def stream_async(request: Any) -> StreamingHttpResponse:
    v, n, pause, fail = _stream(request)

    async def body() -> AsyncIterator[bytes]:
        done = False
        try:
            for i in range(n):
                yield _chunk(v, i, fail)
                if pause:
                    await asyncio.sleep(0.001)
            done = True
        finally:
            _cleanup(v, done, "async")

    return StreamingHttpResponse(body())


async def flight(request: Any) -> JsonResponse:
    """One key asked for at once by the loop's tasks and by threads, both executors."""
    perrequest.set("marker", request.GET["v"])
    key = f"flight-{request.GET['v']}"
    results = await asyncio.gather(
        sync_to_async(slow, thread_sensitive=True)(key),
        sync_to_async(slow, thread_sensitive=False)(key),
        sync_to_async(slow, thread_sensitive=False)(key),
        asyncio.to_thread(slow, key),
    )
    return JsonResponse({"results": results, "calls": EVENTS["calls"][key]})


async def flight_timeout(request: Any) -> JsonResponse:
    """The first caller gives up (``wait_for``) on a computation a second caller waits on."""
    perrequest.set("marker", request.GET["v"])
    key = f"timeout-{request.GET['v']}"
    akey = f"atimeout-{request.GET['v']}"
    first = asyncio.ensure_future(
        asyncio.wait_for(sync_to_async(slow, thread_sensitive=False)(key, 0.4), 0.05)
    )
    await asyncio.sleep(0.01)
    second = sync_to_async(slow, thread_sensitive=True)(key, 0.4)
    afirst = asyncio.ensure_future(asyncio.wait_for(aslow(akey, 0.4), 0.05))
    await asyncio.sleep(0.01)
    asecond = aslow(akey, 0.4)
    outcomes = await asyncio.gather(first, second, afirst, asecond, return_exceptions=True)
    return JsonResponse(
        {
            "outcomes": [o if isinstance(o, str) else type(o).__name__ for o in outcomes],
            "calls": [EVENTS["calls"][key], EVENTS["calls"][akey]],
        }
    )


def sync_flight(request: Any) -> JsonResponse:
    """A sync view (a thread) and async_to_sync: the loop's tasks and this thread share a key."""
    perrequest.set("marker", request.GET["v"])
    key = f"sflight-{request.GET['v']}"

    async def both() -> list[str]:
        return list(
            await asyncio.gather(
                sync_to_async(slow, thread_sensitive=False)(key),
                asyncio.to_thread(slow, key),
                sync_to_async(slow)(key),  # thread_sensitive: this view's own thread
            )
        )

    results = async_to_sync(both)()
    return JsonResponse({"results": results, "mine": slow(key), "calls": EVENTS["calls"][key]})


def _late(v: str, key: str, n: int) -> None:
    """A thread still computing (or waiting for) ``key`` after request ``v`` has ended."""
    try:
        value = slow(key, 0.3)
        where = f"late thread {n}"
        EVENTS["cleanups"].append(
            {"v": v, "where": where, "marker": perrequest.get("marker"), "value": value}
        )
    except BaseException as exc:
        EVENTS["errors"].append(f"late thread: {exc!r}")


async def outlive(request: Any) -> JsonResponse:
    """Two threads still computing one key when the request ends (one computes, one
    waits): both finish, neither touches another request's store, nobody hangs."""
    v = request.GET["v"]
    perrequest.set("marker", v)
    key = f"outlive-{v}"

    for n in range(2):
        task = asyncio.ensure_future(sync_to_async(_late, thread_sensitive=False)(v, key, n))
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)
    await asyncio.sleep(0.05)  # both threads are in: one computes, the other waits
    return JsonResponse({"started": key})


_TASKS: set[Any] = set()


def outlive_sync(request: Any) -> JsonResponse:
    """The WSGI twin: threads given the request's context, still running after it ends."""
    v = request.GET["v"]
    perrequest.set("marker", v)
    key = f"outlive-{v}"

    for n in range(2):
        threading.Thread(target=contextvars.copy_context().run, args=(_late, v, key, n)).start()
    time.sleep(0.05)
    return JsonResponse({"started": key})


def executor_probe(request: Any) -> JsonResponse:
    """What the server's pooled threads hold outside any copied context (never a store)."""

    def raw() -> str:
        return repr(_current.get())

    async def in_loop() -> list[str]:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(None, raw) for _ in range(4)]

    return JsonResponse({"found": async_to_sync(in_loop)()})


def raising_view(request: Any) -> HttpResponse:
    perrequest.set("marker", request.GET.get("v"))
    raise KeyError("handled by process_exception")


def server_error(request: Any) -> HttpResponse:
    return JsonResponse(
        {"in_scope": perrequest.in_request_scope(), "marker": perrequest.get("marker")}, status=500
    )


def cached(request: Any) -> HttpResponse:
    """Cached whole by the site cache: later requests never reach the view."""
    v = request.GET["v"]
    count(f"cached-{v}")
    perrequest.set("marker", v)
    return JsonResponse({"seen": perrequest.get("marker"), "memo": who()})


@etag(lambda request: '"fixed"')
def tagged(request: Any) -> HttpResponse:
    perrequest.set("marker", request.GET.get("v"))
    return HttpResponse(f"tagged {who()}")


def user(request: Any) -> JsonResponse:
    """Sessions and auth touch the database lazily, inside the view."""
    perrequest.set("marker", request.GET["v"])
    request.session["v"] = request.GET["v"]
    return JsonResponse(
        {
            "authenticated": request.user.is_authenticated,
            "memo": who(),
            "session": request.session["v"],
        }
    )


def file(request: Any) -> FileResponse:
    perrequest.set("marker", request.GET.get("v"))
    # A real file (sendfile through file_wrapper), deleted by the response's close().
    body = tempfile.TemporaryFile()  # noqa: SIM115
    body.write(b"f" * 300_000)
    body.seek(0)
    return FileResponse(body)


class _Reader:
    """A file-like object whose ``read`` is app code: it runs while the server sends."""

    def __init__(self, v: str) -> None:
        self.v, self.left = v, 5

    def read(self, size: int = -1) -> bytes:
        if self.left == 0:
            return b""
        self.left -= 1
        EVENTS["cleanups"].append(
            {
                "v": self.v,
                "where": "read",
                "in_scope": perrequest.in_request_scope(),
                "marker": perrequest.get("marker"),
                "memo": who(),
            }
        )
        return b"r" * 1000

    def close(self) -> None:
        _cleanup(self.v, True, "file close")


def file_custom(request: Any) -> FileResponse:
    perrequest.set("marker", request.GET["v"])
    return FileResponse(_Reader(request.GET["v"]))


def unique(request: Any) -> HttpResponse:
    """A near-unique key per request, memoized: nothing of it may outlive the request."""
    v = request.GET["v"]
    return HttpResponse(str(len(big(v)) + len(big(v + "-b"))))


def live(request: Any) -> JsonResponse:
    if request.GET.get("gc"):
        gc.collect()
    own = 1 if perrequest.in_request_scope() else 0
    report = {k: v for k, v in EVENTS.items() if not k.startswith("_")}
    if request.GET.get("clear"):
        for key in ("cleanups", "finished"):
            EVENTS[key] = []
    return JsonResponse(
        {
            "live": live_scopes() - own,
            "pid": os.getpid(),
            "rss": psutil.Process().memory_info().rss,
            "threads": threading.active_count(),
            **report,
        }
    )


def stream_bad_cookie(request: Any) -> StreamingHttpResponse:
    """A cookie that Django's ASGI handler cannot encode: it fails before the body."""
    v = request.GET["v"]
    perrequest.set("marker", v)
    big(v)

    def body() -> Iterator[bytes]:
        yield b"never"

    response = StreamingHttpResponse(body())
    response.set_cookie("name", "\u65e5\u672c")
    return response
