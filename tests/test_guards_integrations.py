"""Guards of the Django middleware (django) and the Celery integration (celery) that no other
test needed: each test here fails with its guard deleted (a block-deletion mutation pass,
5 December 2026)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

import django_project
import pytest
from celery import Celery
from celery.signals import task_postrun, task_prerun

django_project.setup()

from django.http import HttpResponse, StreamingHttpResponse  # noqa: E402
from django.test import RequestFactory  # noqa: E402
from django_project import settings as project_settings  # noqa: E402

import perrequest  # noqa: E402
from perrequest import request_scope  # noqa: E402
from perrequest._active import _current  # noqa: E402
from perrequest.celery import ScopedTask, _open_jobs, install  # noqa: E402
from perrequest.django import RequestScopeMiddleware  # noqa: E402
from perrequest.testing import live_scopes  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _project() -> Iterator[None]:
    with django_project.use_settings(project_settings):
        yield


class Boom(Exception):
    pass


# -- django ----------------------------------------------------------------------


def test_a_sync_body_that_raises_ends_its_scope_unclosed() -> None:
    """django._produce: a sync streaming body that raises ends the scope at once, and the
    error reaches the server. Django's ASGI handler never closes a response whose body
    failed, so nothing else would end it. Unguarded, the error is swallowed (the last
    chunk is sent again) and the scope stays open."""

    def body() -> Iterator[bytes]:
        yield b"first"
        raise Boom

    response = RequestScopeMiddleware(lambda request: StreamingHttpResponse(body()))(
        RequestFactory().get("/")
    )
    chunks = iter(response.streaming_content)
    assert next(chunks) == b"first"
    with pytest.raises(Boom):
        next(chunks)
    assert live_scopes() == 0  # not closed by anyone


async def test_an_async_body_that_raises_ends_its_scope_unclosed() -> None:
    """django._produce_async: the async twin; the error goes on, the scope ends unclosed."""

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        raise Boom

    async def get_response(request: Any) -> StreamingHttpResponse:
        return StreamingHttpResponse(body())

    response = await RequestScopeMiddleware(get_response)(RequestFactory().get("/"))
    chunks = aiter(response.streaming_content)
    assert await anext(chunks) == b"first"
    with pytest.raises(Boom):
        await anext(chunks)
    assert live_scopes() == 0


def test_a_streaming_response_that_cannot_be_wrapped_ends_its_scope() -> None:
    """django._tie_to_response: a response that says it streams but has no content to wrap
    (a class of a project's own) raises, and the scope it would have held ends at once.
    Unguarded, the scope stays open as long as anything holds the response (here, the
    traceback)."""

    class Broken(HttpResponse):
        streaming = True

    with pytest.raises(AttributeError, match="streaming_content") as raised:
        RequestScopeMiddleware(lambda request: Broken())(RequestFactory().get("/"))
    assert live_scopes() == 0  # at once: the traceback still holds the response
    assert isinstance(raised.value.__traceback__, TracebackType)


def test_the_server_thread_sees_no_store_once_a_streaming_response_is_returned() -> None:
    """django.RequestScopeMiddleware.__call__: the scope of a streaming response stays open
    until it is closed, but the thread that called the middleware is put back as it was.
    Unguarded, the server's code (and the next request on the thread) runs in it."""

    def body() -> Iterator[bytes]:
        yield str(perrequest.get("who")).encode()

    def view(request: Any) -> StreamingHttpResponse:
        perrequest.set("who", "this request")
        return StreamingHttpResponse(body())

    response = RequestScopeMiddleware(view)(RequestFactory().get("/"))
    assert not perrequest.in_request_scope() and live_scopes() == 1
    assert list(response.streaming_content) == [b"this request"]
    response.close()
    assert live_scopes() == 0


async def test_the_loop_sees_no_store_once_a_streaming_response_is_returned() -> None:
    """django.RequestScopeMiddleware._acall: the async twin; the awaiting code (Django's
    ASGI handler, which then sends the body) is put back as it was."""

    async def body() -> AsyncIterator[bytes]:
        yield str(perrequest.get("who")).encode()

    async def get_response(request: Any) -> StreamingHttpResponse:
        perrequest.set("who", "this request")
        return StreamingHttpResponse(body())

    response = await RequestScopeMiddleware(get_response)(RequestFactory().get("/"))
    assert not perrequest.in_request_scope() and live_scopes() == 1
    assert [chunk async for chunk in response.streaming_content] == [b"this request"]
    response.close()
    assert live_scopes() == 0


def test_the_server_thread_sees_no_store_between_chunks() -> None:
    """django._produce: each chunk is made with the store active, and the thread is put
    back as it was before the chunk is handed over. Unguarded, the server's code between
    chunks runs in the request's scope."""

    def body() -> Iterator[bytes]:
        yield b"one"
        yield b"two"

    response = RequestScopeMiddleware(lambda request: StreamingHttpResponse(body()))(
        RequestFactory().get("/")
    )
    chunks = iter(response.streaming_content)
    assert next(chunks) == b"one"
    assert not perrequest.in_request_scope()
    assert next(chunks) == b"two"
    assert not perrequest.in_request_scope()
    response.close()
    assert live_scopes() == 0


async def test_the_loop_sees_no_store_between_chunks() -> None:
    """django._produce_async: the async twin; an async body's chunks are made in the
    consumer's own context (Django's ASGI handler's), put back as it was after each."""

    async def body() -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"

    async def get_response(request: Any) -> StreamingHttpResponse:
        return StreamingHttpResponse(body())

    response = await RequestScopeMiddleware(get_response)(RequestFactory().get("/"))
    chunks = aiter(response.streaming_content)
    assert await anext(chunks) == b"one"
    assert not perrequest.in_request_scope()
    assert await anext(chunks) == b"two"
    assert not perrequest.in_request_scope()
    response.close()
    assert live_scopes() == 0


def test_closing_a_streaming_response_leaves_nothing_set_in_the_thread() -> None:
    """django._closing: the response's own close runs with the store active, and the thread
    is put back as it was. Unguarded, the closed scope's cell stays set in the server's
    worker thread (DESIGN.md: the ContextVar is never left set there)."""

    def body() -> Iterator[bytes]:
        yield b"x"

    response = RequestScopeMiddleware(lambda request: StreamingHttpResponse(body()))(
        RequestFactory().get("/")
    )
    assert list(response.streaming_content) == [b"x"]
    response.close()
    assert _current.get() is None and live_scopes() == 0


def test_a_get_response_whose_signature_cannot_be_read_is_taken() -> None:
    """django._check_get_response: only what is surely a WSGI or ASGI application is
    refused; a callable whose signature cannot be read (a C extension's) is taken as
    Django's get_response. Unguarded, making the middleware fails on an unbound name."""

    class Compiled:
        __call__ = staticmethod(min)  # no signature to read, like a compiled callable

    RequestScopeMiddleware(Compiled())


async def test_an_async_body_closed_early_cleans_up_in_its_own_scope() -> None:
    """django._produce_async: a body closed before its end (a middleware above stops
    iterating and closes what it iterated) is closed at once, with its request's store
    active. Unguarded, the body is left to the loop's finalizer, which runs its cleanup in
    whatever context dropped it: here, another request's, whose store it then reads."""
    seen: list[object] = []

    class Rows(HttpResponse):  # a streaming class of a project's own, as in test_django
        streaming = True
        is_async = True

        def __init__(self, rows: AsyncIterator[bytes]) -> None:
            super().__init__()
            self.streaming_content = rows

    async def rows() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x"
                await asyncio.sleep(0)
        finally:
            seen.append(perrequest.get("who"))

    async def get_response(request: Any) -> HttpResponse:
        perrequest.set("who", "this request")
        return Rows(rows())

    response = await RequestScopeMiddleware(get_response)(RequestFactory().get("/"))
    body = response.streaming_content
    assert await anext(body) == b"x"
    async with request_scope():
        perrequest.set("who", "another request")
        await body.aclose()
        assert perrequest.get("who") == "another request"  # put back as it was
        for _ in range(5):
            await asyncio.sleep(0)
    response.close()
    assert seen == ["this request"] and live_scopes() == 0


# -- celery ----------------------------------------------------------------------


def test_an_async_on_close_made_a_staticmethod_is_refused_with_the_class() -> None:
    """celery._check_task_class: ``perrequest_on_close`` declared a ``staticmethod`` is
    checked as the function it holds. Unguarded, the staticmethod object hides that the
    function is async: the class is made, and each run's on_close returns a coroutine
    nothing awaits."""
    with pytest.raises(TypeError, match="perrequest_on_close must be a plain"):

        class Task(ScopedTask):
            @staticmethod
            async def perrequest_on_close(stats: perrequest.ScopeStats) -> None:
                pass


def test_a_task_of_an_app_without_install_runs_quietly_beside_an_installed_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """celery._open_job_scope: the signal handlers see every app's tasks; an app that
    install() was not called on is left alone. Unguarded, each of its runs makes the
    handler raise, which Celery logs as an error."""
    install(Celery("guards_installed", broker="memory://"))
    other = Celery("guards_not_installed", broker="memory://")

    @other.task(lazy=False, name="guards.not_installed_job")
    def job() -> bool:
        return perrequest.in_request_scope()

    with caplog.at_level(logging.ERROR):
        assert job.apply().get() is False
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert live_scopes() == 0


def test_a_worker_run_cut_short_is_closed_as_the_next_run_starts() -> None:
    """celery._drop_leftovers: a run whose task_postrun never came, or whose scope opened
    but was never recorded (an exception a signal handler raised, the soft time limit's:
    Celery logs it and goes on), is closed as the next worker run starts, with any scope
    its body left open, and install()'s stack of open runs is emptied. Unguarded, they
    stay open below every later run (or on that stack), for the life of the worker. The
    signals are sent as Celery's tracer sends them around a worker's run."""
    app = Celery("guards_leftovers", broker="memory://")
    install(app)

    @app.task(lazy=False, name="guards.leftovers_job")
    def job() -> None:
        pass

    def next_run(task_id: str, left: tuple[str, ...]) -> None:
        task_prerun.send(sender=job, task_id=task_id, task=job, args=(), kwargs={})
        assert live_scopes() == 1 and perrequest.get("left") is None, left
        task_postrun.send(sender=job, task_id=task_id, task=job, args=(), kwargs={}, retval=None)
        assert live_scopes() == 0 and _current.get() is None and _open_jobs.get() == (), left

    task_prerun.send(sender=job, task_id="cut-short", task=job, args=(), kwargs={})
    perrequest.set("left", "by the run cut short")  # its task_postrun never comes
    next_run("next", ("a run",))

    task_prerun.send(sender=job, task_id="cut-short-2", task=job, args=(), kwargs={})
    request_scope().__enter__()  # its body's own scope, left open (a generator kept)
    perrequest.set("left", "by its body")
    next_run("next-2", ("a run", "its body's scope"))

    request_scope().__enter__()  # a scope opened, never recorded nor closed
    perrequest.set("left", "by a scope")
    next_run("next-3", ("a scope",))


def test_an_eager_run_leaves_nothing_on_the_thread() -> None:
    """celery._close_job_scope: a run is taken off install()'s stack of open runs as it
    ends. Unguarded, each apply() (task_always_eager, a test suite, a view calling a task
    in-process) leaves its record in the thread's context, for the life of the thread."""
    app = Celery("guards_eager", broker="memory://")
    install(app)

    @app.task(lazy=False, name="guards.eager_job")
    def job() -> bool:
        return perrequest.in_request_scope()

    for _ in range(3):
        assert job.apply().get() is True
    assert _open_jobs.get() == () and live_scopes() == 0
