"""Features and input checks that a coverage run found no test executing.

One focused test per gap: a sync loader's LRU refresh on a hit, ``@request_batch`` over a
``@staticmethod``, batch functions returning a tuple or an iterator, a memo with an
unhashable default, ``cache_clear()`` racing a ``shared=`` computation, the metrics' bound
on function names, Django's middleware listed twice under ASGI, the toolbar panel's ASGI
store lookup and empty subtitle, an unpicklable value in a pickle ``RedisCache``, a scope
that did nothing under OpenTelemetry, and the input checks that raise a clear error.
A second pass (coverage's tracer restored after the tests that set their own) added a
builtin factory, ``on_close`` or memoized function without a readable signature, a
parameter named like the generated wrapper's names, the bound on names warned about, a
loader's entry as listed, a shared cache failing to store (logged once), prometheus'
default registry, a class method's ``cache_delete()`` without arguments, an unhashable
tuple subclass of hashable items, and an ASGI scope dict carrying a closed layer's cell.
"""

from __future__ import annotations

import contextvars
import functools
import io
import json
import threading
from collections.abc import MutableMapping
from types import SimpleNamespace
from typing import Any

import cachetools
import django_project
import pytest
import redis
import redis.sentinel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_otel import points

django_project.setup()

from django.core.handlers.asgi import ASGIRequest  # noqa: E402
from django.test import AsyncClient, override_settings  # noqa: E402
from django_project import hooks  # noqa: E402
from django_project import settings as project_settings  # noqa: E402

import perrequest  # noqa: E402
from perrequest import (  # noqa: E402
    MemoStore,
    UnhashableArguments,
    _metrics,
    otel,
    request_batch,
    request_memo,
    request_scope,
)
from perrequest._active import REQUEST_KEY  # noqa: E402
from perrequest.asgi import RequestScopeMiddleware as AsgiScopeMiddleware  # noqa: E402
from perrequest.django import toolbar  # noqa: E402
from perrequest.redis import RedisCache  # noqa: E402
from perrequest.store import MemoKey  # noqa: E402

SECRET = "0123456789abcdef0123456789abcdef"
SCOPE_MW = "perrequest.django.RequestScopeMiddleware"


def _offline_client() -> redis.Redis:
    """A client that is never used to connect: RedisCache's checks run at construction."""
    return redis.Redis(host="127.0.0.1", port=1)


# -- 1. batch.py: a sync loader's hit refreshes its LRU recency ---------------------------


def test_a_sync_load_hit_refreshes_recency_within_the_loaders_bound() -> None:
    """With ``max_entries``, ``load(key)`` answering from the store must move the key to
    the recent end: the key just read survives the next eviction, the older one goes."""
    asked: list[list[int]] = []

    @request_batch(max_entries=2)
    def double(keys: list[int]) -> list[int]:
        asked.append(list(keys))
        return [2 * k for k in keys]

    with request_scope():
        assert double.load(1) == 2
        assert double.load(2) == 4
        assert double.load(1) == 2  # a hit: 1 is now the most recent, 2 the least
        assert double.load(3) == 6  # evicts the least recent: 2
        asked.clear()
        assert double.load(1) == 2  # still cached
        assert asked == []
        assert double.load(2) == 4  # evicted: asked for again
        assert asked == [[2]]


# -- 2. batch.py: @request_batch over a @staticmethod ------------------------------------


def test_request_batch_over_a_staticmethod_unwraps_it_into_a_working_loader() -> None:
    """The docstring's way out for methods is a @staticmethod: decorated from above, the
    loader must wrap the function itself (not the staticmethod object) and batch its loads,
    reached through the class or an instance."""
    asked: list[list[int]] = []

    def rows(keys: list[int]) -> list[str]:
        asked.append(list(keys))
        return [f"row{k}" for k in keys]

    class Repo:
        load_rows = request_batch(staticmethod(rows))
        load_more = request_batch(max_batch_size=10)(staticmethod(rows))

    for loader in (Repo.load_rows, Repo.load_more):
        assert loader.__wrapped__ is rows
        assert "Repo" not in repr(loader)  # named after the function, not a method
    with request_scope():
        assert Repo().load_rows.load_many([1, 2]) == ["row1", "row2"]
        assert Repo.load_rows.load(1) == "row1"  # a hit, through the class
        assert Repo.load_more([3]) == ["row3"]
    assert asked == [[1, 2], [3]]


