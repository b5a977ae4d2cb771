"""The WSGI middleware around plain WSGI apps (no framework), driven as a server would.

``_serve`` does what PEP 3333 asks of a server: call the app, iterate the
body, always call ``close()``. Tests that need something else (no close, a
partial read, another thread) drive the body by hand.
"""

from __future__ import annotations

import abc
import gc
import io
import logging
import threading
import time
import wsgiref.simple_server
import wsgiref.util
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from watchers import writing_on_close

import perrequest
from perrequest import MemoStore, ScopeStats, request_memo, request_scope
from perrequest.scope import _current
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware

StartResponse = Callable[..., Any]


class Boom(Exception):
    pass


def _environ(path: str = "/") -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
    }


def _noting_who(seen: list[Any], chunks: list[Any]) -> Iterator[Any]:
    """The chunks; as it ends (run out, closed or freed), the ``who`` it sees is noted."""
    try:
        yield from chunks
    finally:
        seen.append(perrequest.get("who"))


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    pass


def _serve(app: Callable[..., Iterable[bytes]], path: str = "/") -> bytes:
    body = app(_environ(path), _start_response)
    try:
        return b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


class Recorder:
    """A plain WSGI app with a lazy body that records what each step saw."""

    def __init__(self, body_error: Exception | None = None) -> None:
        self.body_error = body_error
        self.stores: list[MemoStore] = []
        self.seen: list[tuple[str, bool, Any]] = []
        self.computed = 0

        @request_memo
        def lookup(user: str) -> str:
            self.computed += 1
            return f"perms-of-{user}"

        self.lookup = lookup

    def _note(self, step: str) -> None:
        self.seen.append((step, perrequest.in_request_scope(), perrequest.get("step")))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        self.stores.append(perrequest.current_store())
        self._note("call")
        perrequest.set("step", "call")
        self.lookup("alice")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _Body(self)


class _Body:
    """A lazy body with a close(), as a WSGI app may return."""

    def __init__(self, app: Recorder) -> None:
        self.app = app
        self.closed_in_scope: bool | None = None

    def __iter__(self) -> Iterator[bytes]:
        for n in range(3):
            self.app._note(f"chunk{n}")
            if n == 1 and self.app.body_error is not None:
                raise self.app.body_error
            yield self.app.lookup("alice").encode() + b";"

    def close(self) -> None:
        self.closed_in_scope = perrequest.in_request_scope()
        self.app._note("close")


def test_the_store_is_active_during_the_call_and_each_chunk_and_closed_at_close() -> None:
    app = Recorder()
    wrapped = RequestScopeMiddleware(app)
    body: Any = wrapped(_environ(), _start_response)
    store = app.stores[0]
    # As the app returns, the thread gets back what it had (nothing): a server may
    # serve the body from another thread. Each chunk is produced with the store active
    # (app.seen), and between chunks the thread holds nothing again.
    assert not perrequest.in_request_scope() and _current.get() is None
    assert not store.closed and live_scopes() == 1
    chunks = []
    for chunk in body:
        chunks.append(chunk)
        assert _current.get() is None
    assert not store.closed and live_scopes() == 1  # exhausted, but not closed yet
    body.close()
    assert store.closed and len(store) == 0 and live_scopes() == 0
    assert _current.get() is None  # the thread is left as it was found
    assert chunks == [b"perms-of-alice;"] * 3
    assert app.computed == 1  # one lookup, shared by the call and the body
    assert app.seen == [
        ("call", True, None),
        ("chunk0", True, "call"),
        ("chunk1", True, "call"),
        ("chunk2", True, "call"),
        ("close", True, "call"),  # the wrapped body's close() runs inside the scope
    ]


def test_requests_get_separate_stores_even_when_their_bodies_interleave() -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        perrequest.set("rid", environ["PATH_INFO"])
        start_response("200 OK", [])
        return (perrequest.get("rid").encode() for _ in range(3))

    wrapped = RequestScopeMiddleware(app)
    bodies = [wrapped(_environ(f"/{n}"), _start_response) for n in range(3)]
    seen = [[next(body) for body in bodies] for _ in range(3)]
    for body in bodies:
        body.close()
    assert seen == [[b"/0", b"/1", b"/2"]] * 3


