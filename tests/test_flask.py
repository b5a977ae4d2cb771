"""The Flask extension: Flask's test client in-process, then real gunicorn (sync and gthread).

The apps live in ``flask_apps`` so gunicorn can import them; a gunicorn
worker is another process, so the served tests read its state at ``/_live``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flask_apps
import httpx
import pytest
from flask import Blueprint, Flask, Response, g, stream_with_context
from flask_apps import TEARDOWNS, Boom, create_app
from servers import serve_gunicorn
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client, create_environ

import perrequest
from perrequest import ScopeStats
from perrequest._active import _current
from perrequest.flask import PerRequest
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware

pytestmark = pytest.mark.timeout(60)


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def _teardown_of(teardowns: Any, marker: str) -> dict[str, Any]:
    [seen] = [t for t in teardowns if t["marker"] == marker]
    return seen  # type: ignore[no-any-return]


# -- Flask's test client --------------------------------------------------------------


@pytest.fixture
def client() -> Any:
    return create_app().test_client()


def test_before_request_view_helper_and_teardown_share_one_store(client: Any) -> None:
    with client.get("/shared") as response:
        seen = response.get_json()
        assert response.headers["X-After-Lookup"] == seen["view_lookup"]  # after_request
    assert seen["before"] is None
    assert seen["before_lookup"] == seen["view_lookup"] == seen["helper_lookup"]
    assert seen["lookups"] == 1  # one memoized computation for the whole request
    teardown = _teardown_of(TEARDOWNS, seen["marker"])
    assert teardown["in_scope"] and teardown["path"] == "/shared"
    assert teardown["lookup"] == seen["view_lookup"] and teardown["lookups"] == 1


def test_requests_never_share_a_store(client: Any) -> None:
    seen = []
    for _ in range(3):
        with client.get("/shared") as response:
            seen.append(response.get_json())
    assert [s["before"] for s in seen] == [None, None, None]
    assert len({s["marker"] for s in seen}) == 3
    assert len({s["view_lookup"] for s in seen}) == 3
    assert [s["lookups"] for s in seen] == [1, 1, 1]


def test_test_code_is_outside_the_requests_scope_which_stays_open_until_close(
    client: Any,
) -> None:
    """The test client is the server: the response's scope is open until it is closed
    (docs/frameworks/flask.md, "In tests"), but test code after ``client.get()`` is
    outside it, as a server's own code is. Until 7 December 2026 the store stayed active
    in the test's thread until close(), and a later ``with request_scope():`` block was
    ended by closing the earlier response."""
    first = client.get("/shared")
    assert not perrequest.in_request_scope() and _current.get() is None
    assert live_scopes() == 1  # open until closed
    with perrequest.request_scope():
        perrequest.set("mine", 1)
        second = client.get("/shared")
        assert second.get_json()["before"] is None  # a fresh store, not the block's
        first.close()
        assert perrequest.get("mine") == 1  # the block's scope survives the close
    second.close()
    assert not perrequest.in_request_scope() and live_scopes() == 0
    with client.get("/shared"):
        pass
    assert not perrequest.in_request_scope()


def test_stream_with_context_sees_the_store_until_the_server_closes_it(client: Any) -> None:
    response = client.get("/stream?x=42")
    marker = response.headers["X-Marker"]
    teardowns_at_return = len([t for t in TEARDOWNS if t["marker"] == marker])
    lines = _lines(response.get_data(as_text=True))
    assert live_scopes() == 1  # body consumed, response not closed yet: the store lives
    response.close()
    assert live_scopes() == 0
    token = response.headers["X-Lookup"]
    assert lines[:3] == [
        {
            "n": n,
            "in_scope": True,
            "marker": marker,
            "lookup": token,
            "lookups": 1,
            "has_app_context": True,
        }
        for n in range(3)
    ]
    assert lines[3] == {"g_before_lookup": token, "arg": "42"}
    # Flask 3.1 runs teardown_request when the view returns and again when a
    # stream_with_context body ends: both times inside the store.
    teardowns = [t for t in TEARDOWNS if t["marker"] == marker]
    assert (teardowns_at_return, len(teardowns)) == (1, 2)
    for teardown in teardowns:
        assert teardown["in_scope"] and teardown["lookup"] == token and teardown["lookups"] == 1


def test_bare_generator_sees_the_store_but_not_flask_contexts(client: Any) -> None:
    with client.get("/stream-bare") as response:
        lines = _lines(response.get_data(as_text=True))
        marker, token = response.headers["X-Marker"], response.headers["X-Lookup"]
    assert len(lines) == 3
    for line in lines:
        assert line["in_scope"] and line["marker"] == marker
        assert line["lookup"] == token and line["lookups"] == 1
        assert line["has_app_context"] is False  # Flask tore its contexts down already


def test_a_view_that_raises_gets_its_500_handler_in_scope_and_closes_the_store(
    client: Any,
) -> None:
    with client.get("/boom") as response:
        assert response.status_code == 500
        assert response.get_data(as_text=True) == "500 in_scope=True marker_set=True"
    [teardown] = [t for t in TEARDOWNS if t["path"] == "/boom"][-1:]
    assert teardown["in_scope"] and teardown["exc"] == "Boom" and teardown["lookups"] == 1
    assert live_scopes() == 0


def test_an_exception_propagating_out_of_flask_closes_the_store() -> None:
    closed: list[ScopeStats] = []
    app = create_app(PerRequest(on_close=closed.append))
    app.testing = True  # PROPAGATE_EXCEPTIONS: Flask re-raises instead of answering 500
    with pytest.raises(Boom):
        app.test_client().get("/boom")
    assert len(closed) == 1 and closed[0].misses == 1
    assert live_scopes() == 0 and not perrequest.in_request_scope()


def test_per_request_app_and_init_app_both_register_and_pass_options() -> None:
    closed: list[ScopeStats] = []
    direct = Flask("direct")
    ext = PerRequest(direct, max_entries=7, on_close=closed.append)
    factory_ext = PerRequest(max_entries=9)
    factory = create_app(factory_ext)
    for app, extension, bound in ((direct, ext, 7), (factory, factory_ext, 9)):
        assert app.extensions["perrequest"] is extension
        assert isinstance(app.wsgi_app, RequestScopeMiddleware)
        assert extension.max_entries == bound

    @direct.get("/")
    def index() -> str:
        perrequest.get_or_set("a", lambda: 1)
        perrequest.get_or_set("a", lambda: 2)
        return str(perrequest.current_store().max_entries)

    for _ in range(2):
        with direct.test_client().get("/") as response:
            assert response.get_data(as_text=True) == "7"
    assert [(s.hits, s.misses, s.entries) for s in closed] == [(1, 1, 1), (1, 1, 1)]
    with factory.test_client().get("/shared") as response:
        assert response.get_json()["max_entries"] == 9


def test_one_extension_serves_several_apps() -> None:
    ext = PerRequest()
    apps = [create_app(ext), create_app(ext)]
    for app in apps:
        assert app.extensions["perrequest"] is ext
        with app.test_client().get("/shared") as response:
            assert response.get_json()["lookups"] == 1


def test_registering_twice_on_one_app_is_refused_without_double_wrapping() -> None:
    app = Flask("twice")
    ext = PerRequest(app)
    middleware = app.wsgi_app
    with pytest.raises(RuntimeError, match="already registered"):
        ext.init_app(app)
    with pytest.raises(RuntimeError, match="already registered"):
        PerRequest(app)
    assert app.wsgi_app is middleware and app.extensions["perrequest"] is ext
    assert not isinstance(middleware.app, RequestScopeMiddleware)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_entry": 10}, TypeError),
        ({"on_closed": print}, TypeError),
        ({"max_entries": "10"}, TypeError),
        ({"max_entries": 1.5}, TypeError),
        ({"max_entries": True}, TypeError),
        ({"max_entries": 0}, ValueError),
        ({"max_entries": -3}, ValueError),
        ({"on_close": "myapp.report"}, TypeError),
    ],
)
def test_bad_options_fail_when_the_extension_is_created(
    options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        PerRequest(**options)
    app = Flask("untouched")
    wsgi_app = app.wsgi_app
    with pytest.raises(error):
        PerRequest(app, **options)
    assert app.wsgi_app == wsgi_app and "perrequest" not in app.extensions


def test_init_app_refuses_options_and_says_where_they_go() -> None:
    app = Flask("options")
    with pytest.raises(TypeError, match=r"not max_entries=.*PerRequest\(max_entries=\.\.\."):
        PerRequest().init_app(app, max_entries=100)  # type: ignore[arg-type]
    assert "perrequest" not in app.extensions  # nothing half done


def test_init_app_refuses_what_is_not_a_flask_app() -> None:
    with pytest.raises(TypeError, match=r"perrequest\.wsgi\.RequestScopeMiddleware"):
        PerRequest().init_app(flask_apps.raw_app)  # type: ignore[arg-type]
    from starlette.applications import Starlette

    # Before: "for another WSGI app use perrequest.wsgi..." for an ASGI app.
    with pytest.raises(TypeError, match=r"ASGI app .* perrequest\.asgi\.RequestScope"):
        PerRequest(Starlette())  # type: ignore[arg-type]
    # A blueprint was told to use the WSGI middleware, which it is no app for (a probe).
    with pytest.raises(TypeError, match=r"not Blueprint .*the Flask app the blueprint is"):
        PerRequest(Blueprint("reports", __name__))  # type: ignore[arg-type]
    # The class, not an app: told to pass one (a probe, 8 December).
    with pytest.raises(TypeError, match=r"pass one: PerRequest\(Flask\(__name__\)\)"):
        PerRequest(Flask)  # type: ignore[arg-type]


def test_mounted_apps_get_a_store_when_the_dispatcher_itself_is_wrapped() -> None:
    """As the docs advise for DispatcherMiddleware, instead of PerRequest."""
    app = Flask("root")

    @app.get("/")
    def index() -> str:
        return f"root in_scope={perrequest.in_request_scope()}"

    mounted = DispatcherMiddleware(app, {"/raw": flask_apps.raw_app})
    for wrapped, expected in ((mounted, False), (RequestScopeMiddleware(mounted), True)):
        client = Client(wrapped)
        with client.get("/raw/") as response:
            assert response.get_json()["in_scope"] is expected
        with client.get("/") as response:
            assert response.get_data(as_text=True) == f"root in_scope={expected}"


def test_another_apps_body_dropped_unclosed_inside_a_view_never_writes_the_views_store() -> None:
    """A view calls another wrapped WSGI app (its own request, its own scope), reads a
    chunk and drops the response unclosed, against PEP 3333. Python then closes that
    app's generator where it is freed, in the view's context: its cleanup must find no
    store, never the view's."""

    def other(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        perrequest.set("who", "other")
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            for _ in range(100):
                yield b"row\n"
        finally:
            seen.append((perrequest.in_request_scope(), perrequest.get("who")))
            if perrequest.in_request_scope():
                perrequest.set("cleanup", "other's")

    seen: list[tuple[bool, Any]] = []
    app = Flask("caller")
    PerRequest(app)

    @app.get("/")
    def view() -> dict[str, Any]:
        perrequest.set("who", "view")
        response = Client(RequestScopeMiddleware(other)).get("/", buffered=False)
        first = next(iter(response.response))
        del response  # unclosed: the other request's cleanup runs now, here
        return {"first": first.decode(), "cleanup": perrequest.get("cleanup")}

    with app.test_client().get("/") as response:
        assert response.get_json() == {"first": "row\n", "cleanup": None}
    assert seen == [(False, None)]
    assert live_scopes() == 0


def _check_async_echo(seen: dict[str, Any], rid: str) -> None:
    """One request of ``/async/echo``: its own store across the hook's event loop and the
    view's, the hook's values hit in the view, and each computation made once."""
    assert seen["before"] is None and seen["seen"] == rid and seen["same_store"]
    early_profile, early_name = seen["early"]
    assert early_profile.startswith(f"{rid}:1:") and early_name == f"{rid}:1"
    assert seen["again"] == [early_profile, early_profile]  # hits, on another loop
    assert seen["new"][0] == seen["new"][1] and seen["new"][0].startswith(f"{rid}:2:")
    assert seen["loaded"] == [f"{rid}:1", f"{rid}:2", f"{rid}:3"]
    assert seen["profiles"] == 2 and seen["batches"] == 2  # [1] in the hook, [2, 3]


def test_async_hooks_and_views_share_the_requests_store_across_their_loops(
    client: Any,
) -> None:
    for rid in ("a", "b", "c"):
        with client.get("/async/echo", query_string={"rid": rid}) as response:
            assert response.status_code == 200, response.text
            _check_async_echo(response.get_json(), rid)
    assert live_scopes() == 0


def test_flask_g_is_gone_in_a_bare_generator_and_the_store_is_not() -> None:
    """What the docs claim about flask.g against perrequest, checked."""
    app = Flask("g_vs_store")
    PerRequest(app)

    def body(wrap: bool) -> Iterator[str]:
        yield f"store={perrequest.get('user')};"
        try:
            yield f"g={g.user}"
        except RuntimeError as error:
            yield "g=" + ("outside app context" if "application context" in str(error) else "?")

    @app.get("/<mode>")
    def view(mode: str) -> Response:
        g.user = perrequest.get_or_set("user", lambda: "alice")
        gen = body(mode == "wrapped")
        return Response(stream_with_context(gen) if mode == "wrapped" else gen)

    client = app.test_client()
    with client.get("/bare") as response:
        assert response.get_data(as_text=True) == "store=alice;g=outside app context"
    with client.get("/wrapped") as response:
        assert response.get_data(as_text=True) == "store=alice;g=alice"


# -- real gunicorn ----------------------------------------------------------------------

WORKERS = {"sync": ("sync", 1), "gthread": ("gthread", 4)}


@pytest.fixture(scope="module", params=list(WORKERS))
def base(request: pytest.FixtureRequest) -> Iterator[str]:
    worker_class, threads = WORKERS[request.param]
    with serve_gunicorn("flask_apps:dispatch", worker_class=worker_class, threads=threads) as url:
        yield url


def _get(url: str, **params: Any) -> Any:
    response = httpx.get(url, params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_for(base: str, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        live: dict[str, Any] = _get(f"{base}/_live")
        if done(live):
            return live
        assert time.monotonic() < deadline, f"{what}: {live}"
        time.sleep(0.05)


def test_served_one_store_per_request_shared_by_every_hook(base: str) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:  # keep-alive: same connection
        seen = [client.get("/shared").json() for _ in range(4)]
    for s in seen:
        assert s["before"] is None and s["lookups"] == 1
        assert s["before_lookup"] == s["view_lookup"] == s["helper_lookup"]
    assert len({s["view_lookup"] for s in seen}) == 4
    live = _wait_for(base, lambda live: live["live"] == 0, "stores left open")
    for s in seen:
        teardown = _teardown_of(live["teardowns"], s["marker"])
        assert teardown["in_scope"] and teardown["lookup"] == s["view_lookup"]


@pytest.mark.parametrize("path", ["/stream", "/stream-bare"])
def test_served_streaming_body_sees_the_store(base: str, path: str) -> None:
    response = httpx.get(f"{base}{path}", timeout=30)
    assert response.status_code == 200
    lines = _lines(response.text)[:3]
    assert [line["n"] for line in lines] == [0, 1, 2]
    for line in lines:
        assert line["in_scope"] and line["marker"] == response.headers["X-Marker"]
        assert line["lookup"] == response.headers["X-Lookup"] and line["lookups"] == 1
    _wait_for(base, lambda live: live["live"] == 0, "streaming store left open")


def test_served_send_file_still_works_through_the_middleware(base: str) -> None:
    response = httpx.get(f"{base}/file", timeout=30)
    assert response.status_code == 200
    assert response.content == Path(flask_apps.__file__).read_bytes()
    _wait_for(base, lambda live: live["live"] == 0, "store of a file response left open")


def test_served_view_that_raises_closes_the_store(base: str) -> None:
    response = httpx.get(f"{base}/boom", timeout=30)
    assert response.status_code == 500
    assert response.text == "500 in_scope=True marker_set=True"
    live = _wait_for(base, lambda live: live["live"] == 0, "store of a failed request left open")
    assert [t for t in live["teardowns"] if t["path"] == "/boom"][-1]["exc"] == "Boom"


def test_served_client_disconnecting_mid_stream_closes_the_store(base: str) -> None:
    aborted = _get(f"{base}/_live")["aborted"]
    with httpx.stream("GET", f"{base}/slow", timeout=30) as response:
        assert response.status_code == 200
        received = 0
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > 256 * 1024:
                break  # leave with most of the 128 MB body unread
    live = _wait_for(
        base,
        lambda live: live["live"] == 0 and live["aborted"] > aborted,
        "the stream's store stayed open after the client left",
    )
    assert live["aborted"] == aborted + 1


def test_served_pooled_thread_carries_no_store_into_an_unwrapped_app(base: str) -> None:
    """The gthread trap: a set without reset is seen by the next request on that thread.

    Which pooled thread takes a request is the pool's choice. CPython 3.13's locks wake their
    waiters in turn, so the pool's idle threads take requests in a fixed rotation: with
    three of them, rounds of one request per path put each path on a thread of its own,
    and /raw never ran where the others had. Four requests in a row reach each thread of a
    rotation of up to four (gunicorn's ``--threads 4`` here); more rounds, up to a bound,
    for a pool that picks its threads otherwise."""
    raw: list[dict[str, Any]] = []
    shared_threads: set[int] = set()
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(40):
            for _ in range(4):
                assert client.get("/leaky/").status_code == 200
            for _ in range(4):
                shared_threads.add(client.get("/shared").json()["thread"])
            raw.append(client.get("/raw/").json())
            reused = {r["thread"] for r in raw} & shared_threads
            if len(raw) >= 12 and reused and any(r["leak"] is not None for r in raw):
                break
    assert [(r["in_scope"], r["var_set"]) for r in raw] == [(False, False)] * len(raw)
    # The check is real: unwrapped requests ran on threads that had served wrapped ones,
    # and those threads did carry over the ContextVar that /leaky set without a reset.
    assert {r["thread"] for r in raw} & shared_threads
    assert any(r["leak"] is not None for r in raw)


def test_served_async_views_keep_their_own_store_under_concurrency(base: str) -> None:
    async def one(client: httpx.AsyncClient, n: int) -> None:
        rid = f"{n}-{uuid.uuid4().hex}"
        response = await client.get("/async/echo", params={"rid": rid})
        assert response.status_code == 200, response.text
        _check_async_echo(response.json(), rid)

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            await asyncio.gather(*(one(client, n) for n in range(60)))

    asyncio.run(burst())
    _wait_for(base, lambda live: live["live"] == 0, "stores of async views left open")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("worker_class", "workers", "threads"), [("sync", 3, 1), ("gthread", 2, 4)]
)
def test_served_concurrent_requests_never_see_each_other(
    worker_class: str, workers: int, threads: int
) -> None:
    total = 300

    async def one(client: httpx.AsyncClient, n: int) -> bool:
        value = f"{n}-{uuid.uuid4().hex}"
        response = await client.get("/echo", params={"v": value})
        assert response.status_code == 200, response.text
        return bool(response.json() == {"before": None, "seen": value, "memo": value})

    async def burst(url: str) -> list[bool]:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            return await asyncio.gather(*(one(client, n) for n in range(total)))

    spec = "flask_apps:dispatch"
    with serve_gunicorn(spec, worker_class=worker_class, workers=workers, threads=threads) as url:
        results = asyncio.run(burst(url))
        for _ in range(workers):  # each worker must end with nothing open
            _wait_for(url, lambda live: live["live"] == 0, "stores left open after the burst")
    cross_talk = results.count(False)
    assert len(results) == total and cross_talk == 0


def test_copy_current_request_context_runs_teardowns_again_in_its_thread() -> None:
    """docs/frameworks/flask.md: a thread's function under ``copy_current_request_context``
    pops the copied context as it returns, which runs the app's teardowns again there,
    outside the scope; ``bind_scope`` around it brings the scope along (an audit)."""
    import threading

    from flask import copy_current_request_context

    app = Flask(__name__)
    PerRequest(app)
    seen: list[tuple[str, bool]] = []

    @app.teardown_request
    def record(_: BaseException | None) -> None:
        seen.append((threading.current_thread().name, perrequest.in_request_scope()))

    @app.get("/<how>")
    def view(how: str) -> str:
        work = copy_current_request_context(lambda: None)
        target = perrequest.bind_scope(work) if how == "bound" else work
        thread = threading.Thread(target=target, name="worker")
        thread.start()
        thread.join(10)
        return how

    client = app.test_client()
    with client.get("/alone") as response:
        assert response.text == "alone"
    assert seen == [("worker", False), ("MainThread", True)]
    seen.clear()
    with client.get("/bound") as response:
        assert response.text == "bound"
    assert seen == [("worker", True), ("MainThread", True)]
    assert live_scopes() == 0


def test_a_memo_run_in_a_plain_thread_pool_from_a_view_is_told_to_use_bind_scope(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The newcomer's case (7 December 2026): a view hands a memo to a thread pool without
    ``bind_scope``; the middleware is there, so the WARNING leads with ``bind_scope``, and
    with it the same call is cached in the request's store."""
    from concurrent.futures import ThreadPoolExecutor

    computed: list[str] = []

    @perrequest.request_memo
    def rate_for_a_view(currency: str) -> str:
        computed.append(currency)
        return currency

    app = Flask(__name__)
    PerRequest(app)
    pool = ThreadPoolExecutor(1)

    @app.get("/plain")
    def plain() -> str:
        return pool.submit(rate_for_a_view, "EUR").result(10)

    @app.get("/bound")
    def bound() -> str:
        run = perrequest.bind_scope(rate_for_a_view)
        return "".join(pool.submit(run, "USD").result(10) for _ in range(2))

    caplog.set_level("WARNING", logger="perrequest")
    try:
        with app.test_client() as client:
            with client.get("/plain") as response:
                assert response.text == "EUR"
            with client.get("/bound") as response:
                assert response.text == "USDUSD"
    finally:
        pool.shutdown()
    (warning,) = [r.getMessage() for r in caplog.records if "rate_for_a_view" in r.getMessage()]
    assert "A request scope is open in this process, but not here" in warning
    assert "perrequest.bind_scope(fn)" in warning and "Register" not in warning
    assert computed == ["EUR", "USD"]  # bound: computed once for the two calls
    assert live_scopes() == 0


def _debugged_stream_app(log: list[str]) -> Any:
    """What ``flask run --debug`` serves: Werkzeug's debugger (a generator doing ``yield
    from`` over the app's body) around a Flask app streaming with ``stream_with_context``
    and a ``call_on_close`` hook."""
    from werkzeug.debug import DebuggedApplication

    app = Flask("debugged")
    PerRequest(app)

    @app.get("/stream")
    def stream() -> Response:
        perrequest.set("who", "stream")

        def rows() -> Iterator[str]:
            try:
                for i in range(100_000):
                    yield f"row {i}\n" + "x" * 1000
            finally:
                log.append(f"finally {perrequest.get('who')}")

        response = Response(stream_with_context(rows()))
        response.call_on_close(lambda: log.append(f"call_on_close {perrequest.get('who')}"))
        return response

    return DebuggedApplication(app, evalex=False)


def test_the_debuggers_iterator_closed_mid_stream_closes_the_response_in_its_scope() -> None:
    """Werkzeug's debugger, closed as a client leaves, closes the iterator it got from the
    body (``yield from``): that closes a generator body or Flask's ClosingIterator. It
    closed only perrequest's iterator: call_on_close never ran, and the stream's cleanup
    ran later with no store (a probe, 7 December 2026). A dropped iterator closes nothing
    (test_another_apps_body_dropped_unclosed_inside_a_view_never_writes_the_views_store)."""
    log: list[str] = []
    environ = dict(create_environ("/stream"))
    body: Any = _debugged_stream_app(log)(environ, lambda status, headers, exc_info=None: None)
    chunks = iter(body)
    next(chunks), next(chunks)
    body.close()  # the dev server, on a broken pipe
    assert log == ["finally stream", "call_on_close stream"]
    assert live_scopes() == 0


def test_flask_run_debug_runs_close_hooks_in_scope_when_a_client_leaves_mid_stream() -> None:
    """The same through Werkzeug's own threaded dev server, the client resetting mid-body."""
    import socket
    import struct
    import threading

    from werkzeug.serving import make_server

    log: list[str] = []
    server = make_server("127.0.0.1", 0, _debugged_stream_app(log), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.server_address, timeout=10) as client:
            client.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(5000)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        deadline = time.monotonic() + 10
        while len(log) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
        thread.join(10)
    assert log == ["finally stream", "call_on_close stream"]
    assert live_scopes() == 0


@pytest.mark.parametrize("how", ["read inside", "with client.get() as response"])
def test_a_stream_read_inside_with_client_keeps_flasks_contexts_in_order(how: str) -> None:
    """``with client:`` re-pushes the request's Flask contexts in the test's thread while a
    ``stream_with_context`` body pushes and pops them too. With the request run in a
    context of its own (tried on 7 December 2026), the body's pop reset a token of the
    test's context: ValueError, and Flask's request context left pushed in the test."""
    app = Flask("with_client")

    @app.get("/s")
    def s() -> Response:
        return Response(stream_with_context(iter(["a\n", "b\n"])))

    PerRequest(app)
    client = app.test_client()
    with client:
        if how == "read inside":
            response = client.get("/s")
            body = response.get_data()
        else:
            with client.get("/s") as response:
                body = response.get_data()
    response.close()
    assert body == b"a\nb\n" and live_scopes() == 0
    import flask

    assert not flask.has_request_context()
