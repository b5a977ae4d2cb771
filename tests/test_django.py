"""perrequest.django.RequestScopeMiddleware under Django's test Client and AsyncClient."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import pickle
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import django_project
import pytest
from watchers import writing_on_close

django_project.setup()

from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.core.signals import request_finished  # noqa: E402
from django.http import FileResponse, HttpResponse, StreamingHttpResponse  # noqa: E402
from django.test import (  # noqa: E402
    AsyncClient,
    AsyncRequestFactory,
    Client,
    RequestFactory,
    override_settings,
)
from django_project import hooks  # noqa: E402
from django_project import settings as project_settings  # noqa: E402

import perrequest  # noqa: E402
from perrequest import DEFAULT_MAX_ENTRIES, MemoStore, ScopeStats, request_scope  # noqa: E402
from perrequest.django import RequestScopeMiddleware  # noqa: E402
from perrequest.testing import live_scopes  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _project() -> Iterator[None]:
    with django_project.use_settings(project_settings):
        yield


@pytest.fixture(autouse=True)
def closed() -> Iterator[list[ScopeStats]]:
    """The stats the project's ON_CLOSE hook received during the test."""
    hooks.CLOSED.clear()
    yield hooks.CLOSED
    hooks.CLOSED.clear()


def _json(response: Any) -> Any:
    assert response.status_code == 200, response.content
    return json.loads(response.content)


def _lines(chunks: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in b"".join(chunks).splitlines()]


# -- sharing within a request, not across -------------------------------------


def test_sync_view_shares_one_store_with_middleware(closed: list[ScopeStats]) -> None:
    client = Client()
    first, second = _json(client.get("/sync/")), _json(client.get("/sync/"))
    for seen in (first, second):
        assert seen["before"] is None  # a fresh store, nothing from the last request
        assert seen["mw"] == seen["lookup"]  # the middleware's lookup was reused
        assert seen["lookups"] == 1
    assert first["lookup"] != second["lookup"]  # ... but never across requests
    assert not perrequest.in_request_scope()  # the test thread was left clean
    assert [(s.misses, s.hits, s.entries) for s in closed] == [
        (1, 1, 3),
        (1, 1, 3),
    ]  # lookups, memo, marker


async def test_async_view_runs_on_the_loop_and_shares_one_store(
    closed: list[ScopeStats],
) -> None:
    client = AsyncClient()
    first, second = _json(await client.get("/async/")), _json(await client.get("/async/"))
    for seen in (first, second):
        assert seen["before"] is None
        assert seen["mw"] == seen["lookup"]
        assert seen["lookups"] == 1
        assert seen["thread"] == threading.get_ident()  # no sync_to_async hop for the view
    assert first["lookup"] != second["lookup"]
    assert not perrequest.in_request_scope()
    assert len(closed) == 2


def _adapted(caplog: pytest.LogCaptureFixture, middleware: list[str]) -> list[str]:
    caplog.clear()
    with (
        override_settings(DEBUG=True, MIDDLEWARE=middleware),
        caplog.at_level(logging.DEBUG, "django.request"),
    ):
        ASGIHandler()
    return [r.getMessage() for r in caplog.records if "adapted" in r.getMessage()]


def test_process_view_of_a_middleware_listed_above_runs_in_the_store() -> None:
    """docs/frameworks/django.md, "What sees the store": a middleware listed above
    perrequest runs its __call__, process_request and process_response outside the store,
    but Django runs every process_view around the view, inside the innermost layer."""
    from django_project.middleware import hooks_seen

    hooks_seen.clear()
    above = ["django_project.middleware.HooksAbove", *project_settings.MIDDLEWARE]
    with override_settings(MIDDLEWARE=above):
        assert Client().get("/sync/").status_code == 200
    assert hooks_seen == [
        ("process_request", False),
        ("process_view", True),
        ("process_response", False),
    ]


def test_async_chain_is_not_adapted_to_sync(caplog: pytest.LogCaptureFixture) -> None:
    """Under ASGI, Django adapts (and logs) around any middleware that is sync only."""
    assert _adapted(caplog, project_settings.MIDDLEWARE) == []
    control = [*project_settings.MIDDLEWARE, "django_project.middleware.sync_only"]
    assert _adapted(caplog, control) != []


async def test_middleware_is_a_coroutine_function_only_over_async_get_response() -> None:
    from asgiref.sync import iscoroutinefunction

    async def aget_response(request: Any) -> HttpResponse:
        return HttpResponse(str(perrequest.in_request_scope()))

    def get_response(request: Any) -> HttpResponse:
        return HttpResponse(str(perrequest.in_request_scope()))

    amw, mw = RequestScopeMiddleware(aget_response), RequestScopeMiddleware(get_response)
    assert iscoroutinefunction(amw) and not iscoroutinefunction(mw)
    request = RequestFactory().get("/")
    for call in (amw, mw):
        response = call(request)
        response = await response if call is amw else response
        assert response.content == b"True"
        assert live_scopes() == 1  # open until Django closes the response
        response.close()
        assert live_scopes() == 0