def test_bodies_interleaved_in_one_thread_by_a_server_that_iterates_at_once() -> None:
    """A single-threaded server (bjoern-like) calls the app and takes its iterator at
    once, then writes the bodies of several requests chunk by chunk, in one context.
    Each chunk gets its own request's store, and nothing is active between chunks, so no
    chunk ever sees another's store (until 7 December 2026 the first body's store stayed
    active in that context, and the later ones set theirs on top of it)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        perrequest.set("rid", environ["PATH_INFO"])
        start_response("200 OK", [])
        return (perrequest.get("rid").encode() for _ in range(3))

    wrapped = RequestScopeMiddleware(app)
    bodies: list[Any] = []
    chunks: list[Iterator[bytes]] = []
    for n in range(3):
        bodies.append(wrapped(_environ(f"/{n}"), _start_response))
        chunks.append(iter(bodies[-1]))
    seen = [[next(it) for it in chunks] for _ in range(3)]
    for body in reversed(bodies):
        body.close()
    assert seen == [[b"/0", b"/1", b"/2"]] * 3
    assert _current.get() is None and live_scopes() == 0


def test_an_interleaving_server_shows_no_request_store_to_code_outside_the_middleware() -> None:
    """bjoern, uWSGI --async: one thread, one context, requests interleaved between body
    chunks. An app mounted beside the wrapped one (or an outer layer) runs while a wrapped
    request's body is half sent: it must find no store. Until 7 December 2026 the first
    chunk made its store active in the thread until close(), and that code read and wrote
    it (docs/security.md had it as a limit)."""

    def wrapped_app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        perrequest.set("secret", environ["PATH_INFO"])
        start_response("200 OK", [])
        return (perrequest.get("secret").encode() for _ in range(2))

    seen: list[Any] = []

    def beside(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        seen.append((perrequest.in_request_scope(), perrequest.get("secret"), _current.get()))
        start_response("200 OK", [])
        return [b"beside"]

    wrapped = RequestScopeMiddleware(wrapped_app)
    body: Any = wrapped(_environ("/alice"), _start_response)
    chunks = iter(body)
    assert next(chunks) == b"/alice"  # half sent; the server turns to another request
    assert beside(_environ("/other"), _start_response) == [b"beside"]
    assert next(chunks) == b"/alice"
    with pytest.raises(StopIteration):
        next(chunks)
    body.close()
    assert seen == [(False, None, None)]
    assert live_scopes() == 0


@pytest.mark.parametrize("ending", ["close", "drop"])
def test_on_close_runs_outside_the_scope_active_where_the_body_ends(ending: str) -> None:
    """A response closed, or dropped unclosed, inside another scope (a test's block, a
    request calling a wrapped app in-process): on_close reads and writes no store, never
    that scope's (a review, 7 December: it ran with the outer block's store active)."""
    seen: list[Any] = []

    on_close = writing_on_close(seen)

    wrapped = RequestScopeMiddleware(Recorder(), on_close=on_close)
    body: Any = wrapped(_environ(), _start_response)
    assert list(body) == [b"perms-of-alice;"] * 3
    with perrequest.request_scope():
        if ending == "close":
            body.close()
        else:
            del body
        assert perrequest.get("leaked") is None and perrequest.in_request_scope()
    assert seen == [False, "NoActiveScope"]
    assert live_scopes() == 0


def test_a_body_that_is_its_own_iterator_is_freed_in_its_scope_at_close() -> None:
    """``map(...)`` over a generator: the body has no close(), and its iterator is itself.
    close() dropped only the iterator reference, so the generator's ``finally`` ran later,
    wherever the server dropped the body: inside another request's scope (a review)."""
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        perrequest.set("who", "alice")
        start_response("200 OK", [])

        return map(bytes.upper, _noting_who(seen, [b"a", b"b"]))

    body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
    assert next(body) == b"A"
    body.close()
    with perrequest.request_scope():
        perrequest.set("who", "bob")
        del body
        assert perrequest.get("who") == "bob"
    assert seen == ["alice"]


def test_a_list_body_without_close_is_closed_by_the_wrapper() -> None:
    stores: list[MemoStore] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        stores.append(perrequest.current_store())
        start_response("200 OK", [])
        return [b"a", b"b"]

    assert _serve(RequestScopeMiddleware(app)) == b"ab"
    assert stores[0].closed


def test_a_server_file_wrapper_is_passed_through_and_its_scope_ends_at_once() -> None:
    """The server keeps its own file wrapper (and sendfile). Reading a file runs none of
    the app's code, so the scope ends as the app returns, as for a list; the file's
    close() later runs outside any scope, never in another request's."""
    stores: list[MemoStore] = []
    seen_at_close: list[object] = []

    class File(io.BytesIO):
        def close(self) -> None:
            seen_at_close.append(perrequest.in_request_scope())
            super().close()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        stores.append(perrequest.current_store())
        perrequest.set("who", "this request")
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](File(b"0123456789"), 4)

    environ = {**_environ(), "wsgi.file_wrapper": wsgiref.util.FileWrapper}
    body: Any = RequestScopeMiddleware(app)(environ, _start_response)
    assert isinstance(body, wsgiref.util.FileWrapper)
    assert stores[0].closed and live_scopes() == 0
    assert b"".join(body) == b"0123456789"
    body.close()
    assert seen_at_close == [False]


def test_a_server_file_wrapper_that_is_a_function_is_passed_through_too() -> None:
    """uWSGI's ``wsgi.file_wrapper`` is a function returning the file itself, meinheld's a
    function too: the body was told by its type only, wrapped, and the server read a 200
    MB file through it line by line instead of sending it (a probe of WSGI servers)."""
    handed: list[object] = []

    def sendfile(file: Any, block_size: int = 8192) -> Any:  # as uWSGI's: the file itself
        handed.append(file)
        return file

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        perrequest.set("who", "this request")
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"0123456789"), 4)  # type: ignore[no-any-return]

    environ = {**_environ(), "wsgi.file_wrapper": sendfile}
    body: Any = RequestScopeMiddleware(app)(environ, _start_response)
    assert body is handed[0] and live_scopes() == 0  # the server's own object, scope ended

    def plain(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"x"]  # the wrapper not called: a list, as ever

    environ = {**_environ(), "wsgi.file_wrapper": sendfile}
    assert RequestScopeMiddleware(plain)(environ, _start_response) == [b"x"]
    assert live_scopes() == 0

    class Wrapper(wsgiref.util.FileWrapper, metaclass=abc.ABCMeta):  # a class all the same
        pass

    environ = {**_environ(), "wsgi.file_wrapper": Wrapper}
    RequestScopeMiddleware(plain)(environ, _start_response)
    assert environ["wsgi.file_wrapper"] is Wrapper  # a server's isinstance() check works


@pytest.mark.parametrize("kind", [list, tuple])
def test_a_list_body_is_passed_through_so_the_server_sees_its_length(kind: type) -> None:
    closed: list[ScopeStats] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        perrequest.set("k", 1)
        start_response("200 OK", [])
        return kind([b"hello"])  # type: ignore[no-any-return]

    body: Any = RequestScopeMiddleware(app, on_close=closed.append)(_environ(), _start_response)
    assert type(body) is kind and len(body) == 1
    assert [s.entries for s in closed] == [1] and live_scopes() == 0