# -- 3. _batching.py spread: a tuple or an iterator of values ----------------------------


def test_a_batch_function_may_return_a_tuple_or_an_iterator_in_key_order() -> None:
    """A sequence other than a list, or a one-shot iterator, is a valid result: its values
    are matched to the keys in order (an iterator cannot be measured before listing it)."""

    @request_batch
    def as_tuple(keys: list[int]) -> tuple[int, ...]:
        return tuple(10 * k for k in keys)

    @request_batch
    def as_generator(keys: list[int]) -> Any:  # an Iterator[str]
        return (f"v{k}" for k in keys)

    @request_batch
    def as_map(keys: list[int]) -> Any:
        return map(str, keys)

    with request_scope():
        assert as_tuple.load_many([3, 1, 2]) == [30, 10, 20]
        assert as_generator.load_many([5, 4]) == ["v5", "v4"]
        assert as_generator.load(4) == "v4"  # cached from the iterator's values
        assert as_map([7, 8]) == ["7", "8"]
        assert as_generator.cache_info().hits == 1


def test_a_short_iterator_is_still_refused_by_its_length() -> None:
    """Listing an iterator must not skip the length check: one value for two keys fails."""

    @request_batch
    def short(keys: list[int]) -> Any:  # an Iterator[int]
        return iter(keys[:1])

    with request_scope(), pytest.raises(TypeError, match=r"returned 1 values for 2 keys"):
        short.load_many([1, 2])


# -- 4. _wrappers.py parameters(): an unhashable default ---------------------------------


def test_a_memo_with_an_unhashable_default_still_memoizes() -> None:
    """``def f(x, y=[])``: the default cannot be part of a hashed key, so the wrapper must
    fall back to keying by call shape; calls that omit ``y`` are memoized all the same."""
    calls: list[int] = []

    @request_memo
    def total(x: int, y: list[int] = []) -> int:  # noqa: B006 (the point of the test)
        calls.append(x)
        return x + len(y)

    with request_scope():
        assert total(1) == 1
        assert total(1) == 1
        assert total(2) == 2
        assert calls == [1, 2]
        assert total.cache_info().hits == 1
        with pytest.raises(UnhashableArguments):
            total(1, [9])  # an unhashable argument passed explicitly is still refused


# -- 5. _shared.py: cache_clear() while a shared computation is in flight ----------------