async def test_the_asgi_token_trap_that_wrapping_get_response_avoids() -> None:
    """A ContextVar set in process_request cannot be reset in process_response under ASGI."""
    naive = override_settings(MIDDLEWARE=["django_project.middleware.NaiveScopeMiddleware"])
    with naive, pytest.raises(ValueError, match="created in a different Context"):
        await AsyncClient().get("/echo/", {"v": "x"})
    seen = _json(await AsyncClient().get("/echo/", {"v": "x"}))  # perrequest's middleware
    assert seen == {"before": None, "seen": "x", "memo": "x"}


def test_middleware_view_and_template_share_one_lookup(closed: list[ScopeStats]) -> None:
    seen = _json(Client().get("/shared/"))
    assert seen["page"] == f"lookup={seen['lookup']}"
    assert seen["mw"] == seen["lookup"]
    assert seen["lookups"] == 1  # middleware, context processor and view: one real call
    assert (closed[0].misses, closed[0].hits) == (1, 2)


def test_no_sharing_across_requests() -> None:
    client = Client()
    for n in range(5):
        seen = _json(client.get("/echo/", {"v": f"v{n}"}))
        assert seen == {"before": None, "seen": f"v{n}", "memo": f"v{n}"}


# -- streaming -----------------------------------------------------------------


def test_sync_streaming_body_sees_the_views_store(closed: list[ScopeStats]) -> None:
    response = Client().get("/stream/sync/")
    assert response.streaming and not response.is_async
    assert live_scopes() == 1 and not closed  # the body has not run yet: store still open
    lines = _lines(list(response.streaming_content))  # the client closes at the end
    assert len(lines) == 3
    for line in lines:
        assert line == {
            "in_scope": True,
            "marker": response["X-Marker"],
            "lookup": response["X-Lookup"],
            "lookups": 1,
        }
    assert live_scopes() == 0
    assert len(closed) == 1 and closed[0].hits == 4  # the view's lookup plus 3 in the body


async def test_async_streaming_body_sees_the_views_store(closed: list[ScopeStats]) -> None:
    response = await AsyncClient().get("/stream/async/")
    assert response.streaming and response.is_async
    assert live_scopes() == 1
    lines = _lines([chunk async for chunk in response.streaming_content])
    assert len(lines) == 3
    for line in lines:
        assert line["in_scope"] is True
        assert line["marker"] == response["X-Marker"]
        assert line["lookup"] == response["X-Lookup"]
        assert line["lookups"] == 1
    assert live_scopes() == 0
    assert len(closed) == 1


def test_streaming_response_closed_unread_closes_the_store(closed: list[ScopeStats]) -> None:
    response = Client().get("/stream/sync/")
    assert live_scopes() == 1
    response.close()  # what a WSGI server does when the client went away
    assert live_scopes() == 0 and len(closed) == 1


def test_file_response_keeps_sendfile_and_its_scope_ends_as_it_closes(
    closed: list[ScopeStats],
) -> None:
    with Path(__file__).open("rb") as handle:
        mw = RequestScopeMiddleware(lambda request: FileResponse(handle))
        response = mw(RequestFactory().get("/"))
        assert response.file_to_stream is handle  # not wrapped: wsgi.file_wrapper still applies
        assert live_scopes() == 1 and not closed
        response.close()
        assert handle.closed and live_scopes() == 0 and len(closed) == 1


def test_a_complete_response_ends_its_scope_as_django_closes_it(
    closed: list[ScopeStats],
) -> None:
    """The store is open, and active, while Django closes a complete response
    (``request_finished`` receivers, resource closers); a response dropped unclosed (a
    middleware above replaced it) ends its scope as it is freed."""
    finished: list[object] = []

    def receiver(**kwargs: Any) -> None:
        finished.append(perrequest.get("who"))

    def view(request: Any) -> HttpResponse:
        perrequest.set("who", "this request")
        response = HttpResponse("ok")
        response._resource_closers.append(lambda: finished.append(perrequest.get("who")))
        return response

    mw = RequestScopeMiddleware(view)
    response = mw(RequestFactory().get("/"))
    assert live_scopes() == 1 and not closed and not perrequest.in_request_scope()
    request_finished.connect(receiver)
    try:
        response.close()
    finally:
        request_finished.disconnect(receiver)
    assert finished == ["this request", "this request"]
    assert live_scopes() == 0 and len(closed) == 1 and not perrequest.in_request_scope()
    response = mw(RequestFactory().get("/"))
    del response  # never closed
    assert live_scopes() == 0 and len(closed) == 2


def _finished_sees(who: list[object]) -> Any:
    """A ``request_finished`` receiver recording the store's "who" (disconnect it after)."""

    def receiver(**kwargs: Any) -> None:
        who.append(perrequest.get("who"))

    request_finished.connect(receiver)
    return receiver