def test_wsgiref_sets_content_length_for_a_one_item_list_body() -> None:
    """Seen through a real server: wsgiref infers Content-Length from len(body)."""

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]

    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, RequestScopeMiddleware(app), handler_class=Quiet
    )
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        response = httpx.get(f"http://127.0.0.1:{server.server_port}/", timeout=10)
        assert response.headers["Content-Length"] == "5" and response.content == b"hello"
    finally:
        thread.join(10)
        server.server_close()
    assert live_scopes() == 0


def test_an_exception_in_the_app_closes_the_store_and_propagates() -> None:
    error = Boom("before the response")
    stores: list[MemoStore] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        stores.append(perrequest.current_store())
        perrequest.set("k", "v")
        raise error

    with pytest.raises(Boom) as info:
        RequestScopeMiddleware(app)(_environ(), _start_response)
    assert info.value is error
    assert stores[0].closed and len(stores[0]) == 0
    assert live_scopes() == 0 and not perrequest.in_request_scope()


def test_a_base_exception_in_the_app_closes_the_store_too() -> None:
    class Stop(BaseException):
        pass

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        raise Stop

    with pytest.raises(Stop):
        RequestScopeMiddleware(app)(_environ(), _start_response)
    assert live_scopes() == 0 and not perrequest.in_request_scope()


def test_an_exception_mid_body_reaches_the_server_and_close_still_closes_the_store() -> None:
    error = Boom("during the body")
    app = Recorder(body_error=error)
    body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
    assert next(body) == b"perms-of-alice;"
    with pytest.raises(Boom) as info:
        next(body)
    assert info.value is error
    # The thread is given back as the chunk fails (a server may keep the error, and the
    # body in its traceback, a long while); the scope stays open until close().
    assert not perrequest.in_request_scope() and _current.get() is None
    assert not app.stores[0].closed  # the server has not closed the response yet
    body.close()
    assert app.stores[0].closed and live_scopes() == 0
    assert not perrequest.in_request_scope()
    assert app.seen[-1] == ("close", True, "call")


def test_a_body_the_server_never_closes_is_closed_when_garbage_collected() -> None:
    closed: list[ScopeStats] = []
    app = Recorder()
    body: Any = RequestScopeMiddleware(app, on_close=closed.append)(_environ(), _start_response)
    next(body)
    store = app.stores[0]
    assert not store.closed and live_scopes() == 1
    del body
    gc.collect()
    assert store.closed and len(store) == 0 and live_scopes() == 0
    assert len(closed) == 1


def test_a_body_never_iterated_nor_closed_is_closed_when_garbage_collected() -> None:
    app = Recorder()
    RequestScopeMiddleware(app)(_environ(), _start_response)  # result dropped at once
    gc.collect()
    assert app.stores[0].closed and live_scopes() == 0


