"""DESIGN.md statements that hold and that no other test pins down, one test each.

Written by a contract audit: the public names and their shapes, the warning a memo
logs outside a scope, what bind_scope refuses, the stats' shape, the default bound
of every entry point, and the testing helpers without pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest

import perrequest
from perrequest import (
    DEFAULT_MAX_ENTRIES,
    CacheInfo,
    FunctionStats,
    MemoStore,
    NoActiveScope,
    ScopeStats,
    UnhashableArguments,
    bind_scope,
    request_memo,
    request_scope,
)

SRC = Path(__file__).resolve().parent.parent / "src"

# The "Public API (perrequest)" table of DESIGN.md, name by name.
PUBLIC = [
    "request_scope",
    "request_memo",
    "request_batch",
    "current_store",
    "in_request_scope",
    "get",
    "set",
    "get_or_set",
    "delete",
    "bind_scope",
    "add_scope_listener",
    "remove_scope_listener",
    "MemoStore",
    "ScopeStats",
    "PerRequestError",
    "NoActiveScope",
    "ScopeClosed",
    "UnhashableArguments",
]
HELPERS = {"get", "set", "get_or_set", "delete"}


def test_every_name_of_the_public_api_table_exists_and_is_documented() -> None:
    for name in PUBLIC:
        obj = getattr(perrequest, name)
        assert (obj.__doc__ or "").strip(), f"perrequest.{name} has no docstring"
        assert (name in perrequest.__all__) is (name not in HELPERS), name
    assert "DEFAULT_MAX_ENTRIES" in perrequest.__all__


def test_the_parameters_are_named_as_the_public_api_table_writes_them() -> None:
    """DESIGN.md writes ``add_scope_listener(fn)``, ``bind_scope(fn)``, ``get(key, default)``
    ...: a call by those keywords works (an audit found ``add_scope_listener(listener)``)."""
    listener = []
    perrequest.add_scope_listener(fn=listener.append)
    try:
        with request_scope():
            bound = perrequest.bind_scope(fn=lambda: perrequest.get(key="k", default=1))
            assert bound() == 1
            perrequest.set(key="k", value=2)
            assert perrequest.get_or_set(key="k", factory=lambda: 3) == 2
            assert perrequest.delete(key="k") is True
    finally:
        perrequest.remove_scope_listener(fn=listener.append)
    assert len(listener) == 1
    for name, params in {
        "request_scope": ["max_entries", "on_close"],
        "add_scope_listener": ["fn"],
        "remove_scope_listener": ["fn"],
        "bind_scope": ["fn"],
    }.items():
        assert list(inspect.signature(getattr(perrequest, name)).parameters) == params, name


def test_every_integration_entry_point_exists_and_is_documented() -> None:
    from perrequest import asgi, django, flask, testing, wsgi

    for obj in (
        asgi.RequestScopeMiddleware,
        wsgi.RequestScopeMiddleware,
        django.RequestScopeMiddleware,
        flask.PerRequest,
        flask.PerRequest.init_app,
        testing.live_scopes,
        testing.assert_no_live_scopes,
    ):
        assert (obj.__doc__ or "").strip(), obj
    assert isinstance(testing.live_scopes(), int)


def test_cache_info_has_the_shape_of_functools_cache_info() -> None:
    @functools.lru_cache
    def reference(x: int) -> int:
        return x

    reference(1)
    theirs = reference.cache_info()
    ours = CacheInfo(theirs.hits, theirs.misses, theirs.maxsize, theirs.currsize)
    assert ours._fields == type(theirs)._fields == ("hits", "misses", "maxsize", "currsize")
    assert tuple(ours) == tuple(theirs)
    assert ours._asdict() == theirs._asdict()

    @request_memo(max_entries=3)
    def memo(x: int) -> int:
        return x

    with request_scope():
        memo(1)
        memo(1)
        info = memo.cache_info()
    assert type(info) is CacheInfo
    assert (info.hits, info.misses, info.maxsize, info.currsize) == (1, 1, 3, 1)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "perrequest" and "outside a request scope" in r.getMessage()
    ]


def test_a_memo_outside_a_scope_warns_once_per_function_naming_it_and_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    @request_memo
    def audit_warned_sync(x: int) -> int:
        calls.append(x)
        return x

    @request_memo(outside_scope="warn")
    async def audit_warned_async(x: int) -> int:
        calls.append(x)
        return x

    @request_memo(outside_scope="call")
    def audit_silent(x: int) -> int:
        calls.append(x)
        return x

    with caplog.at_level(logging.DEBUG, logger="perrequest"):
        for _ in range(3):
            assert audit_warned_sync(1) == 1
            assert asyncio.run(audit_warned_async(2)) == 2
            assert audit_silent(3) == 3
    assert calls == [1, 2, 3] * 3  # called every time, never cached
    warnings = _warnings(caplog)
    assert [r.levelno for r in warnings] == [logging.WARNING] * 2
    sync_text, async_text = (r.getMessage() for r in warnings)
    where = f"{__name__}.test_a_memo_outside_a_scope_warns_once_per_function_naming_it_and_the_fix"
    assert f"{where}.<locals>.audit_warned_sync " in sync_text
    assert f"{where}.<locals>.audit_warned_async " in async_text
    for text in (sync_text, async_text):
        assert "request_scope()" in text and "RequestScopeMiddleware" in text
        assert "outside_scope='call'" in text
    assert not any("audit_silent" in r.getMessage() for r in caplog.records)


def test_bind_scope_refuses_generator_and_async_generator_functions() -> None:
    def rows() -> Iterator[int]:
        yield 1

    async def stream() -> Any:
        yield 1

    with request_scope():
        with pytest.raises(TypeError, match=r"bind_scope.*a generator function"):
            bind_scope(rows)
        with pytest.raises(TypeError, match=r"bind_scope.*an async generator function"):
            bind_scope(stream)
    with pytest.raises(TypeError, match="generator"):  # refused before the scope is looked for
        bind_scope(rows)


def test_bind_scope_called_late_follows_the_memos_outside_scope_rule() -> None:
    @request_memo(outside_scope="raise")
    def strict(x: int) -> int:
        return x

    with request_scope():
        bound = bind_scope(strict)
        assert bound(1) == 1
    with pytest.raises(NoActiveScope, match="strict"):
        bound(1)


def test_scope_stats_are_an_immutable_snapshot() -> None:
    @request_memo
    def audit_counted(x: int) -> int:
        return x

    seen: list[ScopeStats] = []
    with request_scope(on_close=seen.append) as store:
        audit_counted(1)
        live = store.stats
        audit_counted(2)
    [stats] = seen
    assert live.misses == 1 and stats.misses == 2  # a snapshot, not a view
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.hits = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.functions["x"] = FunctionStats(0, 0, 0, 0.0)  # type: ignore[index]
    assert FunctionStats._fields == ("hits", "misses", "evictions", "compute_s")
    assert [f.name for f in dataclasses.fields(ScopeStats)] == [
        "hits",
        "misses",
        "entries",
        "peak_entries",
        "evictions",
        "duration_s",
        "functions",
    ]


class Outer:
    class Inner:
        @request_memo
        def method(self, x: int) -> int:
            return x

        @staticmethod
        @request_memo
        def static(x: int) -> int:
            return x


def _factory() -> Any:
    @request_memo
    def made(x: int) -> int:
        return x

    return made


def test_functions_are_keyed_by_module_and_qualified_name() -> None:
    seen: list[ScopeStats] = []
    with request_scope(on_close=seen.append):
        Outer.Inner().method(1)
        Outer.Inner.static(1)
        _factory()(1)
        _factory()(1)  # a second closure of the same def: one name, its own entry
    assert dict(seen[0].functions).keys() == {
        f"{__name__}.Outer.Inner.method",
        f"{__name__}.Outer.Inner.static",
        f"{__name__}._factory.<locals>.made",
    }
    assert seen[0].functions[f"{__name__}._factory.<locals>.made"].misses == 2


def test_a_key_function_returning_unhashable_counts_as_neither_hit_nor_miss() -> None:
    @request_memo(key=lambda x: [x])  # type: ignore[arg-type,return-value]
    def listed(x: int) -> int:
        return x

    with request_scope() as store:
        with pytest.raises(UnhashableArguments, match="key="):
            listed(1)
        assert (store.stats.hits, store.stats.misses, len(store)) == (0, 0, 0)


def _serve_wsgi(app: Any) -> list[bytes]:
    body = app({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *args: None)
    try:
        return list(body)
    finally:
        getattr(body, "close", lambda: None)()


def test_every_store_is_bounded_by_default_and_unbounded_only_when_asked() -> None:
    from flask import Flask

    from perrequest.flask import PerRequest
    from perrequest.wsgi import RequestScopeMiddleware

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [repr(perrequest.current_store().max_entries).encode()]

    assert _serve_wsgi(RequestScopeMiddleware(app)) == [str(DEFAULT_MAX_ENTRIES).encode()]
    assert _serve_wsgi(RequestScopeMiddleware(app, max_entries=None)) == [b"None"]
    assert MemoStore().max_entries == DEFAULT_MAX_ENTRIES
    assert MemoStore(None).max_entries is None
    assert PerRequest().max_entries == DEFAULT_MAX_ENTRIES
    assert PerRequest(max_entries=None).max_entries is None

    flask_app = Flask(__name__)
    PerRequest(flask_app)

    @flask_app.get("/")
    def index() -> str:
        return repr(perrequest.current_store().max_entries)

    assert flask_app.test_client().get("/").text == str(DEFAULT_MAX_ENTRIES)


def test_memo_store_is_a_mutable_mapping_with_the_contract_extras() -> None:
    with request_scope(max_entries=5) as store:
        assert isinstance(store, MutableMapping)
        assert store.get_or_set("k", lambda: 1) == 1
        assert store.stats.misses == 1 and store.max_entries == 5 and store.closed is False
    assert store.closed is True


def test_on_close_runs_in_the_thread_that_closes_the_scope() -> None:
    threads: list[str] = []

    def on_close(stats: ScopeStats) -> None:
        threads.append(threading.current_thread().name)

    def body() -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(request_scope(on_close=on_close))
        closer = threading.Thread(target=stack.close, name="audit-closer")
        closer.start()
        closer.join(5)

    import contextvars

    contextvars.copy_context().run(body)
    assert threads == ["audit-closer"]


def test_the_testing_helpers_import_without_pytest() -> None:
    code = (
        "import sys\n"
        "class NoPytest:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest'):\n"
        "            raise ImportError('pytest is not installed here')\n"
        "sys.meta_path.insert(0, NoPytest())\n"
        "from perrequest.testing import *\n"
        "import perrequest\n"
        "assert sorted(n for n in dir() if not n.startswith('_')) == "
        "['NoPytest', 'assert_no_live_scopes', 'live_scopes', 'perrequest', 'sys'], dir()\n"
        "assert live_scopes() == 0\n"
        "assert_no_live_scopes()\n"
        "with perrequest.request_scope():\n"
        "    assert live_scopes() == 1\n"
        "    try:\n"
        "        assert_no_live_scopes()\n"
        "    except AssertionError as exc:\n"
        "        assert 'still open' in str(exc)\n"
        "    else:\n"
        "        raise SystemExit('no AssertionError')\n"
        "assert 'pytest' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": ""},
    )
    assert done.returncode == 0, done.stderr


def test_a_raising_on_close_never_replaces_a_decorated_functions_result_or_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Boom(Exception):
        pass

    def on_close(stats: ScopeStats) -> None:
        raise Boom("on_close")

    @request_scope(on_close=on_close)
    def job(x: int) -> int:
        return perrequest.get_or_set("x", lambda: x)

    @request_scope(on_close=on_close)
    async def async_job(x: int) -> int:
        if x < 0:
            raise ValueError("the job's own error")
        return perrequest.get_or_set("x", lambda: x)

    assert job(1) == 1
    assert asyncio.run(async_job(2)) == 2
    with pytest.raises(ValueError, match="the job's own error"):
        asyncio.run(async_job(-1))
    errors = [r for r in caplog.records if r.name == "perrequest" and r.levelno == logging.ERROR]
    assert len(errors) == 3
    assert all(r.exc_info is not None and r.exc_info[0] is Boom for r in errors)