def test_a_file_response_handed_to_the_servers_file_wrapper_still_closes_in_its_scope(
    closed: list[ScopeStats],
) -> None:
    """Django's WSGI handler gives a server that offers sendfile its file wrapper and keeps
    only ``response.close`` (on the file): a collection before the server closes it freed
    the response, and Django's close (``request_finished``, the file's close) never ran."""

    class Wrapper:
        def __init__(self, file: Any, block_size: int = 8192) -> None:
            self.file = file

        def __iter__(self) -> Iterator[bytes]:
            return iter(lambda: self.file.read(8192), b"")

        def close(self) -> None:
            self.file.close()

    who: list[object] = []
    handle = Path(__file__).open("rb")  # noqa: SIM115 (closed by Django, tested below)

    def view(request: Any) -> FileResponse:
        perrequest.set("who", "this request")
        return FileResponse(handle)

    receiver = _finished_sees(who)
    try:
        handler = WSGIHandler()
        handler.get_response = RequestScopeMiddleware(view)  # type: ignore[method-assign]
        environ = RequestFactory().get("/").environ
        environ["wsgi.file_wrapper"] = Wrapper
        body: Any = handler(environ, lambda status, headers: None)
        assert type(body) is Wrapper
        gc.collect()  # the response is in a reference cycle of Django's own
        assert b"".join(body) == Path(__file__).read_bytes()
        body.close()
    finally:
        request_finished.disconnect(receiver)
    assert handle.closed and who == ["this request"]
    assert live_scopes() == 0 and len(closed) == 1


def test_a_response_object_returned_again_is_tied_to_each_request_alone(
    closed: list[ScopeStats],
) -> None:
    """A view returning one module-level response every time: each request's close wrapped
    the last one's (a chain growing by one per request, a RecursionError after ~500)."""
    shared = HttpResponse("ok")
    seen: list[object] = []

    def view(request: Any) -> HttpResponse:
        perrequest.set("who", request.GET["n"])
        return shared

    receiver = _finished_sees(seen)
    try:
        for n in range(3):
            response = RequestScopeMiddleware(view)(RequestFactory().get("/", {"n": n}))
            assert vars(response)["close"]._hook is None
            response.close()
    finally:
        request_finished.disconnect(receiver)
    assert seen == ["0", "1", "2"] and live_scopes() == 0 and len(closed) == 3


def test_a_page_read_back_from_the_cache_ends_its_scope_as_it_is_dropped(
    closed: list[ScopeStats],
) -> None:
    """A pickled response reads back with its class's close bound to itself: taken for a
    view's hook, it held the response in a cycle, and a 304 above perrequest that dropped
    it left its scope open until a collection."""
    cached = pickle.dumps(
        RequestScopeMiddleware(lambda r: HttpResponse("ok"))(RequestFactory().get("/"))
    )
    gc.collect()
    assert live_scopes() == 0
    gc.disable()
    try:
        response = RequestScopeMiddleware(lambda r: pickle.loads(cached))(RequestFactory().get("/"))
        assert vars(response)["close"]._hook is None and live_scopes() == 1
        del response  # dropped unclosed, as ConditionalGetMiddleware drops it for a 304
        assert live_scopes() == 0
    finally:
        gc.enable()


async def test_an_async_body_the_client_left_keeps_its_scope_for_djangos_close(
    closed: list[ScopeStats],
) -> None:
    """Django 5 closes the response after a disconnect cancels the task reading its async
    body: ``request_finished`` then runs in the request's store (it ran outside it)."""
    seen: list[object] = []
    started = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        started.set()
        await asyncio.sleep(60)
        yield b"never"

    async def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("who", "this request")
        return StreamingHttpResponse(body())

    response = await RequestScopeMiddleware(view)(RequestFactory().get("/"))
    chunks = aiter(response.streaming_content)

    async def read() -> None:
        async for _ in chunks:
            pass

    reading = asyncio.create_task(read())
    await started.wait()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert live_scopes() == 1 and not closed
    receiver = _finished_sees(seen)
    try:
        response.close()
    finally:
        request_finished.disconnect(receiver)
    assert seen == ["this request"] and live_scopes() == 0 and len(closed) == 1


_HOOKED: list[object] = []


_HOOKED: list[object] = []


def _close_hook() -> None:
    """A response's own close, set by a view: picklable, as the site cache needs."""
    _HOOKED.append(perrequest.get("who"))


def test_a_pickled_response_reads_back_closing_as_its_class_does(
    closed: list[ScopeStats],
) -> None:
    """The site cache pickles responses (perrequest listed after UpdateCacheMiddleware):
    the copy read back closes as Django's own, and has no scope to end."""
    hooked = _HOOKED
    hooked.clear()

    def view(request: Any) -> HttpResponse:
        perrequest.set("who", "this request")
        response = HttpResponse("ok")
        if request.GET.get("hook"):
            response.close = _close_hook  # type: ignore[method-assign]
        return response

    mw = RequestScopeMiddleware(view)
    for query in ({}, {"hook": "1"}):
        response = mw(RequestFactory().get("/", query))
        copy = pickle.loads(pickle.dumps(response))
        assert copy.content == b"ok" and live_scopes() == 1
        copy.close()  # Django's close, or the view's hook, outside any scope
        assert copy.closed or hooked == [None]
        assert live_scopes() == 1
        response.close()
        assert live_scopes() == 0
    assert hooked == [None, "this request"] and len(closed) == 2