def test_cache_clear_during_a_shared_computation_keeps_its_result_out() -> None:
    """``SharedTier.clear``: what is in flight for the function stores nothing (it may
    have read data the clear was meant to drop). The caller still gets its value."""
    shared: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(maxsize=100)
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @request_memo(shared=shared)
    def slow(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            started.set()
            assert release.wait(5)
        return 100 * len(calls) + x

    got: list[int] = []

    def request() -> None:
        with request_scope():
            got.append(slow(1))

    thread = threading.Thread(target=request)
    thread.start()
    try:
        assert started.wait(5)
        slow.cache_clear()  # from outside any scope: the shared tier is cleared anyway
    finally:
        release.set()
        thread.join(5)
    assert got == [101]  # the in-flight caller's own result
    assert len(shared) == 0  # ... never stored after the clear
    with request_scope():
        assert slow(1) == 201  # so the next request computes again
    assert len(shared) == 1


# -- 6. _metrics.py: the bound on distinct function names --------------------------------


def test_metrics_count_function_names_past_the_bound_under_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Running totals keep at most ``MAX_NAMES`` names; a function first seen past the
    bound is counted under ``(other functions)``, while the names kept go on counting."""
    monkeypatch.setattr(_metrics, "MAX_NAMES", 2)

    def memo(name: str) -> Any:
        def fn(x: int) -> int:
            return x

        fn.__qualname__ = name
        return request_memo(fn)

    first, second, third, fourth = (memo(n) for n in ("first", "second", "third", "fourth"))
    reader = InMemoryMetricReader()
    otel.instrument(MeterProvider(metric_readers=[reader]))
    try:
        for fn in (first, second, third, fourth, first):
            with request_scope():
                fn(1)
        found = points(reader)
    finally:
        otel.uninstrument()
    misses = {p.attributes[otel.FUNCTION]: p.value for p in found["perrequest.memo.misses"]}
    assert misses == {
        f"{__name__}.first": 2,
        f"{__name__}.second": 1,
        _metrics.OTHER: 2,  # third and fourth
    }


# -- 7. django: the middleware listed twice, under the async path -----------------------


async def test_django_middleware_listed_twice_under_asgi_shares_one_store() -> None:
    """``_acall``: the inner copy sees the outer one's scope open for this request and
    passes through, so the middleware between them and the view share one store."""
    hooks.CLOSED.clear()
    twice = [SCOPE_MW, "django_project.middleware.lookup_middleware", SCOPE_MW]
    with django_project.use_settings(project_settings), override_settings(MIDDLEWARE=twice):
        response = await AsyncClient().get("/async/")
    assert response.status_code == 200, response.content
    seen = json.loads(response.content)
    assert seen["mw"] == seen["lookup"]  # the middleware's lookup reached the view
    assert seen["lookups"] == 1
    assert len(hooks.CLOSED) == 1  # one scope opened, and closed
    hooks.CLOSED.clear()


# -- 8. django/toolbar.py: the store in the ASGI scope; the subtitle of no stats ---------


async def test_the_toolbar_panel_finds_the_store_left_in_the_asgi_scope() -> None:
    """Under perrequest's ASGI middleware the store is in ``request.scope``, not in
    ``request.META``: the panel must find it there, even where it is not active."""
    found: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        perrequest.get_or_set("k", lambda: 1)
        request = ASGIRequest(scope, io.BytesIO())
        assert REQUEST_KEY not in request.META
        found.append(perrequest.current_store())
        # A context without the scope active: only request.scope leads to the store.
        found.append(contextvars.Context().run(toolbar._request_store, request))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "",
        "headers": [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    await AsgiScopeMiddleware(app)(scope, receive, send)
    active, through_scope = found
    assert isinstance(active, MemoStore)
    assert through_scope is active


def test_the_toolbar_subtitle_of_no_stats_is_empty_and_of_an_idle_store_has_no_saving() -> None:
    """Before the panel has recorded anything its subtitle is empty (not "no request
    scope", which would be a claim); a store that did nothing shows zeros, no time saved."""
    bar = SimpleNamespace(stats={})
    panel = toolbar.PerRequestPanel(bar, lambda request: None)
    assert panel.nav_subtitle == ""
    bar.stats[panel.panel_id] = toolbar._collect(MemoStore(), frozenset())
    assert panel.nav_subtitle == "0 hits, 0 misses"
    bar.stats[panel.panel_id] = toolbar._collect(None, frozenset())
    assert panel.nav_subtitle == "no request scope"


@pytest.mark.parametrize(
    ("saved_ms", "subtitle"),
    [
        (0.004, "3 hits, 1 misses"),
        (0.04, "3 hits, 1 misses, 0.04 ms saved"),
        (12.345, "3 hits, 1 misses, 12.35 ms saved"),
    ],
)
def test_the_toolbar_subtitle_shows_time_saved_as_the_panel_does(
    saved_ms: float, subtitle: str
) -> None:
    """Two decimals, as the panel's table; no "0.00 ms saved" (a probe saw "0.0 ms")."""
    bar = SimpleNamespace(stats={})
    panel = toolbar.PerRequestPanel(bar, lambda request: None)
    bar.stats[panel.panel_id] = {"scope": True, "hits": 3, "misses": 1, "saved_ms": saved_ms}
    assert panel.nav_subtitle == subtitle


# -- 9. _redis_io.py: a value pickle cannot store ----------------------------------------


def test_an_unpicklable_value_fails_the_call_with_a_type_error_naming_the_function(
    redis_server: Any,
) -> None:
    """With ``serializer="pickle"`` a value pickle refuses (with ``AttributeError`` or
    ``PicklingError``, neither a ``TypeError``) must surface as the documented ``TypeError``
    naming the function and the serializer, store nothing in Redis, and not be cached."""
    with redis_server.client() as client:
        cache = RedisCache(client, ttl=60, namespace="up", serializer="pickle", secret=SECRET)
        calls: list[int] = []

        @request_memo(shared=cache)
        def handler(x: int) -> Any:
            calls.append(x)
            return lambda: x  # pickle refuses a local function

        try:
            for _ in range(2):
                with request_scope(), pytest.raises(TypeError) as caught:
                    handler(1)
                message = str(caught.value)
                assert f"{__name__}" in message and "handler" in message
                assert "'pickle' cannot store" in message and "<lambda>" in message  # (pickle's
                # own words differ between CPythons: "Can't pickle", "Can't get local object")
            assert calls == [1, 1]  # the failure was not cached
            assert [k for k in client.scan_iter() if not k.endswith((b":lock", b":gen"))] == []
        finally:
            cache.close()


class _QuoteError(Exception):  # pickles; unpickling calls __init__(message) alone
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def test_a_value_that_pickles_but_cannot_load_back_fails_naming_the_function(
    redis_server: Any,
) -> None:
    """A value that pickle stores but cannot load (an exception whose __init__ takes more
    than its args) failed every call with the unpickler's own bare error, naming neither
    the function nor the serializer (a probe, 7 December 2026)."""
    with redis_server.client() as client:
        cache = RedisCache(client, ttl=60, namespace="ul", serializer="pickle", secret=SECRET)

        @request_memo(shared=cache)
        def quote(country: str) -> Any:
            return {"country": country, "errors": [_QuoteError(404, "no carrier")]}

        try:
            with request_scope(), pytest.raises(TypeError) as caught:
                quote("FR")
            message = str(caught.value)
            assert "quote" in message and "'pickle' cannot store (_QuoteError.__init__()" in message
            assert "can store and load" in message
        finally:
            cache.close()


# -- 10. otel.py: a scope that did nothing ------------------------------------------------


def test_otel_records_nothing_for_a_scope_that_did_nothing(
    reader: InMemoryMetricReader,
) -> None:
    """A scope with no hits, misses or entries (a static file, a probe) must add no
    histogram sample and set no span attribute: it would drown the real requests."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer(__name__)
    try:
        with tracer.start_as_current_span("GET /health"), request_scope():
            pass
        found = points(reader)
        [span] = exporter.get_finished_spans()
    finally:
        provider.shutdown()
    assert "perrequest.scope.entries" not in found
    assert "perrequest.scope.saved" not in found
    assert not [name for name in span.attributes or {} if name.startswith("perrequest.")]
    with request_scope():  # the control: a scope that did something is recorded
        perrequest.get_or_set("k", lambda: 1)
    [entries] = points(reader)["perrequest.scope.entries"]
    assert entries.count == 1


# -- 11. input checks ----------------------------------------------------------------------


def test_decorating_a_non_function_says_what_it_takes() -> None:
    """A decorator factory applied to a non-callable names what it decorates."""
    with pytest.raises(TypeError, match=r"@request_memo decorates a function or method, not 42"):
        request_memo(max_entries=1)(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"@request_scope\(\) decorates a function, not 42"):
        request_scope()(42)  # type: ignore[arg-type]


def test_redis_cache_refuses_a_ttl_below_a_millisecond() -> None:
    """Redis expiries are whole milliseconds: 0.5 ms would round to nothing."""
    with pytest.raises(ValueError, match=r"ttl=0\.0005.*milliseconds"):
        RedisCache(_offline_client(), ttl=0.0005, namespace="t")
    assert RedisCache(_offline_client(), ttl=0.001, namespace="t").ttl == 0.001  # the edge


def test_redis_versions_of_a_bad_type_or_with_separators_are_refused() -> None:
    """The version is part of every key: a str or int, without ':' or spaces."""
    for bad in (2.5, True, "", None):
        with pytest.raises(TypeError, match=r"RedisCache\(version=\.\.\.\) must be a non-empty"):
            RedisCache(_offline_client(), ttl=1, namespace="t", version=bad)  # type: ignore[arg-type]
    cache = RedisCache(_offline_client(), ttl=1, namespace="t")
    with pytest.raises(ValueError, match=r"request_memo\(version=\.\.\.\) must not contain"):

        @request_memo(shared=cache, version="v 2")
        def f(x: int) -> int:
            return x


def test_redis_cache_refuses_a_max_value_bytes_that_is_no_int() -> None:
    """A byte count must be an int (a str or a float is a mistake, not a size)."""
    for bad in ("x", 1.5, True):
        with pytest.raises(TypeError, match=r"max_value_bytes=\.\.\.\) must be an int"):
            RedisCache(_offline_client(), ttl=1, namespace="t", max_value_bytes=bad)  # type: ignore[arg-type]


def test_redis_cache_refuses_sentinel_and_custom_pools() -> None:
    """The cache builds a pool of its own like the client's: only plain pools can be copied."""

    class OwnPool(redis.ConnectionPool):
        pass

    sentinel = redis.sentinel.Sentinel([("127.0.0.1", 1)]).master_for("main")
    custom = redis.Redis(connection_pool=OwnPool(host="127.0.0.1", port=1))
    for client, pool in ((sentinel, "SentinelConnectionPool"), (custom, "OwnPool")):
        with pytest.raises(TypeError, match=rf"on a {pool} is not supported.*Sentinel"):
            RedisCache(client, ttl=1, namespace="t")


def test_redis_cache_refuses_a_secret_that_is_neither_str_nor_bytes() -> None:
    """A secret of another type (an int, a bytearray) is refused by its type's name."""
    for bad, kind in ((1234567890123456789, "int"), (bytearray(b"x" * 32), "bytearray")):
        with pytest.raises(TypeError, match=rf"secret=\.\.\.\) must be str or bytes, not {kind}"):
            RedisCache(_offline_client(), ttl=1, namespace="t", secret=bad)  # type: ignore[arg-type]


def test_a_store_of_no_entries_is_refused() -> None:
    """``MemoStore(max_entries=0)`` could hold nothing: ``None`` is how to say unbounded."""
    with pytest.raises(
        ValueError, match=r"MemoStore\(max_entries=\.\.\.\) must be a positive int or None, not 0"
    ):
        MemoStore(max_entries=0)
    with pytest.raises(
        TypeError, match=r"MemoStore\(max_entries=\.\.\.\) must be a positive int or None"
    ):
        MemoStore(max_entries=1.5)  # type: ignore[arg-type]


def test_get_or_set_reads_a_memo_key_but_never_writes_one() -> None:
    """A key listed from the store is a memo's entry: ``get_or_set`` may read it, but
    filling it would write what only the memo writes."""

    @request_memo
    def square(x: int) -> int:
        return x * x

    with request_scope() as store:
        assert square(3) == 9
        [key] = list(store)
        assert type(key) is MemoKey
        assert store.get_or_set(key, lambda: -1) == 9  # present: read, factory not called
        square.cache_clear()
        with pytest.raises(
            TypeError, match=r"is a memo entry: its @request_memo or @request_batch"
        ):
            store.get_or_set(key, lambda: -1)
        assert list(store) == []  # nothing was written


def test_a_batch_key_function_returning_an_unhashable_value_is_named() -> None:
    """``key=`` must return a hashable cache key; the error blames the key function."""

    def unhashable(row: int) -> Any:
        return [row]

    @request_batch(key=unhashable)
    def load(keys: list[int]) -> list[int]:
        return keys

    with request_scope():
        for call in (lambda: load.load(1), lambda: load.load_many([1, 2])):
            with pytest.raises(UnhashableArguments, match=r"the key= function of @request_batch"):
                call()


def test_an_unhashable_reason_is_cut_short_and_one_that_cannot_be_read_is_left_out() -> None:
    """A type's own reason for refusing hashing is quoted, at most 200 characters of it; a
    reason whose ``str()`` raises leaves the type alone named (a review of the change)."""

    class Chatty:
        def __hash__(self) -> int:
            raise TypeError("x" * 5000)

    class Broken(TypeError):
        def __str__(self) -> str:
            raise RuntimeError("str broke")

    class Mute:
        def __hash__(self) -> int:
            raise Broken()

    @request_memo
    def f(x: object) -> object:
        return x

    with request_scope():
        with pytest.raises(perrequest.UnhashableArguments) as chatty:
            f(Chatty())
        with pytest.raises(perrequest.UnhashableArguments, match=r"unhashable \(Mute\), so"):
            f(Mute())
    assert f"(Chatty: {'x' * 200}), so" in str(chatty.value)


# -- guards a second coverage pass found unreached ------------------------------------------


def test_a_factory_without_a_signature_raising_typeerror_gets_its_own_error() -> None:
    """store._binds_no_arguments: a builtin factory whose signature cannot be read (``iter``)
    raising its own TypeError: that error, not the ValueError of reading its signature."""
    with request_scope() as store, pytest.raises(TypeError, match=r"^iter expected"):
        store.get_or_set("k", iter)
    assert list(store) == []


def test_an_on_close_without_a_signature_is_trusted() -> None:
    """_checks.check_on_close: a builtin whose signature cannot be read (``dir``) is called,
    not refused with the ValueError of reading its signature."""
    seen: list[object] = []
    with request_scope(on_close=dir):
        pass
    perrequest.add_scope_listener(dir)
    try:
        with request_scope(on_close=seen.append):
            pass
    finally:
        perrequest.remove_scope_listener(dir)
    assert len(seen) == 1


def test_a_parameter_named_like_the_generated_code_s_names_is_keyed_all_the_same() -> None:
    """_wrappers.parameters: a parameter named ``__pr_*`` (the generated wrapper's own
    names, ``__pr_get`` among them) gets the generic wrapper (keyed by call shape, as
    ``functools.lru_cache`` keys), never one whose parameter hides a name it uses."""
    calls: list[int] = []

    @request_memo
    def double(__pr_get: int) -> int:
        calls.append(__pr_get)
        return 2 * __pr_get

    with request_scope():
        assert [double(1), double(1), double(2), double(2)] == [2, 2, 4, 4]
    assert calls == [1, 2]


def test_warnings_outside_a_scope_stop_at_the_bound_of_names(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """memo.refuse_or_warn: once ``_WARNED_MAX`` names were warned about, a new one is
    called without a warning, and not remembered: the set stays bounded."""
    from perrequest import memo

    monkeypatch.setattr(memo, "warned_outside", set())
    monkeypatch.setattr(memo, "_WARNED_MAX", 1)

    @request_memo
    def first() -> int:
        return 1

    @request_memo
    def second() -> int:
        return 2

    with caplog.at_level("WARNING", logger="perrequest"):
        assert (first(), second(), first()) == (1, 2, 1)
    warned = [r.getMessage() for r in caplog.records if "outside a request scope" in r.message]
    assert len(warned) == 1 and ".first was called" in warned[0]
    assert len(memo.warned_outside) == 1


def test_a_batch_entry_listed_from_the_store_names_its_loader() -> None:
    """_batching._BatchSpec.__repr__: a loader's entry shows up as a ``MemoKey`` whose
    owner names the batch function, not an object address."""

    @request_batch
    def labels(keys: list[int]) -> list[str]:
        return [str(key) for key in keys]

    with request_scope() as store:
        assert labels.load(7) == "7"
        [key] = list(store)
        assert type(key) is MemoKey and key.key == 7
        assert repr(key.owner) == f"<request_batch {__name__}.{labels.__qualname__}>"


def test_a_shared_cache_that_cannot_store_is_logged_once_per_function(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """_shared.SharedCache._fill: a cache whose ``getsizeof`` raises on every value fails at
    each miss; that is said once per function, not once per miss."""
    cache = cachetools.LRUCache(maxsize=10_000, getsizeof=len)  # len(int) raises TypeError

    @request_memo(shared=cache)
    def price(item: str) -> int:
        return len(item)

    with caplog.at_level("ERROR", logger="perrequest"), request_scope():
        assert [price("a"), price("bb"), price("ccc")] == [1, 2, 3]
    logged = [r for r in caplog.records if "could not store a value" in r.getMessage()]
    assert len(logged) == 1 and len(cache) == 0


def test_a_function_whose_signature_cannot_be_read_gets_the_generic_wrapper() -> None:
    """_wrappers.parameters: a plain function whose signature inspect cannot read (one
    ``functools.partialmethod`` makes over a builtin without one) is memoized by call
    shape, not refused with the ValueError of reading its signature."""

    class Holder:
        names = functools.partialmethod(dir)

    listed = request_memo(Holder.names)
    with request_scope():
        first = listed(3)
        assert first == dir(3) and listed(3) is first


def test_prometheus_instrument_defaults_to_the_global_registry() -> None:
    """prometheus.instrument(): no registry given is prometheus-client's global ``REGISTRY``
    (not refused as a registry of the wrong type); uninstrument() twice is harmless."""
    from prometheus_client import REGISTRY

    from perrequest import prometheus

    @request_memo
    def double(x: int) -> int:
        return 2 * x

    prometheus.instrument()
    try:
        with request_scope():
            double(1)
        name = f"{__name__}.{double.__qualname__}"
        assert REGISTRY.get_sample_value("perrequest_memo_misses_total", {"function": name}) == 1
    finally:
        prometheus.uninstrument()
    prometheus.uninstrument()
    assert not prometheus.is_instrumented()
    assert REGISTRY.get_sample_value("perrequest_memo_misses_total", {"function": name}) is None


def test_a_class_methods_cache_delete_without_arguments_finds_nothing() -> None:
    """_checks.check_instance: ``cache_delete()`` of a class method taking ``*args``, given
    no arguments at all, has no class to check: it deletes nothing, as a call would key
    ``Repo.find()``, and is not refused for a missing class."""

    class Repo:
        @request_memo
        @classmethod
        def find(cls, *ids: int) -> tuple[int, ...]:
            return ids

    with request_scope():
        assert Repo.find(1, 2) == (1, 2)
        assert Repo.find.cache_delete() is False
        assert Repo.find.cache_delete(Repo, 1, 2) is True


def test_an_unhashable_tuple_subclass_of_hashable_items_is_named_alone() -> None:
    """_checks.unhashable_because: a tuple type that refuses hashing itself (``__hash__ =
    None``) holds nothing at fault: the message names the type, and no item."""

    class Row(tuple[int, ...]):
        __hash__ = None  # type: ignore[assignment]

    with request_scope() as store:
        with pytest.raises(TypeError, match=r"must be hashable, not Row: use a tuple"):
            store[Row((1, 2))] = 1
        assert list(store) == []


async def test_an_asgi_scope_carrying_a_closed_layers_cell_gets_a_store_of_its_own() -> None:
    """asgi.RequestScopeMiddleware: an ASGI scope dict used again (a test calling the app
    twice with one dict) carries the cell of a scope closed since; inside a scope of the
    caller's, the request opens one of its own, neither the caller's nor the closed one."""
    seen: list[MemoStore | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(perrequest.current_store())

    middleware = AsgiScopeMiddleware(app)
    scope: dict[str, Any] = {"type": "http", "path": "/"}
    await middleware(scope, None, None)
    with request_scope() as outer:
        await middleware(scope, None, None)
        assert perrequest.current_store() is outer
    first, second = seen
    assert first is not None and first.closed
    assert second is not None and second is not outer and second is not first and second.closed