def test_a_pooled_thread_is_left_without_a_store_after_each_request() -> None:
    """The gthread trap, in-process: every step of a request, then a check, on one thread.
    Nothing is left after any step: the store is active while the app runs, while each
    chunk is produced and while the body closes, never between."""
    error_app = RequestScopeMiddleware(Recorder(body_error=Boom("mid-body")))

    def fails(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        raise Boom("in the app")

    body: Any = None

    def call() -> None:
        nonlocal body
        body = error_app(_environ(), _start_response)

    def chunk() -> None:
        next(body)

    def failing_chunk() -> None:
        with pytest.raises(Boom):
            next(body)

    def close() -> None:
        body.close()

    def failing_call() -> None:
        with pytest.raises(Boom):
            RequestScopeMiddleware(fails)(_environ(), _start_response)

    def full_request() -> None:
        _serve(RequestScopeMiddleware(Recorder()))

    steps: list[Callable[[], None]] = [
        call,
        chunk,
        failing_chunk,
        close,
        failing_call,
        full_request,
    ]

    def run(step: Callable[[], None]) -> int:
        step()
        return threading.get_ident()

    def check() -> tuple[int, bool, MemoStore | None]:
        return threading.get_ident(), perrequest.in_request_scope(), _current.get()

    with ThreadPoolExecutor(max_workers=1) as pool:
        for step in steps:
            thread_of_step = pool.submit(run, step).result()
            thread, in_scope, left = pool.submit(check).result()
            assert thread == thread_of_step  # same pooled thread
            assert in_scope is False, f"a store was left active after {step.__name__}"
            # Stricter: not even a closed store is left in the ContextVar.
            assert left is None, f"the ContextVar was left set after {step.__name__}"
    assert live_scopes() == 0


@pytest.mark.parametrize("body", ["list", "generator"])
def test_a_generators_scope_left_suspended_by_the_view_leaves_the_thread_with_the_response(
    body: str,
) -> None:
    """A view that leaves a helper generator suspended inside its own request_scope()
    (kept somewhere, in a reference cycle) left that open scope active in the server's
    thread after the response: the next requests there, and code without the middleware,
    found it (an audit found it)."""
    kept: list[Any] = []

    def helper() -> Iterator[int]:
        with request_scope():
            perrequest.set("secret", "the helper's")
            yield 1
            yield 2

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        generator = helper()
        next(generator)
        kept.append(generator)
        return [b"ok"] if body == "list" else iter([b"o", b"k"])

    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(_serve, RequestScopeMiddleware(app)).result() == b"ok"
        after = pool.submit(lambda: (_current.get(), perrequest.get("secret"))).result()
        assert after == (None, None)
    kept.clear()
    gc.collect()
    assert live_scopes() == 0


def test_an_app_called_in_process_after_a_generators_scope_closed_leaves_the_callers_store() -> (
    None
):
    """The inner middleware dropped the closed scope it found active (the view's helper
    generator's, closed by the collector) instead of what it replaced: the view lost its
    own store for the rest of the request (an audit found it)."""

    def helper() -> Iterator[int]:
        with request_scope():
            yield 1
            yield 2

    def inner(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        perrequest.set("owner", "inner")
        return [b"inner"]

    seen: list[Any] = []

    def outer(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        perrequest.set("owner", "outer")
        generator = helper()
        next(generator)
        cycle: list[Any] = [generator]
        cycle.append(cycle)
        del generator, cycle
        gc.collect()
        seen.append(_serve(RequestScopeMiddleware(inner)))
        seen.append(perrequest.get("owner"))
        start_response("200 OK", [])
        return [b"outer"]

    assert _serve(RequestScopeMiddleware(outer)) == b"outer"
    assert seen == [b"inner", "outer"]
    assert _current.get() is None and live_scopes() == 0


@pytest.mark.parametrize("between", [None, "ClosingIterator"])
def test_a_layer_that_calls_the_app_in_one_thread_and_serves_the_body_from_another(
    between: str | None,
) -> None:
    """An outer layer runs the app in a pool thread, and the server's thread iterates and
    closes the body. The pool thread runs other requests' code meanwhile: it must not find
    the request's store (it did when the store stayed active from the call to close()).
    With werkzeug's ClosingIterator between, iter() is called on the body in the pool
    thread as it is wrapped: the store was made active there (a probe, 7 December), kept
    after close(), and the chunks, served here, saw none."""
    from werkzeug.wsgi import ClosingIterator

    app = Recorder()
    wrapped = RequestScopeMiddleware(app)

    def layer(environ: dict[str, Any], start_response: StartResponse) -> Any:
        body = wrapped(environ, start_response)
        return body if between is None else ClosingIterator(body, [lambda: None])

    with ThreadPoolExecutor(max_workers=1) as pool:
        body: Any = pool.submit(layer, _environ(), _start_response).result()
        store = app.stores[0]
        # Another request's code on the pool thread, outside any perrequest middleware.
        seen = pool.submit(lambda: (perrequest.in_request_scope(), _current.get())).result()
        assert seen == (False, None)
        with pytest.raises(perrequest.NoActiveScope):
            pool.submit(perrequest.set, "step", "another request's").result()
        assert list(body) == [b"perms-of-alice;"] * 3  # served here, with the store active
        assert _current.get() is None  # around each chunk only
        body.close()
        assert store.closed and _current.get() is None and live_scopes() == 0
        assert pool.submit(_current.get).result() is None
    assert app.computed == 1
    assert [step for step, in_scope, _ in app.seen if not in_scope] == []


def test_dropping_the_iterator_after_close_does_not_close_the_body_again() -> None:
    """The server's iterator is a generator around the body's: closed or collected after
    close(), it must not close the body's own iterator (a body that is its own iterator,
    whose close() runs callbacks) a second time, outside the scope (``yield from`` would)."""
    closes: list[bool] = []

    class Body:
        def __init__(self) -> None:
            self.sent = 0

        def __iter__(self) -> Body:
            return self

        def __next__(self) -> bytes:
            self.sent += 1
            if self.sent > 3:
                raise StopIteration
            return b"x"

        def close(self) -> None:
            closes.append(perrequest.in_request_scope())

    def app(environ: dict[str, Any], start_response: StartResponse) -> Body:
        start_response("200 OK", [])
        return Body()

    body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
    chunks = iter(body)
    assert next(chunks) == b"x"
    body.close()
    chunks.close()
    del chunks
    gc.collect()
    assert closes == [True] and live_scopes() == 0


async def test_asgirefs_wsgi_to_asgi_which_never_closes_the_body_serves_chunks_in_scope() -> None:
    """asgiref's WsgiToAsgi loops ``for chunk in app(...)`` and never calls ``close()``
    (against PEP 3333). The server's iterator holds the body, so its chunks see the
    request's store; the scope closes as the loop drops the iterator, and the app's own
    close hook never runs (it would not have without perrequest)."""
    from asgiref.wsgi import WsgiToAsgi

    seen: list[object] = []
    closes: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            seen.append(perrequest.get("k"))
            yield b"a"
            seen.append(perrequest.get("k"))
            yield b"b"

        def close(self) -> None:
            closes.append(True)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Body:
        perrequest.set("k", environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    transport = httpx.ASGITransport(app=WsgiToAsgi(RequestScopeMiddleware(app)))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/one")
    gc.collect()
    assert response.text == "ab" and seen == ["/one", "/one"]
    assert closes == [] and live_scopes() == 0


def _holding_a_scope(seen: list[tuple[object, ...]]) -> Callable[..., Iterator[bytes]]:
    """An app whose body holds a ``request_scope()`` of its own across three yields,
    noting in ``seen`` what each chunk, its ``finally`` and the code after the block see."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        perrequest.set("k", "outer")
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            with request_scope() as inner:
                perrequest.set("k", "inner")
                try:
                    for _ in range(3):
                        seen.append((perrequest.current_store() is inner, perrequest.get("k")))
                        yield b"x"
                finally:
                    seen.append(
                        ("finally", perrequest.current_store() is inner, perrequest.get("k"))
                    )
            seen.append(("after", perrequest.get("k")))

        return body()

    return app


def test_a_request_scope_held_across_yields_of_a_body_served_chunk_by_chunk_stays_its_own() -> None:
    """Iterated where another scope is active, each chunk is produced with the request's
    store set around it; a ``request_scope()`` the body holds across its yields used to be
    reset away after the first chunk, and the block then wrote the request's store."""
    seen: list[tuple[object, ...]] = []
    with request_scope() as server_side:  # what is active where the body is iterated
        body: Any = RequestScopeMiddleware(_holding_a_scope(seen))(_environ(), _start_response)
        assert b"".join(body) == b"xxx"
        body.close()
        assert perrequest.current_store() is server_side and "k" not in server_side
    assert seen == [(True, "inner")] * 3 + [("finally", True, "inner"), ("after", "outer")]
    assert live_scopes() == 0


def test_a_body_closed_early_cleans_up_inside_the_request_scope_it_holds_open() -> None:
    """A client leaves mid-stream: the server closes a body suspended inside its own
    ``with request_scope():``. Its ``finally`` (inside the block) sees the block's store,
    as a plain generator's ContextVar would; close() used to set the request's store over
    it, and the block's cleanup read and wrote the request's store (a probe, 7 December)."""
    seen: list[tuple[object, ...]] = []
    body: Any = RequestScopeMiddleware(_holding_a_scope(seen))(_environ(), _start_response)
    chunks = iter(body)
    assert next(chunks) == b"x"
    body.close()
    assert seen == [(True, "inner"), ("finally", True, "inner")]  # the block's, not the request's
    assert live_scopes() == 0 and _current.get() is None


def test_a_body_that_raises_on_a_server_that_never_closes_it_leaves_nothing_active() -> None:
    """uvicorn's WSGI interface and asgiref's WsgiToAsgi drop a body that raised without
    calling close(), and keep the error a while. The iterator's frame, in the error's
    traceback, held the body, so its scope ended later, elsewhere, and the thread kept
    the request's open store (a review of 7 December caught that regression)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            raise ValueError("boom")
            yield b"never"  # a generator

        return body()

    body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
    kept = None
    try:
        for _ in body:
            pass
    except ValueError as exc:
        kept = exc
    del body  # dropped unclosed; the error lives on (an error reporter holds it)
    assert _current.get() is None and live_scopes() == 0
    assert kept is not None

    class Unstartable:  # its __iter__ raises: the error's traceback holds the ScopedBody
        def __iter__(self) -> Iterator[bytes]:
            raise ValueError("no body")

    def unstartable(environ: dict[str, Any], start_response: StartResponse) -> Unstartable:
        start_response("200 OK", [])
        return Unstartable()

    body = RequestScopeMiddleware(unstartable)(_environ(), _start_response)
    try:
        for _ in body:
            pass
    except ValueError as exc:
        kept = exc
    del body
    assert _current.get() is None  # the thread as it was, though the body lives on
    del kept
    gc.collect()
    assert live_scopes() == 0


@pytest.mark.parametrize("drive", ["wrapped", "next"])
def test_a_failing_chunk_gives_the_thread_back_though_the_error_keeps_the_body(
    drive: str,
) -> None:
    """A chunk raises, the server never closes the body, the error is kept (a reporter)
    and its traceback holds the body: through a wrapper's frame (sentry_sdk's WSGI
    middleware iterates the body so), or ScopedBody.__next__'s own. The thread must
    not keep the request's store meanwhile: the next request there would see it (a
    review, 7 December). The scope itself ends when the body is freed."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        perrequest.set("who", "failed request")
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            yield b"a"
            raise RuntimeError("chunk 2 fails")

        return body()

    def reporter(body: Any) -> Iterator[bytes]:  # its frame holds the body
        for chunk in body:  # noqa: UP028
            yield chunk

    body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
    kept = None
    try:
        if drive == "next":
            while True:
                next(body)
        else:
            for _ in reporter(body):
                pass
    except RuntimeError as exc:
        kept = exc
    del body
    assert _current.get() is None and perrequest.get("who") is None
    assert kept is not None
    del kept
    gc.collect()
    assert live_scopes() == 0


def test_a_body_freed_during_a_later_request_leaves_that_requests_store_alone() -> None:
    """A layer that breaks PEP 3333: it stops iterating on its own error, keeps the error
    (its traceback holds the body) and never calls close(). The next request in the
    thread frees it mid-way, by reference counting: the body's scope ended then, and
    its token unset the running request's store (a probe, 7 December)."""
    kept: list[Any] = []
    seen: list[tuple[object, bool]] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        perrequest.set("who", environ["PATH_INFO"])
        start_response("200 OK", [])
        if environ["PATH_INFO"] == "/two":
            kept.clear()  # frees request one's body, now
            seen.append((perrequest.get("who"), perrequest.in_request_scope()))
            perrequest.set("after", 1)  # raised NoActiveScope

        def body() -> Iterator[bytes]:
            yield b"a"
            yield b"b"

        return body()

    def serve(path: str, leave: bool) -> None:
        body: Any = RequestScopeMiddleware(app)(_environ(path), _start_response)
        try:
            for _ in body:
                if leave:
                    raise ConnectionResetError("the layer's own error")
        except ConnectionResetError as exc:
            kept.append(exc)  # its traceback holds this frame, and the body
            return
        body.close()

    serve("/one", leave=True)
    serve("/two", leave=False)
    assert seen == [("/two", True)]
    forget = perrequest.get("who")  # what the thread has now: no store, or a closed one
    assert forget is None and not perrequest.in_request_scope()
    assert live_scopes() == 0


def test_chunks_pulled_by_next_after_a_failed_one_see_their_own_store() -> None:
    """A caller that goes on calling next() on a body after a chunk raised (no server
    does; a test might) gets each later chunk with its own request's store around it,
    never what the thread has then (another request's, a review found, 7 December)."""
    seen: list[tuple[str, object]] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Any:
        name = environ["PATH_INFO"]
        perrequest.set("who", name)
        start_response("200 OK", [])

        class Flaky:
            sent = 0

            def __iter__(self) -> Any:
                return self

            def __next__(self) -> bytes:
                self.sent += 1
                seen.append((name, perrequest.get("who")))
                if self.sent == 2:
                    raise RuntimeError("flaky")
                if self.sent > 3:
                    raise StopIteration
                return b"x"

        return Flaky()

    wrapped = RequestScopeMiddleware(app)
    first: Any = wrapped(_environ("/r1"), _start_response)
    assert next(first) == b"x"
    with pytest.raises(RuntimeError):
        next(first)
    second: Any = wrapped(_environ("/r2"), _start_response)
    assert next(second) == b"x"  # produced with r2's store, then the thread given back
    assert next(first) == b"x"
    first.close()
    second.close()
    assert [who for name, who in seen if name == "/r1"] == ["/r1"] * 3
    assert live_scopes() == 0 and _current.get() is None


def test_a_closed_scope_left_in_the_thread_is_not_carried_through_the_next_request() -> None:
    """A generator that kept a request_scope() open across its yields, closed from elsewhere,
    leaves a closed store active in the server's thread. It means no scope; the next request
    drops it, instead of giving it back after (and every later request taking the per-chunk
    path because a scope seemed active)."""
    with request_scope() as left:
        pass
    assert left.closed

    def leave_it() -> None:
        _current.set(left)

    def serve() -> tuple[bytes, Any]:
        return _serve(RequestScopeMiddleware(Recorder())), _current.get()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(leave_it).result()
        body, after = pool.submit(serve).result()
    assert body == b"perms-of-alice;" * 3
    assert after is None
    assert live_scopes() == 0


def test_an_outer_scope_is_restored_around_the_call_and_each_chunk() -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        assert perrequest.get("who") is None  # a fresh store, not the outer one
        start_response("200 OK", [])
        yield b"x"

    with request_scope() as outer:
        perrequest.set("who", "outer")
        body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
        assert perrequest.current_store() is outer
        assert list(body) == [b"x"]
        assert perrequest.current_store() is outer
        body.close()
        assert perrequest.current_store() is outer and perrequest.get("who") == "outer"


def test_concurrent_requests_in_threads_never_see_each_other() -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        rid = environ["PATH_INFO"]
        before = perrequest.get("rid")
        perrequest.set("rid", rid)
        start_response("200 OK", [])
        for _ in range(3):
            threading.Event().wait(0.0005)
            yield f"{before}|{perrequest.get('rid')};".encode()

    wrapped = RequestScopeMiddleware(app)
    paths = [f"/{n}" for n in range(400)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        bodies = list(pool.map(lambda p: _serve(wrapped, p), paths))
    cross_talk = sum(
        body != f"None|{p};".encode() * 3 for p, body in zip(paths, bodies, strict=True)
    )
    assert cross_talk == 0


# -- options ----------------------------------------------------------------------------


def _hello(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", [])
    return [b"hello"]


@pytest.mark.parametrize(
    ("args", "options", "error"),
    [
        ((None,), {}, TypeError),
        (("myapp:app",), {}, TypeError),
        ((_hello,), {"max_entries": "10"}, TypeError),
        ((_hello,), {"max_entries": 2.5}, TypeError),
        ((_hello,), {"max_entries": True}, TypeError),
        ((_hello,), {"max_entries": 0}, ValueError),
        ((_hello,), {"max_entries": -1}, ValueError),
        ((_hello,), {"on_close": 42}, TypeError),
        ((_hello,), {"max_entry": 10}, TypeError),
        ((_hello,), {"scope_types": ("http",)}, TypeError),  # an ASGI option
        ((_hello, 10), {}, TypeError),  # options are keyword-only
    ],
)
def test_bad_options_fail_at_construction(
    args: tuple[Any, ...], options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        RequestScopeMiddleware(*args, **options)


def test_the_message_for_a_non_callable_app_says_what_is_expected() -> None:
    with pytest.raises(TypeError, match="wraps a WSGI app"):
        RequestScopeMiddleware("myapp:app")  # type: ignore[arg-type]


@pytest.mark.parametrize("bound", [None, 2])
def test_max_entries_bounds_each_store(bound: int | None) -> None:
    closed: list[ScopeStats] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        assert perrequest.current_store().max_entries == bound
        for n in range(5):
            perrequest.set(n, n)
        start_response("200 OK", [])
        return [str(len(perrequest.current_store())).encode()]

    assert _serve(RequestScopeMiddleware(app, max_entries=bound, on_close=closed.append)) == (
        b"5" if bound is None else b"2"
    )
    assert closed[0].evictions == (0 if bound is None else 3)


# -- observability ----------------------------------------------------------------------


def test_on_close_is_called_once_with_the_stats_after_the_store_is_cleared() -> None:
    calls: list[tuple[ScopeStats, bool]] = []

    def on_close(stats: ScopeStats) -> None:
        calls.append((stats, perrequest.in_request_scope()))

    app = Recorder()
    body: Any = RequestScopeMiddleware(app, on_close=on_close)(_environ(), _start_response)
    assert list(body) == [b"perms-of-alice;"] * 3
    assert calls == []  # not before the server closes the response
    body.close()
    body.close()  # a second close (or the GC fallback later) changes nothing
    del body
    gc.collect()
    [(stats, in_scope)] = calls
    assert (stats.misses, stats.hits, stats.entries) == (1, 3, 2)  # lookup miss + 3 hits; "step"
    assert stats.duration_s >= 0 and in_scope is False
    assert app.stores[0].closed


def test_on_close_raising_is_logged_and_the_response_is_unharmed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def on_close(stats: ScopeStats) -> None:
        raise Boom("metrics backend down")

    caplog.set_level(logging.ERROR, logger="perrequest")
    wrapped = RequestScopeMiddleware(Recorder(), on_close=on_close)
    assert _serve(wrapped) == b"perms-of-alice;" * 3  # close() did not raise
    [record] = [r for r in caplog.records if r.name == "perrequest"]
    assert record.levelno == logging.ERROR and "on_close" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is Boom


def test_on_close_raising_never_replaces_the_apps_own_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        raise Boom("the app's error")

    def on_close(stats: ScopeStats) -> None:
        raise ValueError("on_close's error")

    with pytest.raises(Boom, match="the app's error"):
        RequestScopeMiddleware(app, on_close=on_close)(_environ(), _start_response)
    assert any(r.levelno == logging.ERROR and r.name == "perrequest" for r in caplog.records)


def test_each_closed_scope_is_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="perrequest")
    wrapped = RequestScopeMiddleware(Recorder())
    for _ in range(3):
        _serve(wrapped)
    records = [r for r in caplog.records if r.name == "perrequest"]
    assert [r.levelno for r in records] == [logging.DEBUG] * 3
    assert all("request scope closed" in r.getMessage() for r in records)
    assert "misses=1" in records[0].getMessage()


# -- a real PEP 3333 server --------------------------------------------------------------


def test_wsgiref_server_streams_inside_the_store_and_closes_it() -> None:
    closed: list[ScopeStats] = []
    app = Recorder()
    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, RequestScopeMiddleware(app, on_close=closed.append)
    )
    server.RequestHandlerClass.log_message = lambda *args: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        response = httpx.get(f"http://127.0.0.1:{server.server_port}/", timeout=10)
    finally:
        thread.join(10)
        server.server_close()
    assert response.text == "perms-of-alice;" * 3
    assert [step for step, in_scope, _ in app.seen if in_scope] == [
        "call",
        "chunk0",
        "chunk1",
        "chunk2",
        "close",
    ]
    assert len(closed) == 1 and app.stores[0].closed


def test_a_body_holding_a_scope_of_its_own_leaves_nothing_in_the_server_thread() -> None:
    """A body generator that keeps a ``request_scope()`` open across its yields, served by
    wsgiref, which runs every request in one thread. The client leaves mid-body: the
    server closes the body, the generator's scope closes from a context where it is not
    the active one, so it cannot reset itself. The thread must still be left with
    nothing: the next request, to an app without the middleware, finds the variable
    unset, not a closed store."""

    class Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    def streaming(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        with request_scope():
            for _ in range(400):
                yield b"x" * 65536

    def raw(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [repr(_current.get()).encode()]

    wrapped = RequestScopeMiddleware(streaming)

    def dispatch(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return (raw if environ["PATH_INFO"] == "/raw" else wrapped)(environ, start_response)

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, dispatch, handler_class=Quiet)
    thread = threading.Thread(target=lambda: [server.handle_request() for _ in range(2)])
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        with httpx.stream("GET", f"{url}/stream", timeout=10) as response:
            for _ in response.iter_bytes():
                break  # leave with most of the 25 MB body unread
        assert httpx.get(f"{url}/raw", timeout=10).text == "None"
    finally:
        thread.join(10)
        server.server_close()
    assert live_scopes() == 0


def test_wrapped_twice_one_scope_serves_the_request() -> None:
    computed: list[int] = []

    @request_memo
    def lookup(x: int) -> int:
        computed.append(x)
        return x

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        lookup(1)
        start_response("200 OK", [])
        yield str(lookup(1)).encode()

    closed: list[ScopeStats] = []
    twice = RequestScopeMiddleware(RequestScopeMiddleware(app), on_close=closed.append)
    for _ in range(2):
        body: Any = twice(_environ(), _start_response)
        assert b"".join(body) == b"1"
        body.close()
    assert computed == [1, 1] and [s.hits for s in closed] == [1, 1]
    assert live_scopes() == 0


def test_a_layer_closing_an_earlier_response_during_a_later_request_leaves_that_one_alone() -> None:
    """A ``yield from`` layer over request 1's body, dropped during request 2 in the same
    thread: its finalizer closes request 1's iterator, which closes request 1's response;
    that close reset request 1's token there, and request 2 lost its store (a review of
    the day's change, 7 December 2026)."""
    held: dict[str, Any] = {}
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        if environ["n"] == 2:
            perrequest.set("mine", 2)
            held.pop("first")  # request 1's response, dropped unclosed
            seen.append(perrequest.get("mine"))
        return iter([b"x", b"y"])

    inner = RequestScopeMiddleware(app)

    def layer(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        yield from inner(environ, start_response)

    first = layer({**_environ(), "n": 1}, _start_response)
    next(iter(first))  # its first chunk, produced in its scope (the layer's generator)
    held["first"] = first
    del first
    second: Any = inner({**_environ(), "n": 2}, _start_response)
    assert list(second) == [b"x", b"y"]
    second.close()
    assert seen == [2] and live_scopes() == 0
    assert _current.get() is None  # not request 1's closed scope: the thread as it was


# -- a body's own context (Context.run): the edges a review found, 7 December 2026 ----------


def test_an_error_kept_after_a_failed_chunk_holds_nothing_of_the_body() -> None:
    """A chunk fails in C code (``map`` over the app's generator), the server keeps the
    error (an error reporter, Twisted's Failure) and drops the body unclosed. The error's
    traceback holds ``__next__``'s frame: had it held the app's iterator, the generator's
    cleanup would run when the error is dropped, later, inside another request's scope."""
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        perrequest.set("who", "request A")
        return map(str.encode, _noting_who(seen, ["a", 1]))  # str.encode(1) raises, in C

    body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
    assert next(body) == b"a"
    with pytest.raises(TypeError) as kept:
        next(body)
    del body  # unclosed: its scope ends, and its generator is freed, in its own context
    assert seen == [None] and live_scopes() == 0
    with request_scope() as store:
        store["who"] = "request B"
        del kept  # the error, dropped inside another request
    assert seen == [None]


class _SlowBody:
    """An app body with a ``close()`` of its own (a file stream, a cursor)."""

    def __init__(self, log: list[Any], pause: threading.Event | None = None) -> None:
        self.log, self.pause, self.n = log, pause, 0

    def __iter__(self) -> _SlowBody:
        self.log.append(("iter", perrequest.get("who")))
        return self

    def __next__(self) -> bytes:
        self.n += 1
        if self.n > 2:
            raise StopIteration
        if self.pause is not None:
            self.pause.wait(5)
        return b"x"

    def close(self) -> None:
        self.log.append(("close", perrequest.get("who")))


def _slow_app(body: _SlowBody) -> RequestScopeMiddleware:
    def app(environ: dict[str, Any], start_response: StartResponse) -> _SlowBody:
        start_response("200 OK", [])
        perrequest.set("who", "request A")
        return body

    return RequestScopeMiddleware(app)


def test_a_body_closed_while_another_thread_produces_a_chunk_closes_in_its_scope() -> None:
    """Tornado's WSGIContainer, shutting down, closes the body in the loop thread while an
    executor thread produces a chunk: the body's context is entered there, and cannot be
    entered twice. The app's close() still runs, with the store; next() then stops."""
    log: list[Any] = []
    pause = threading.Event()
    body: Any = _slow_app(_SlowBody(log, pause))(_environ(), _start_response)
    with ThreadPoolExecutor(max_workers=1) as pool:
        chunk = pool.submit(next, body)
        time.sleep(0.05)  # the chunk is being produced
        body.close()
        pause.set()
        assert chunk.result() == b"x"
    assert log == [("iter", "request A"), ("close", "request A")]
    with pytest.raises(StopIteration):
        next(body)
    assert live_scopes() == 0


def test_a_body_closed_from_inside_its_own_chunk_closes_in_its_scope() -> None:
    """A server's write() (PEP 3333's legacy write callable, called from a chunk) gives up
    on a gone client by closing the response it is serving."""
    log: list[Any] = []
    holder: dict[str, Any] = {}

    class Writing(_SlowBody):
        def __next__(self) -> bytes:
            holder["body"].close()
            return super().__next__()

    body: Any = _slow_app(Writing(log))(_environ(), _start_response)
    holder["body"] = body
    assert next(body) == b"x"
    assert log == [("iter", "request A"), ("close", "request A")] and live_scopes() == 0


def test_a_body_whose_close_raises_is_still_freed_in_its_context() -> None:
    seen: list[Any] = []

    def gone() -> None:  # (a method's frame, in the error, would hold the body itself)
        raise OSError("the socket is gone")

    class Failing:
        close = staticmethod(gone)

        def __init__(self) -> None:
            self.rows = _noting_who(seen, [b"a", b"b"])

        def __iter__(self) -> Iterator[bytes]:
            return self.rows

    def app(environ: dict[str, Any], start_response: StartResponse) -> Failing:
        start_response("200 OK", [])
        perrequest.set("who", "request A")
        return Failing()

    body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
    assert next(body) == b"a"
    with pytest.raises(OSError, match="socket is gone"):
        body.close()
    assert seen == ["request A"] and live_scopes() == 0


def test_a_closed_body_keeps_nothing_of_its_context() -> None:
    """A server may hold a closed body (a keep-alive connection's last response): what the
    app's context held (an outer layer's per-request object) is freed as it closes."""
    import contextvars
    import weakref

    outer: contextvars.ContextVar[Any] = contextvars.ContextVar("outer_layer")

    class PerRequestObject:
        pass

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        return iter([b"a"])

    wrapped = RequestScopeMiddleware(app)
    made = PerRequestObject()
    alive = weakref.ref(made)
    token = outer.set(made)  # an outer layer's, around the app call only
    try:
        body: Any = wrapped(_environ(), _start_response)
    finally:
        outer.reset(token)
    del made
    assert list(body) == [b"a"]
    body.close()
    assert alive() is None and live_scopes() == 0


def test_a_scoped_body_made_by_hand_produces_its_chunks_in_its_scope() -> None:
    """ScopedBody is public: made where its scope is not active (after the middleware's
    reset), its chunks and its body's ``__iter__`` still see the request's store."""
    from perrequest._active import open_request
    from perrequest.wsgi import ScopedBody

    log: list[Any] = []
    cell, token = open_request((10, None))
    perrequest.set("who", "request A")
    _current.reset(token)
    body = ScopedBody(_SlowBody(log), cell)
    assert list(body) == [b"x", b"x"]
    body.close()
    assert log == [("iter", "request A"), ("close", "request A")] and live_scopes() == 0


def test_a_token_the_app_sets_its_body_resets_in_the_servers_thread() -> None:
    """The app sets a context variable as it runs and its body resets it in its last chunk
    (Flask 3.0's stream_with_context, OpenTelemetry's WSGI middleware inside perrequest's).
    With the body in a context of its own (tried on 7 December 2026), the reset failed
    ("created in a different Context") and the value stayed in the server's thread."""
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("app_var", default="unset")

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        token = var.set("set by the request")
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            try:
                yield var.get().encode()
            finally:
                var.reset(token)

        return body()

    wrapped = RequestScopeMiddleware(app)
    for _ in range(2):
        body: Any = wrapped(_environ(), _start_response)
        assert list(body) == [b"set by the request"]
        body.close()
        assert (var.get(), _current.get()) == ("unset", None)
    assert live_scopes() == 0


def test_opentelemetrys_wsgi_middleware_inside_detaches_its_context(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RequestScopeMiddleware(OpenTelemetryMiddleware(app)): OpenTelemetry attaches the
    request's trace context as the app is called and detaches it after the last chunk.
    That detach failed ("Failed to detach context"), and the next request on the worker
    thread ran under the previous one's remote parent span."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        return (chunk for chunk in [b"a", b"b"])

    wrapped = RequestScopeMiddleware(OpenTelemetryMiddleware(app))
    environ = _environ()
    environ["HTTP_TRACEPARENT"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with caplog.at_level(logging.ERROR):
        body: Any = wrapped(environ, _start_response)
        assert list(body) == [b"a", b"b"]
        body.close()
    assert "detach" not in caplog.text
    assert trace.get_current_span().get_span_context().span_id == 0  # nothing left here
    assert live_scopes() == 0