@pytest.mark.parametrize("is_async", [False, True])
def test_a_dropped_streaming_response_ends_its_scope_when_collected(
    closed: list[ScopeStats], is_async: bool
) -> None:
    """A streaming response a middleware above replaced and never closed: the scope
    ends when the response is collected (Django's content refers back to the
    response, so that takes the collector), and only the scope."""

    def sync_body() -> Iterator[bytes]:
        yield b"x" * 1000

    async def async_body() -> AsyncIterator[bytes]:
        yield b"x" * 1000

    def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("big", b"y" * 1_000_000)
        return StreamingHttpResponse(async_body() if is_async else sync_body())

    response = RequestScopeMiddleware(view)(RequestFactory().get("/"))
    assert live_scopes() == 1
    del response  # a middleware above replaced it, say, and never closed it
    gc.collect()
    assert live_scopes() == 0 and len(closed) == 1


@pytest.mark.parametrize("is_async", [False, True])
def test_a_request_scope_held_across_a_streaming_bodys_yields_stays_its_own(
    closed: list[ScopeStats], is_async: bool
) -> None:
    """A streaming body that opens ``request_scope()`` and yields inside it: each chunk
    is produced with the store active around it, and that used to reset the nested
    scope away after the first chunk, so the block's later chunks read and wrote the
    request's store (a probe, 7 December). As a generator's own ContextVar does without
    perrequest, the nested store stays active for the block, and the request's after."""
    seen: list[tuple[object, object]] = []

    def step(inner: MemoStore, chunk: int) -> bytes:
        seen.append((perrequest.current_store() is inner, perrequest.get("k")))
        perrequest.set("k", "inner")
        return str(chunk).encode()

    def sync_body() -> Iterator[bytes]:
        with request_scope() as inner:
            perrequest.set("k", "inner")
            for chunk in range(3):
                yield step(inner, chunk)
        seen.append(("after", perrequest.get("k")))

    async def async_body() -> AsyncIterator[bytes]:
        async with request_scope() as inner:
            perrequest.set("k", "inner")
            for chunk in range(3):
                yield step(inner, chunk)
        seen.append(("after", perrequest.get("k")))

    def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("k", "outer")
        return StreamingHttpResponse(async_body() if is_async else sync_body())

    response = RequestScopeMiddleware(view)(RequestFactory().get("/"))
    if is_async:

        async def read() -> bytes:
            return b"".join([chunk async for chunk in response.streaming_content])

        body = asyncio.run(read())
    else:
        body = b"".join(response.streaming_content)
    response.close()
    assert body == b"012"
    assert seen == [(True, "inner")] * 3 + [("after", "outer")]
    assert live_scopes() == 0 and len(closed) == 1


def test_a_close_replaced_above_perrequest_leaves_the_body_its_store(
    closed: list[ScopeStats],
) -> None:
    """A middleware above that sets its own ``close`` (without calling the one it
    replaces): the body still sees the store, and holds the scope open until it ends."""
    seen: list[object] = []

    def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("who", "this request")

        def body() -> Iterator[bytes]:
            seen.append(perrequest.get("who"))
            yield b"x"

        return StreamingHttpResponse(body())

    def above(request: Any) -> StreamingHttpResponse:
        response = RequestScopeMiddleware(view)(request)
        response.close = lambda: None  # type: ignore[method-assign]
        return response

    response = above(RequestFactory().get("/"))
    gc.collect()
    assert live_scopes() == 1 and not closed
    assert b"".join(response) == b"x" and seen == ["this request"]
    assert live_scopes() == 0 and len(closed) == 1  # the body ended: nothing holds it


def test_the_generators_cleanup_runs_in_the_scope_when_the_client_leaves() -> None:
    seen: list[object] = []

    def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("who", "this request")

        def body() -> Iterator[bytes]:
            try:
                yield b"first"
                yield b"second"
            finally:
                seen.append(perrequest.get("who"))

        return StreamingHttpResponse(body())

    response = RequestScopeMiddleware(view)(RequestFactory().get("/"))
    assert next(iter(response)) == b"first"
    response.close()  # the server closes it: the client went away
    assert seen == ["this request"] and live_scopes() == 0


def test_listed_twice_the_middleware_opens_one_scope(closed: list[ScopeStats]) -> None:
    stores: list[object] = []

    def view(request: Any) -> HttpResponse:
        stores.append(perrequest.current_store())
        return HttpResponse("ok")

    inner = RequestScopeMiddleware(view)
    outer = RequestScopeMiddleware(
        lambda request: (stores.append(perrequest.current_store()), inner(request))[1]
    )
    outer(RequestFactory().get("/")).close()
    assert len(stores) == 2 and stores[0] is stores[1]
    assert len(closed) == 1 and live_scopes() == 0


def test_an_on_close_path_whose_module_fails_to_import() -> None:
    settings = {"ON_CLOSE": "django_project.broken_hooks.report"}
    with (
        override_settings(PERREQUEST=settings),
        pytest.raises(ImproperlyConfigured, match=r"ON_CLOSE.*cannot be imported.*broken"),
    ):
        RequestScopeMiddleware(lambda request: HttpResponse("ok"))


