"""Scope listeners and per-function stats: what the metrics integrations build on."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from celery import Celery
from flask import Flask
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import perrequest
from perrequest import FunctionStats, ScopeStats, _stats, request_memo, request_scope
from perrequest.asgi import RequestScopeMiddleware as ASGIMiddleware
from perrequest.celery import ScopedTask
from perrequest.flask import PerRequest

NAME = f"{__name__}.square"


@request_memo
def square(x: int) -> int:
    time.sleep(0.002)
    return x * x


@request_memo(max_entries=2)
def bounded(x: int) -> int:
    return x


class Recorder:
    """A listener keeping what it got, and in which order relative to others."""

    def __init__(self, log: list[str] | None = None, tag: str = "listener") -> None:
        self.stats: list[ScopeStats] = []
        self.log = log if log is not None else []
        self.tag = tag

    def __call__(self, stats: ScopeStats) -> None:
        self.stats.append(stats)
        self.log.append(self.tag)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    listener = Recorder()
    perrequest.add_scope_listener(listener)
    yield listener
    perrequest.remove_scope_listener(listener)


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)


# -- per-function stats ---------------------------------------------------------------------


def test_functions_count_hits_misses_evictions_and_compute_time(recorder: Recorder) -> None:
    with request_scope() as store:
        for x in (1, 2, 1, 1, 2):
            square(x)
        for x in (1, 2, 3, 4):
            bounded(x)
        perrequest.get_or_set("plain", lambda: 1)
        perrequest.get_or_set("plain", lambda: 1)
    [stats] = recorder.stats
    fn = stats.functions[NAME]
    assert (fn.hits, fn.misses, fn.evictions) == (3, 2, 0)
    assert fn.compute_s >= 2 * 0.002  # two misses, timed because a listener listens
    assert stats.functions[f"{__name__}.bounded"] == FunctionStats(
        0, 4, 2, pytest.approx(0, abs=0.01)
    )
    # The totals include the helpers' get_or_set (1 miss, 1 hit), the functions do not.
    assert (stats.hits, stats.misses, stats.evictions) == (3 + 0 + 1, 2 + 4 + 1, 2)
    assert store.stats is stats  # the final stats, kept


def test_compute_time_is_measured_only_when_somebody_looks() -> None:
    with request_scope() as store:
        square(1)
        assert store.stats.functions[NAME].compute_s == 0.0  # nobody observes: no clock
    seen: list[ScopeStats] = []
    with request_scope(on_close=seen.append):
        square(1)
    assert seen[0].functions[NAME].compute_s >= 0.002


def test_a_single_flight_waiter_counts_as_a_hit_of_its_function(recorder: Recorder) -> None:
    started, release = threading.Event(), threading.Event()

    @request_memo
    def slow(x: int) -> int:
        started.set()
        release.wait(5)
        return x

    with request_scope():
        bound = perrequest.bind_scope(slow)
        first = threading.Thread(target=bound, args=(1,))
        first.start()
        started.wait(5)
        second = threading.Thread(target=bound, args=(1,))
        second.start()
        time.sleep(0.05)
        release.set()
        first.join(5)
        second.join(5)
    fn = recorder.stats[0].functions[f"{__name__}.{slow.__qualname__}"]
    assert (fn.hits, fn.misses) == (1, 1)


# -- listeners: every kind of scope, after on_close, never breaking anything -----------------


def test_listener_gets_every_scope_after_on_close(recorder: Recorder) -> None:
    order = recorder.log

    with request_scope(on_close=lambda stats: order.append("on_close")):
        square(3)

    @request_scope()
    async def job() -> int:
        return square(4)

    asyncio.run(job())
    assert order == ["on_close", "listener", "listener"]
    assert [s.misses for s in recorder.stats] == [1, 1]


def test_listener_sees_asgi_wsgi_and_celery_scopes(recorder: Recorder) -> None:
    async def index(request: object) -> PlainTextResponse:
        return PlainTextResponse(str(square(5)))

    asgi = Starlette(routes=[Route("/", index)])
    asgi.add_middleware(ASGIMiddleware)
    with TestClient(asgi) as client:
        assert client.get("/").text == "25"

    flask = Flask(__name__)
    PerRequest(flask)
    flask.add_url_rule("/", "index", lambda: str(square(6)))
    assert flask.test_client().get("/").text == "36"

    celery = Celery("listeners", set_as_current=False)

    @celery.task(base=ScopedTask)
    def task() -> int:
        return square(7)

    assert task.apply().get() == 49
    _wait_for(lambda: len(recorder.stats) >= 3)
    assert [s.functions[NAME].misses for s in recorder.stats] == [1, 1, 1]


def test_failing_listener_is_logged_and_never_breaks_a_response(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(stats: ScopeStats) -> None:
        raise RuntimeError("listener bug")

    perrequest.add_scope_listener(broken)
    try:

        async def index(request: object) -> PlainTextResponse:
            return PlainTextResponse(str(square(8)))

        app = Starlette(routes=[Route("/", index)])
        app.add_middleware(ASGIMiddleware)
        with caplog.at_level(logging.ERROR, logger="perrequest"), TestClient(app) as client:
            response = client.get("/")
            _wait_for(lambda: recorder.stats)
        assert (response.status_code, response.text) == (200, "64")
        with request_scope() as store:
            pass  # a scope block's own result is untouched too
        assert store.closed
    finally:
        perrequest.remove_scope_listener(broken)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and all("scope listener" in r.getMessage() for r in errors)
    assert errors[0].exc_info is not None and "listener bug" in str(errors[0].exc_info[1])
    assert len(recorder.stats) == 2  # the listener after the broken one still ran


def test_a_log_handler_that_raises_neither_fails_the_request_nor_skips_callbacks(
    recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    """A handler on the perrequest logger whose emit() raises (a log sink down): the
    DEBUG line of a closing scope raised out of the middleware before on_close and the
    listeners ran, and a failing on_close's ERROR line skipped the listeners (a probe).
    Reported on stderr, as logging's own handlers report their failures."""

    class Down(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise OSError("log sink down")

    closed: list[ScopeStats] = []

    def on_close(stats: ScopeStats) -> None:
        closed.append(stats)
        raise RuntimeError("on_close bug")

    async def index(request: object) -> PlainTextResponse:
        return PlainTextResponse(str(square(8)))

    app = Starlette(routes=[Route("/", index)])
    app.add_middleware(ASGIMiddleware, on_close=on_close)
    log, handler = logging.getLogger("perrequest"), Down()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        with TestClient(app) as client:
            response = client.get("/")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert (response.status_code, response.text) == (200, "64")
    assert len(closed) == 1 and len(recorder.stats) == 1  # on_close, then the listener
    assert capsys.readouterr().err.count("OSError: log sink down") == 2


def test_add_is_idempotent_remove_stops_and_ignores_strangers() -> None:
    listener = Recorder()
    perrequest.add_scope_listener(listener)
    perrequest.add_scope_listener(listener)
    with request_scope():
        pass
    perrequest.remove_scope_listener(listener)
    perrequest.remove_scope_listener(listener)  # not there any more: ignored
    with request_scope():
        pass
    assert len(listener.stats) == 1


def test_a_listener_must_be_callable() -> None:
    with pytest.raises(TypeError, match="add_scope_listener"):
        perrequest.add_scope_listener("not a function")  # type: ignore[arg-type]


def test_a_listener_of_no_argument_is_refused_in_plain_words() -> None:
    with pytest.raises(TypeError) as caught:
        perrequest.add_scope_listener(lambda: None)  # type: ignore[arg-type,misc]
    assert str(caught.value).startswith("add_scope_listener() must take one argument, the")


def test_none_is_no_listener() -> None:
    """None was accepted (the check was on_close's, where None means "no callback"),
    and every scope that closed then logged an ERROR calling it."""
    with pytest.raises(TypeError, match="must be a callable taking ScopeStats, not") as info:
        perrequest.add_scope_listener(None)  # type: ignore[arg-type]
    assert "or None" not in str(info.value)
    assert None not in _stats.listeners


def test_an_unwatched_store_makes_its_final_stats_only_when_read() -> None:
    """Nobody watches (no on_close, no listener, no DEBUG): closing keeps the numbers,
    and ``stats`` makes the same final stats from them, once, on first read."""
    with request_scope() as store:
        for x in (1, 2, 1):
            square(x)
        perrequest.get_or_set("plain", lambda: 1)
    assert type(store._final) is tuple  # not made at close
    stats = store.stats
    assert store.stats is stats  # made once, then kept
    assert (stats.hits, stats.misses, stats.entries, stats.peak_entries) == (1, 3, 3, 3)
    assert stats.functions[NAME][:3] == (1, 2, 0)
    square(1)  # after the scope: counts nowhere
    assert store.stats is stats and len(store) == 0
