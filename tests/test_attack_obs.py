"""Attacks on observability: listeners, ``on_close``, stats, metrics and the test helpers."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import gc
import json
import logging
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from servers import run_python, serve_gunicorn, serve_uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import perrequest
from perrequest import ScopeStats, prometheus, request_memo, request_scope
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

NAME = f"{__name__}.double"


@request_memo
def double(x: int) -> int:
    return 2 * x


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def errors() -> Iterator[list[logging.LogRecord]]:
    """What the ``perrequest`` logger logs at ERROR during the test."""
    handler = _Kept()
    logger = logging.getLogger("perrequest")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


# -- a listener or on_close that opens a scope of its own ----------------------------------


def test_a_listener_that_opens_a_scope_is_not_called_for_it(
    errors: list[logging.LogRecord],
) -> None:
    """A listener that stores its stats through code that opens a scope (a memo in a
    ``request_scope()``, a worker helper decorated ``@request_scope()``) was called for
    that scope too, which opened another: it recursed until ``RecursionError``, ~300
    scopes and a logged traceback per closing scope. Another listener still sees the
    inner scope."""
    got: list[ScopeStats] = []
    seen: list[ScopeStats] = []

    def store_stats(stats: ScopeStats) -> None:
        got.append(stats)
        with request_scope():
            double(len(got))

    perrequest.add_scope_listener(store_stats)
    perrequest.add_scope_listener(seen.append)
    try:
        with request_scope():
            assert double(1) == 2
    finally:
        perrequest.remove_scope_listener(store_stats)
        perrequest.remove_scope_listener(seen.append)
    assert len(got) == 1 and got[0].functions[NAME].misses == 1
    assert len(seen) == 2  # the outer scope, and the one store_stats opened
    assert not errors
    assert live_scopes() == 0


def test_an_on_close_that_opens_a_scope_with_itself_does_not_recurse(
    errors: list[logging.LogRecord],
) -> None:
    """An ``on_close`` that runs code opening a scope with the same ``on_close`` (a
    Celery task run eagerly, whose scopes get the app's ``on_close``) recursed too."""
    calls: list[ScopeStats] = []

    def on_close(stats: ScopeStats) -> None:
        calls.append(stats)
        with request_scope(on_close=on_close):
            double(3)

    with request_scope(on_close=on_close):
        double(2)
    assert len(calls) == 1
    assert not errors


def test_an_on_close_made_anew_for_each_scope_does_not_recurse(
    errors: list[logging.LogRecord],
) -> None:
    """The check was by identity: ``on_close=self.record`` is a new bound method at each
    call, ``functools.partial(record, tag)`` a new partial, and both recursed until
    ``RecursionError`` again. A bound method is recognised; anything else stops after
    a few nested callbacks."""

    class Recorder:
        def __init__(self) -> None:
            self.calls = 0

        def record(self, stats: ScopeStats) -> None:
            self.calls += 1
            with request_scope(on_close=self.record):
                double(6)

    recorder = Recorder()
    with request_scope(on_close=recorder.record):
        double(7)
    assert recorder.calls == 1

    calls: list[str] = []

    def record(tag: str, stats: ScopeStats) -> None:
        calls.append(tag)
        with request_scope(on_close=functools.partial(record, tag)):
            double(8)

    with request_scope(on_close=functools.partial(record, "outer")):
        double(9)
    assert 1 < len(calls) <= 10
    assert not errors
    assert live_scopes() == 0


async def test_a_listener_handing_its_work_to_a_task_that_opens_a_scope_ends() -> None:
    """A listener that hands its async work to a task (what the docs advise), whose
    code opens a scope: that scope's close called the listener, which made another
    task: an endless chain of scopes, ~60,000 a second, for the life of the loop."""
    calls: list[ScopeStats] = []
    seen: list[ScopeStats] = []
    tasks: list[asyncio.Task[None]] = []

    async def report(stats: ScopeStats) -> None:
        async with request_scope():
            double(stats.misses)

    def listener(stats: ScopeStats) -> None:
        calls.append(stats)
        tasks.append(asyncio.get_running_loop().create_task(report(stats)))

    perrequest.add_scope_listener(listener)
    perrequest.add_scope_listener(seen.append)
    try:
        async with request_scope():
            double(5)
        await asyncio.sleep(0.2)
    finally:
        perrequest.remove_scope_listener(listener)
        perrequest.remove_scope_listener(seen.append)
    await asyncio.gather(*tasks)
    assert len(calls) == 1
    assert len(seen) == 2  # the request's scope, and the one report opened


def test_under_uvicorn_a_listener_opening_scopes_leaves_responses_and_log_clean(
    errors: list[logging.LogRecord],
) -> None:
    got: list[ScopeStats] = []

    def store_stats(stats: ScopeStats) -> None:
        with request_scope():
            double(-1)
        got.append(stats)

    async def index(request: Any) -> PlainTextResponse:
        return PlainTextResponse(str(double(int(request.query_params["x"]))))

    app = Starlette(routes=[Route("/", index)])
    app.add_middleware(RequestScopeMiddleware)
    perrequest.add_scope_listener(store_stats)
    try:
        with serve_uvicorn(app) as url:
            for x in range(5):
                assert httpx.get(url + f"/?x={x}", timeout=10).text == str(2 * x)
            _wait_for(lambda: len(got) >= 5)
    finally:
        perrequest.remove_scope_listener(store_stats)
    assert [s.misses for s in got] == [1] * 5
    assert not errors


# -- what a listener does with the stats ----------------------------------------------------


def test_stats_can_be_pickled_copied_and_made_a_dict_by_a_listener() -> None:
    """``functions`` was a ``MappingProxyType``: ``dataclasses.asdict(stats)`` (to log
    them as JSON), ``pickle`` (a listener handing them to a queue, a Celery task) and
    ``copy.deepcopy`` raised "cannot pickle 'mappingproxy' object", and ``hash`` of the
    frozen stats raised too. Still read-only."""
    with request_scope() as store:
        double(1)
        double(1)
    stats = store.stats
    as_dict = dataclasses.asdict(stats)
    assert json.loads(json.dumps(as_dict))["functions"] == {NAME: [1, 1, 0, 0.0]}
    again = pickle.loads(pickle.dumps(stats))
    assert again == stats and again.functions[NAME].hits == 1
    assert copy.deepcopy(stats) == stats and hash(stats) == hash(again)
    with pytest.raises(TypeError, match="read-only"):
        stats.functions[NAME] = stats.functions[NAME]  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        again.functions.clear()  # type: ignore[attr-defined]
    assert stats.functions == {NAME: (1, 1, 0, 0.0)}


def test_a_listener_returning_a_coroutine_is_logged_not_silently_dropped(
    errors: list[logging.LogRecord], recwarn: pytest.WarningsRecorder
) -> None:
    """``add_scope_listener(lambda stats: send(stats))`` (``send`` async) passed the async
    check and then did nothing: its coroutine was never awaited, and only Python's
    RuntimeWarning (hidden by default) said so. It is closed and logged at ERROR."""
    sent: list[ScopeStats] = []

    async def send(stats: ScopeStats) -> None:
        sent.append(stats)

    def listener(stats: ScopeStats) -> Any:
        return send(stats)

    perrequest.add_scope_listener(listener)
    try:
        with request_scope(on_close=listener):
            double(4)
    finally:
        perrequest.remove_scope_listener(listener)
    gc.collect()
    assert not sent
    assert len(errors) == 2  # as on_close, then as a listener
    assert all("returned a coroutine" in str(r.exc_info[1]) for r in errors if r.exc_info)
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


# -- Prometheus under gunicorn ----------------------------------------------------------------


def test_prometheus_multiprocess_mode_under_gunicorn_has_the_counters(tmp_path: Path) -> None:
    """docs/observability.md says to use prometheus-client's multiprocess mode with
    several gunicorn workers; the counters were a custom collector of in-process totals,
    which multiprocess mode never scrapes: ``perrequest_memo_*_total`` were missing
    (the histograms were there). They are ``Counter`` objects in that mode."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with serve_gunicorn("obs_apps:multiprocess_app", workers=2, env=env) as url:
        for n in range(20):
            assert httpx.get(f"{url}/{n}", timeout=10).text == f"/{n}/{n}"
        scraped = httpx.get(url + "/metrics", timeout=10).text
    function = 'function="obs_apps.load"'
    assert f"perrequest_memo_hits_total{{{function}}} 20.0" in scraped
    assert f"perrequest_memo_misses_total{{{function}}} 20.0" in scraped
    assert f"perrequest_memo_evictions_total{{{function}}} 0.0" in scraped
    assert "perrequest_scope_entries_count 20.0" in scraped
    assert "/7" not in scraped  # keys never reach a label


@request_memo
def triple(x: int) -> int:
    return 3 * x


def test_multiprocess_counters_keep_the_name_bound_and_the_helpers_row(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The multiprocess mode's ``Counter`` objects are fed as the running totals are:
    names past the bound (``perrequest.helpers`` included) under ``(other
    functions)``, the three series of a function together; a name counted already keeps
    its own series in later scopes."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(prometheus, "MAX_NAMES", 1)
    registry = CollectorRegistry()
    prometheus.instrument(registry)
    try:
        with request_scope():
            double(1)
            double(1)
            triple(1)
            perrequest.get_or_set("plain", lambda: 1)
        with request_scope():  # a name known already keeps its series past the bound
            double(2)
        scraped = generate_latest(registry).decode()
    finally:
        prometheus.uninstrument()
    lines = set(scraped.splitlines())
    assert f'perrequest_memo_hits_total{{function="{NAME}"}} 1.0' in lines
    assert f'perrequest_memo_misses_total{{function="{NAME}"}} 2.0' in lines
    assert f'perrequest_memo_evictions_total{{function="{NAME}"}} 0.0' in lines
    # triple and get_or_set, past the bound of one name
    assert 'perrequest_memo_misses_total{function="(other functions)"} 2.0' in lines
    assert "triple" not in scraped


# -- OpenTelemetry ----------------------------------------------------------------------------

_GLOBAL_AND_EXPLICIT = """
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from perrequest import otel, request_memo, request_scope

@request_memo
def f(x):
    return x

def hits(reader):
    data = reader.get_metrics_data()
    return [
        point.value
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "perrequest.memo.hits"
        for point in metric.data.data_points
    ]

reader = InMemoryMetricReader()
provider = MeterProvider(metric_readers=[reader])
metrics.set_meter_provider(provider)
for first, then in ((provider, None), (None, provider)):
    otel.instrument(first)
    otel.instrument(then)
    with request_scope():
        f(1)
        f(1)
    print(hits(reader))
    otel.uninstrument()
"""


def test_otel_instrument_of_the_global_provider_by_name_and_by_default_agree() -> None:
    """``instrument(provider)`` then ``instrument()`` (or the reverse) with ``provider``
    the global one: both get one meter, whose counters keep the first call's callback,
    which looked for a listener installed for that very argument: the counters
    reported nothing from then on. Both name one provider, whose totals go on: the
    second round's hit is added to the first's (a counter never goes back)."""
    result = run_python(_GLOBAL_AND_EXPLICIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[1]", "[2]"]