# -- errors ----------------------------------------------------------------------


def test_view_that_raises_closes_the_store_and_the_500_handler_sees_it(
    closed: list[ScopeStats],
) -> None:
    response = Client(raise_request_exception=False).get("/boom/")
    assert response.status_code == 500
    # handler500 runs inside the middleware stack, still in the view's scope.
    assert response.content == b"500 in_scope=True marker=set-before-boom"
    assert live_scopes() == 0 and len(closed) == 1


@override_settings(DEBUG_PROPAGATE_EXCEPTIONS=True)
def test_exception_through_the_middleware_closes_the_store(closed: list[ScopeStats]) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        Client().get("/boom/")
    assert live_scopes() == 0 and len(closed) == 1
    assert not perrequest.in_request_scope()


async def test_exception_through_the_async_middleware_closes_the_store(
    closed: list[ScopeStats],
) -> None:
    with override_settings(DEBUG_PROPAGATE_EXCEPTIONS=True), pytest.raises(RuntimeError):
        await AsyncClient().get("/boom/")
    assert live_scopes() == 0 and len(closed) == 1
    assert not perrequest.in_request_scope()


async def test_cancelled_request_closes_the_store(closed: list[ScopeStats]) -> None:
    """Under ASGI Django cancels the request's task when the client disconnects."""
    started = asyncio.Event()

    async def slow_view(request: Any) -> HttpResponse:
        perrequest.set("marker", "cancelled")
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("not cancelled")

    mw = RequestScopeMiddleware(slow_view)
    task = asyncio.create_task(mw(RequestFactory().get("/")))
    await started.wait()
    assert live_scopes() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert live_scopes() == 0
    assert len(closed) == 1 and closed[0].entries == 1  # the project's ON_CLOSE ran


def _raise(stats: ScopeStats) -> None:
    raise ValueError("on_close failed")


@pytest.mark.parametrize("ending", ["close", "drop"])
def test_on_close_runs_outside_the_scope_active_where_the_response_ends(ending: str) -> None:
    """A response closed, or dropped unclosed, inside another scope (a test's block, a
    view calling another in-process): ON_CLOSE reads and writes no store, never that
    scope's (as for WSGI, a review of 7 December)."""
    seen: list[Any] = []

    on_close = writing_on_close(seen)

    with override_settings(PERREQUEST={"ON_CLOSE": on_close}):
        mw = RequestScopeMiddleware(lambda request: HttpResponse("ok"))
    response = mw(RequestFactory().get("/"))
    with request_scope():
        if ending == "close":
            response.close()
        else:
            del response
        assert perrequest.get("leaked") is None and perrequest.in_request_scope()
    assert seen == [False, "NoActiveScope"]
    assert live_scopes() == 0


@pytest.mark.parametrize("path", ["/sync/", "/stream/sync/"])
def test_on_close_raising_never_turns_a_200_into_an_error(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with override_settings(PERREQUEST={"ON_CLOSE": _raise}), caplog.at_level(logging.ERROR):
        response = Client().get(path)
        body = b"".join(response.streaming_content) if response.streaming else response.content
    assert response.status_code == 200 and body
    errors = [r for r in caplog.records if r.name == "perrequest" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "on_close failed" in str(errors[0].exc_info[1])


async def test_on_close_raising_under_async_client(caplog: pytest.LogCaptureFixture) -> None:
    with override_settings(PERREQUEST={"ON_CLOSE": _raise}), caplog.at_level(logging.ERROR):
        response = await AsyncClient().get("/async/")
    assert response.status_code == 200
    assert [r.name for r in caplog.records if r.levelno == logging.ERROR] == ["perrequest"]


# -- settings ----------------------------------------------------------------------


def _middleware(**options: Any) -> RequestScopeMiddleware:
    with override_settings(PERREQUEST=options):
        return RequestScopeMiddleware(lambda request: HttpResponse())


async def _async_hook(stats: Any) -> None:
    pass


def _two_argument_hook(stats: Any, extra: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"MAX_ENTRIES": "10"}, r'PERREQUEST\["MAX_ENTRIES"\] must be a positive int or None'),
        ({"MAX_ENTRIES": 2.5}, r'PERREQUEST\["MAX_ENTRIES"\] must be a positive int'),
        ({"MAX_ENTRIES": True}, r'PERREQUEST\["MAX_ENTRIES"\] must be a positive int'),
        ({"MAX_ENTRIES": 0}, r'PERREQUEST\["MAX_ENTRIES"\] must be a positive int'),
        ({"MAX_ENTRIES": -5}, r'PERREQUEST\["MAX_ENTRIES"\] must be a positive int'),
        ({"MAX_ENTIRES": 5}, r"unknown key 'MAX_ENTIRES'.*Did you mean 'MAX_ENTRIES'"),
        ({"on_close": print}, r"unknown key 'on_close'.*Did you mean 'ON_CLOSE'"),
        ({"MAXSIZE": 5}, r"unknown key 'MAXSIZE'.*Did you mean 'MAX_ENTRIES'"),
        ({"max_size": 5}, r"unknown key 'max_size'.*Did you mean 'MAX_ENTRIES'"),
        ({"ON_CLOSE": 42}, r'PERREQUEST\["ON_CLOSE"\] must be a callable.*not int 42'),
        (
            {"ON_CLOSE": "django_project.settings.SECRET_KEY"},
            r'PERREQUEST\["ON_CLOSE"\] must be a callable.*not str .*'
            r"\('django_project.settings.SECRET_KEY' names that object\)$",
        ),
        (
            {"ON_CLOSE": "django_project.hooks.no_such_hook"},
            r"PERREQUEST\[\"ON_CLOSE\"\] is the dotted path 'django_project.hooks.no_such_"
            r"hook', which cannot be imported",
        ),
        (  # the module's own error, not the retry's "No module named" (an audit, 5 Dec)
            {"ON_CLOSE": "django_project.hooks.record_clsoe"},
            r'does not define a "record_clsoe" .*did you mean django_project.hooks.record_close',
        ),
        ({"ON_CLOSE": "no_dots"}, r'PERREQUEST\["ON_CLOSE"\] .*cannot be imported'),
        ({"ON_CLOSE": "django_project"}, r"the module 'django_project', not of a callable"),
        ({"ON_CLOSE": "email.headerregistry"}, r"module 'email.headerregistry', not of a c"),
        ({"ON_CLOSE": _async_hook}, r'PERREQUEST\["ON_CLOSE"\] must be a plain \(sync\)'),
        ({"ON_CLOSE": _two_argument_hook}, r"cannot be called with one argument"),
    ],
)
def test_bad_settings_raise_improperly_configured(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=expected):
        _middleware(**options)


