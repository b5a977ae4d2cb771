"""Guards of the lifecycle (_active) that no other test needed: each test here fails with its
guard deleted (a block-deletion mutation pass of the core, 5 December 2026)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import perrequest
from perrequest.scope import _current
from perrequest.testing import live_scopes
from perrequest.wsgi import RequestScopeMiddleware


def _environ() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
    }


def test_a_body_iterated_in_one_thread_and_closed_in_another_closes_its_store() -> None:
    """_active.close_request: the body's iteration made the scope active
    in this thread (a token of this context); a server closing it from another thread
    cannot reset that token there, and must close the store all the same."""
    stores: list[Any] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        perrequest.set("x", 1)
        stores.append(perrequest.current_store())
        start_response("200 OK", [])
        return iter([b"a", b"b"])

    body: Any = RequestScopeMiddleware(app)(_environ(), lambda *a: None)
    assert b"".join(iter(body)) == b"ab"  # iterated here: the scope is active here
    errors: list[BaseException] = []

    def close() -> None:
        try:
            body.close()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=close)
    thread.start()
    thread.join()
    assert errors == []
    assert stores[0].closed and live_scopes() == 0
    _current.set(None)  # this thread still holds the closed cell: dropped for the next test


def test_a_collection_keeps_only_the_mapping_of_the_operation_it_interrupted() -> None:
    """_active._keep_mapping_alive, 3.11: a collection inside a scope keeps
    a copy of the context (its mapping) alive; the next one, interrupting another
    operation, drops the earlier copies, which hold other requests' context values (and
    past 64 copies, nothing new is kept: the operation it interrupted goes unprotected)."""
    import contextvars
    import gc
    import sys
    import weakref

    import pytest

    from perrequest import request_scope

    if sys.version_info >= (3, 12):
        pytest.skip("3.11's collections inside allocations only")
    var: contextvars.ContextVar[object] = contextvars.ContextVar("request_object")

    class RequestObject:
        pass

    def request(n: int) -> weakref.ref[RequestObject]:
        with request_scope():
            obj = RequestObject()
            var.set(obj)
            if n % 2:  # two call sites: two different interrupted operations
                gc.collect()
            else:
                gc.collect()
        return weakref.ref(obj)

    enabled = gc.isenabled()
    gc.disable()  # only the collections above (one outside a scope would clear the copies)
    try:
        refs = [contextvars.copy_context().run(request, n) for n in range(4)]
        del request
        assert [r() is None for r in refs[:-1]] == [True] * 3
    finally:
        if enabled:
            gc.enable()
        gc.collect()


def test_a_scope_closed_in_another_context_is_seen_closed_from_a_copy_without_error() -> None:
    """_active._unwound: a scope closed in a copy of the context that
    opened it keeps its token; another copy finds it closed and cannot reset that token
    there: it is just outside any scope."""
    import contextvars

    from perrequest import request_scope

    scope = request_scope()
    scope.__enter__()
    try:
        other = contextvars.copy_context()  # holds the open scope
        contextvars.copy_context().run(scope.__exit__, None, None, None)  # closed elsewhere
        assert other.run(perrequest.in_request_scope) is False
        assert other.run(perrequest.get, "k", 0) == 0
    finally:
        assert perrequest.in_request_scope() is False  # unwound here, where it was set
        _current.set(None)


def test_a_cell_caught_between_closing_and_getting_its_store_gives_the_closed_one() -> None:
    """_active.here: close_request marks the cell closed, then appends its
    store; a thread looking in between gets the shared closed store, not an error."""
    from perrequest._active import here

    token = _current.set([None])  # what another thread sees between the two steps
    try:
        store = here()
        assert store is not None and store.closed
        assert perrequest.get("k", 0) == 0
    finally:
        _current.reset(token)


def test_a_request_scope_with_on_close_reports_its_duration() -> None:
    """_active.open_scope: a watched request_scope() is timed from its
    opening: on_close gets its duration_s."""
    import time

    from perrequest import request_scope

    got: list[Any] = []
    with request_scope(on_close=got.append):
        time.sleep(0.02)
    assert got[0].duration_s >= 0.02


def test_closing_a_middlewares_request_twice_closes_it_once() -> None:
    """_active.close_request: idempotent, as a body's close() and its
    finalizer may both end the request: the count of open scopes goes down once."""
    from perrequest._active import close_request, open_request

    before = live_scopes()
    cell, token = open_request((None, None))
    close_request(cell, token)
    close_request(cell, None)
    assert live_scopes() == before


def test_a_middlewares_store_made_when_debug_logging_is_on_is_timed(caplog: Any) -> None:
    """_active.here: a middleware's store, made when first needed, is timed
    if somebody watches by then (DEBUG logging): the logged stats carry its duration."""
    import logging
    import time

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        perrequest.set("x", 1)  # makes the store
        time.sleep(0.02)
        start_response("200 OK", [])
        return [b"ok"]

    with caplog.at_level(logging.DEBUG, logger="perrequest"):
        body: Any = RequestScopeMiddleware(app)(_environ(), lambda *a: None)
        b"".join(body)
        if hasattr(body, "close"):
            body.close()
    stats = [r.args[0] for r in caplog.records if r.getMessage().startswith("request scope closed")]
    assert stats and stats[-1].duration_s >= 0.02


def test_a_missed_stop_of_the_collection_hook_never_gives_a_store_to_another_thread() -> None:
    """_active._hide_during_collections: at the recursion limit Python cannot call the
    hook, so a collection's "stop" may be missed, leaving its token; the next collection,
    stopping in another thread with no store, used to set the first thread's store there
    (another request's). Now that thread stays outside any scope."""
    from perrequest._active import _hide_during_collections

    seen: list[object] = []
    with perrequest.request_scope():
        _hide_during_collections("start", {})  # hidden here; its "stop" never comes
        assert not perrequest.in_request_scope()

        def next_collection_elsewhere() -> None:
            _hide_during_collections("start", {})  # nothing to hide in this thread
            _hide_during_collections("stop", {})
            seen.append(_current.get())

        thread = threading.Thread(target=next_collection_elsewhere)
        thread.start()
        thread.join(10)
        assert seen == [None]