@pytest.mark.parametrize("value", [["MAX_ENTRIES", 10], "MAX_ENTRIES=10"])
def test_perrequest_setting_must_be_a_dict(value: object) -> None:
    with (
        override_settings(PERREQUEST=value),
        pytest.raises(ImproperlyConfigured, match=r"settings\.PERREQUEST must be a dict"),
    ):
        RequestScopeMiddleware(lambda request: HttpResponse())


def test_bad_settings_fail_at_startup() -> None:
    with override_settings(PERREQUEST={"MAX_ENTRIES": "many"}):
        with pytest.raises(ImproperlyConfigured, match="MAX_ENTRIES"):
            WSGIHandler()
        with pytest.raises(ImproperlyConfigured, match="MAX_ENTRIES"):
            ASGIHandler()


def test_settings_defaults_and_valid_values(closed: list[ScopeStats]) -> None:
    with override_settings():
        from django.conf import settings

        del settings.PERREQUEST
        default = RequestScopeMiddleware(lambda request: HttpResponse())
    assert default._options == (DEFAULT_MAX_ENTRIES, None)
    assert _middleware()._options[0] == DEFAULT_MAX_ENTRIES
    assert _middleware(MAX_ENTRIES=None)._options[0] is None
    assert _middleware(ON_CLOSE=None)._options[1] is None
    dotted = _middleware(ON_CLOSE="django_project.hooks.record_close")
    assert dotted._options[1] is hooks.record_close


def test_max_entries_bounds_each_request_store(closed: list[ScopeStats]) -> None:
    def view(request: Any) -> HttpResponse:
        for n in range(5):
            perrequest.set(n, n)
        return HttpResponse(str(perrequest.current_store().max_entries))

    with override_settings(PERREQUEST={"MAX_ENTRIES": 2, "ON_CLOSE": hooks.record_close}):
        mw = RequestScopeMiddleware(view)
    response = mw(RequestFactory().get("/"))
    response.close()
    assert response.content == b"2"
    assert (closed[0].entries, closed[0].evictions) == (2, 3)


def test_a_close_hook_set_on_a_streaming_response_below_still_runs_in_the_scope() -> None:
    """A view or a middleware below (an APM's) sets ``response.close`` on the instance.
    Before: perrequest called the class's close, and the hook never ran."""
    ran: list[object] = []

    def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("who", "this request")
        response = StreamingHttpResponse(iter([b"a", b"b"]))
        original = response.close

        def close() -> None:
            ran.append(perrequest.get("who"))
            original()

        response.close = close  # type: ignore[method-assign]
        return response

    response = RequestScopeMiddleware(view)(RequestFactory().get("/"))
    assert b"".join(response) == b"ab" and live_scopes() == 1
    response.close()
    assert ran == ["this request"] and live_scopes() == 0


def test_gzip_below_the_middleware_still_closes_the_views_generator_in_the_scope() -> None:
    from django.middleware.gzip import GZipMiddleware

    seen: list[object] = []

    def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("who", "this request")

        def body() -> Iterator[bytes]:
            try:
                while True:
                    yield b"x" * 100
            finally:
                seen.append(perrequest.get("who"))

        return StreamingHttpResponse(body())

    mw = RequestScopeMiddleware(GZipMiddleware(view))
    response = mw(RequestFactory().get("/", HTTP_ACCEPT_ENCODING="gzip"))
    assert response["Content-Encoding"] == "gzip"
    chunks = iter(response)
    next(chunks), next(chunks)
    response.close()  # the client went away
    assert seen == ["this request"] and live_scopes() == 0


async def test_an_async_stream_left_suspended_cleans_up_in_its_own_closed_scope() -> None:
    seen: list[object] = []

    async def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("who", "this request")

        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"x"
                    await asyncio.sleep(0)
            finally:
                seen.append(perrequest.get("who"))

        return StreamingHttpResponse(body())

    async def get_response(request: Any) -> Any:
        return await view(request)

    response = await RequestScopeMiddleware(get_response)(RequestFactory().get("/"))
    chunks = response.__aiter__()
    assert await chunks.__anext__() == b"x"
    # The client went away: Django stops iterating, and closes the response from a
    # worker thread. The body is finalized later, here inside another request: its
    # cleanup sees this request's store, closed by then, never the other's.
    await asyncio.to_thread(response.close)
    assert live_scopes() == 0

    async def other_request() -> None:
        async with request_scope():
            perrequest.set("who", "another request")
            await chunks.aclose()  # Django's aclosing() closes only the outer iterator
            for _ in range(5):
                gc.collect()  # the rest is finalized: here, in another request
                await asyncio.sleep(0)

    del response
    await asyncio.create_task(other_request())
    assert seen == [None]


def test_a_streaming_response_class_without_a_raw_iterator_is_still_scoped() -> None:
    class Rows(HttpResponse):
        streaming = True

        def __init__(self, rows: Iterator[bytes]) -> None:
            super().__init__()
            self.streaming_content = rows

    def rows() -> Iterator[bytes]:
        yield str(perrequest.get("who")).encode()

    def view(request: Any) -> HttpResponse:
        perrequest.set("who", "me")
        return Rows(rows())

    response = RequestScopeMiddleware(view)(RequestFactory().get("/"))
    assert list(response.streaming_content) == [b"me"]
    response.close()
    assert live_scopes() == 0


def test_the_integration_keeps_its_body_wrappers_to_itself() -> None:
    """DESIGN.md's layout: an integration's body wrappers live in it; Django's middleware
    does not bring in the WSGI one."""
    import subprocess
    import sys

    code = "import sys, perrequest.django; print('perrequest.wsgi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_a_request_that_memoizes_nothing_makes_no_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Django's middleware opens the request's scope as the ASGI and WSGI ones do: the
    store is made when first needed, sync and async, complete and streaming."""
    made: list[object] = []

    class CountingStore(perrequest.MemoStore):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(perrequest._active, "MemoStore", CountingStore)
    seen: list[bool] = []

    def view(request: Any) -> HttpResponse:
        seen.append(perrequest.in_request_scope())
        return HttpResponse("hi")

    def streaming(request: Any) -> StreamingHttpResponse:
        def chunks() -> Iterator[bytes]:
            seen.append(perrequest.in_request_scope())
            yield b"hi"

        return StreamingHttpResponse(chunks())

    async def async_view(request: Any) -> HttpResponse:
        seen.append(perrequest.in_request_scope())
        return HttpResponse("hi")

    with override_settings(PERREQUEST={"MAX_ENTRIES": 100}):  # no ON_CLOSE: nobody watches
        request = RequestFactory().get("/")
        assert RequestScopeMiddleware(view)(request).content == b"hi"
        response = RequestScopeMiddleware(streaming)(RequestFactory().get("/"))
        assert b"".join(response.streaming_content) == b"hi"
        response.close()
        response = asyncio.run(RequestScopeMiddleware(async_view)(RequestFactory().get("/")))
        assert response.content == b"hi"
        response.close()
        assert seen == [True, True, True] and made == [] and live_scopes() == 0

    @perrequest.request_memo
    def double(n: int) -> int:
        return 2 * n

    def memoizing(request: Any) -> HttpResponse:
        return HttpResponse(str(double(2) + double(2)))

    assert RequestScopeMiddleware(memoizing)(RequestFactory().get("/")).content == b"8"
    assert len(made) == 1 and made[0].closed and live_scopes() == 0  # type: ignore[attr-defined]


def test_an_unsaved_model_argument_is_refused_naming_djangos_reason() -> None:
    """A model without a primary key cannot be hashed: the error says Django's reason (save
    it first), not only "pass a tuple instead of a list"."""
    from django.db import models

    class Product(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "perrequest_unsaved"

    @perrequest.request_memo
    def describe(product: Product) -> str:
        return product.name

    with request_scope():
        with pytest.raises(perrequest.UnhashableArguments) as raised:
            describe(Product(name="new"))
        assert describe(Product(pk=3, name="saved")) == "saved"
    assert "argument 'product' is unhashable (Product: Model instances without primary key" in (
        str(raised.value)
    )


@pytest.mark.parametrize(
    "path",
    [
        "perrequest.asgi.RequestScopeMiddleware",
        "perrequest.wsgi.RequestScopeMiddleware",
        "perrequest.flask.PerRequest",
    ],
)
@pytest.mark.parametrize("client", [Client, AsyncClient], ids=["sync", "async"])
def test_another_integrations_class_in_middleware_names_djangos(path: str, client: Any) -> None:
    """The three integrations' classes share a name. Listed in MIDDLEWARE, the ASGI one
    advised wrapping Django's get_response as an ASGI 2 app, or failed each request with
    "missing 2 required positional arguments" (an audit of 5 December 2026); Flask's
    pointed to the WSGI middleware, as wrong there (an audit of the next evening)."""
    with override_settings(MIDDLEWARE=[path]):
        with pytest.raises(TypeError, match=r"takes one argument, request.*\n?.*MIDDLEWARE"):
            request = client().get("/lookup")
            if asyncio.iscoroutine(request):
                asyncio.run(request)
        with pytest.raises(TypeError) as raised:
            request = client().get("/lookup")
            if asyncio.iscoroutine(request):
                asyncio.run(request)
    assert '"perrequest.django.RequestScopeMiddleware" there instead' in str(raised.value)


@pytest.mark.parametrize(("app", "kind"), [(ASGIHandler, "asgi"), (WSGIHandler, "wsgi")])
def test_the_django_middleware_made_with_an_application_names_the_one_that_wraps_it(
    app: Any, kind: str
) -> None:
    """Made with Django's application instead of listed in MIDDLEWARE: each request failed
    with "takes 2 positional arguments but 4 were given"."""
    with pytest.raises(TypeError, match=rf"is an? {kind.upper()} app: wrap it with "):
        RequestScopeMiddleware(app())
    with pytest.raises(TypeError, match=rf"perrequest\.{kind}\.RequestScopeMiddleware instead"):
        RequestScopeMiddleware(app())


def test_a_get_response_taking_the_request_and_more_is_not_taken_for_an_app() -> None:
    """A view or middleware taking optional arguments after the request: Django's
    get_response, not a WSGI app (a review found the first version refused it)."""

    def view(request: Any, pk: int | None = None) -> HttpResponse:
        return HttpResponse(str(perrequest.in_request_scope()))

    class Extra:
        def __init__(self, get_response: Any) -> None:
            self.get_response = get_response

        def __call__(self, request: Any, extra: object = None) -> Any:
            return self.get_response(request)

    assert RequestScopeMiddleware(view)(RequestFactory().get("/")).content == b"True"
    assert RequestScopeMiddleware(Extra(view))(RequestFactory().get("/")).content == b"True"


def test_manage_py_check_validates_the_setting_when_the_app_is_installed() -> None:
    """Without it a typo in PERREQUEST passed ``manage.py check`` (and migrate, shell,
    a Celery worker) and raised only when Django built the middleware stack."""
    from django.core import checks
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    with override_settings(INSTALLED_APPS=["perrequest.django"]):
        from django.apps import apps

        assert apps.get_app_config("perrequest").name == "perrequest.django"
        with override_settings(PERREQUEST={"MAX_ENTIRES": 5}):
            (error,) = [e for e in checks.run_checks() if e.id.startswith("perrequest")]
            assert error.id == "perrequest.E001" and "Did you mean 'MAX_ENTRIES'" in error.msg
            assert error.msg.count("settings.PERREQUEST") == 1  # said once, not as a prefix too
            with pytest.raises(SystemCheckError, match=r"perrequest\.E001"):
                call_command("check")
        with override_settings(PERREQUEST={"MAX_ENTRIES": 5}):
            assert not [e for e in checks.run_checks() if e.id.startswith("perrequest")]


def test_the_settings_check_reports_what_reading_an_odd_setting_raised() -> None:
    """A check must report, not raise: a Mapping whose iteration raises is E001 too."""
    from collections.abc import Mapping

    from perrequest.django.apps import check_settings

    class Odd(Mapping[str, object]):
        def __getitem__(self, key: str) -> object:
            raise KeyError(key)

        def __iter__(self) -> Any:
            raise RuntimeError("cannot iterate")

        def __len__(self) -> int:
            return 1

    with override_settings(PERREQUEST=Odd()):
        (error,) = check_settings()
    assert error.id == "perrequest.E001" and "RuntimeError('cannot iterate')" in error.msg


async def test_request_meta_stays_plain_values_under_asgi() -> None:
    """Code pickles ``request.META`` or logs it as JSON (a task queue, an error reporter).
    Under ASGI it is a dict of plain values, and the middleware's cell there (the store
    in it, and an ``ON_CLOSE`` function) broke both (an audit of 5 December 2026): the
    cell is on the request now, where a second listing of the middleware still finds it."""
    seen: list[Any] = []

    async def view(request: Any) -> HttpResponse:
        perrequest.get_or_set("k", lambda: 1)  # the store made
        seen.append(
            pickle.loads(pickle.dumps(request.META)) == json.loads(json.dumps(request.META))
        )
        return HttpResponse()

    with override_settings(PERREQUEST={"ON_CLOSE": hooks.record_close}):
        outer = RequestScopeMiddleware(RequestScopeMiddleware(view))  # listed twice
        await outer(AsyncRequestFactory().get("/"))
    assert seen == [True] and live_scopes() == 0
    assert len(hooks.CLOSED) == 1  # one scope: the inner listing found the outer's
    hooks.CLOSED.clear()
