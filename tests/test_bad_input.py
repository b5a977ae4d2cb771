"""Bad input: arbitrary argument structures through @request_memo never give a wrong
cached result and never an internal error.

- ``typed=True``: every result is identical to the plain function's, in type
  and value all the way down (``1``/``1.0``/``True``, ``0.0``/``-0.0``, inside
  tuples and frozensets too).
- untyped: equal arguments are one call, as with ``functools.lru_cache``; each
  result equals the plain function's.
- unhashable arguments (lists, dicts, sets, anywhere inside) raise
  ``UnhashableArguments`` naming the parameter, and nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perrequest import MemoStore, UnhashableArguments, request_memo, request_scope

# Hypothesis warns that the nested strategies' repr is long; it is only a repr.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

NAN = float("nan")
# Very large values, drawn by name so that hypothesis never prints them whole.
BIG = {
    "int": 7**2000,
    "-int": -(7**2000),
    "str": "long-" * 40_000,  # 200 KB
    "bytes": b"long-" * 40_000,
}

# Values that are equal to each other but not the same: where a memo goes wrong.
clashing: st.SearchStrategy[Any] = st.sampled_from(
    [0, 0.0, -0.0, False, 1, 1.0, True, -1, -1.0, NAN, "", b"", None, (), frozenset()]
)
scalars = st.one_of(
    clashing,
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(),  # nan, inf and -0.0 included
    st.text(max_size=10),
    st.binary(max_size=10),
    st.sampled_from(sorted(BIG)).map(BIG.__getitem__),
)
hashables = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.frozensets(inner, max_size=3),
    ),
    max_leaves=6,
)
keys = hashables
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.frozensets(keys, max_size=3),
        st.lists(inner, max_size=3),
        st.dictionaries(keys, inner, max_size=3),
        st.sets(keys, max_size=3),
    ),
    max_leaves=6,
)
KEYWORDS = st.sampled_from(["a", "b", "x", "y"])


def calls_of(values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, Any]]:
    """(args, kwargs) for ``plain(a=None, b=None, *rest, **kw)``."""
    return st.tuples(
        st.lists(values, max_size=3).map(tuple),
        st.dictionaries(KEYWORDS, values, max_size=2),
    )


def twin(value: Any, rnd: random.Random) -> Any:
    """An equal value, maybe of other types inside: 1 -> 1.0 or True, 0.0 -> -0.0, ..."""
    if isinstance(value, (bool, int, float)) and value == value and abs(value) < 2**53:
        choices = [v for v in (value, int(value), float(value), -float(value)) if v == value]
        choices += [bool(value)] if value in (0, 1) else []
        return rnd.choice(choices)
    if isinstance(value, tuple):
        return tuple(twin(v, rnd) for v in value)
    if isinstance(value, list):
        return [twin(v, rnd) for v in value]
    if isinstance(value, (frozenset, set)):
        return type(value)(twin(v, rnd) for v in value)
    if isinstance(value, dict):
        return {k: twin(v, rnd) for k, v in value.items()}
    return value


@st.composite
def call_sequences(draw: st.DrawFn) -> list[tuple[Any, Any]]:
    """Calls, each repeated with equal arguments of other types, in a random order."""
    calls = draw(st.lists(calls_of(anything), min_size=1, max_size=4))
    rnd = draw(st.randoms(use_true_random=False))
    sequence = [
        (twin(args, rnd), twin(kwargs, rnd)) for call in calls for args, kwargs in [call] * 3
    ]
    rnd.shuffle(sequence)
    return [call for call in sequence if fits(*call)]


def plain(a: Any = None, b: Any = None, *rest: Any, **kw: Any) -> tuple[Any, ...]:
    """Returns its arguments, so a result from another call is visible."""
    return ("result", a, b, rest, kw)


def fits(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Keyword 'a'/'b' together with that many positionals is a TypeError, not our case."""
    return not any(name in kwargs for name in ("a", "b")[: len(args)])


def same(x: Any, y: Any) -> bool:
    """Equal, with the same types all the way down and the same sign of zero."""
    if type(x) is not type(y):
        return False
    if isinstance(x, float):
        if math.isnan(x):
            return math.isnan(y)
        return x == y and math.copysign(1, x) == math.copysign(1, y)
    if isinstance(x, tuple):
        return len(x) == len(y) and all(map(same, x, y))
    if isinstance(x, dict):
        return list(x) == list(y) and all(same(x[k], y[k]) for k in x)
    if isinstance(x, frozenset):
        return x == y and all(any(same(a, b) for b in y) for a in x)
    return bool(x == y)


def unhashable_parameter(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The name UnhashableArguments must give: the first unhashable argument's."""
    named = dict(zip(["a", "b"], args, strict=False))
    named |= {name: kwargs[name] for name in ("a", "b") if name in kwargs}
    named |= {f"rest[{i}]": value for i, value in enumerate(args[2:])}
    named |= {name: value for name, value in kwargs.items() if name not in ("a", "b")}
    for name, value in named.items():
        try:
            hash(value)
        except TypeError:
            return name
    return None


def run_memo(
    memo: Callable[..., Any], sequence: list[tuple[Any, Any]]
) -> list[tuple[tuple[Any, ...], dict[str, Any], Any]]:
    """Each call with its outcome: the result, or the UnhashableArguments raised."""
    outcomes = []
    for args, kwargs in sequence:
        try:
            outcome: Any = memo(*args, **kwargs)
        except UnhashableArguments as exc:
            outcome = exc
        outcomes.append((args, kwargs, outcome))
    return outcomes


def check_unhashable(args: tuple[Any, ...], kwargs: dict[str, Any], outcome: Any) -> bool:
    """True when the call was refused, and then for the right reason, naming the argument."""
    name = unhashable_parameter(args, kwargs)
    if name is None:
        assert not isinstance(outcome, UnhashableArguments), outcome
        return False
    assert isinstance(outcome, UnhashableArguments), (name, outcome)
    assert f"argument {name!r} is unhashable" in str(outcome)
    assert "key=" in str(outcome)
    return True


bounds = st.one_of(st.none(), st.integers(min_value=1, max_value=4))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(call_sequences(), bounds)
def test_typed_memo_results_are_identical_to_the_plain_function(
    sequence: list[tuple[Any, Any]], max_entries: int | None
) -> None:
    memo = request_memo(typed=True)(plain)
    with request_scope(max_entries=max_entries):
        for args, kwargs, outcome in run_memo(memo, sequence):
            if not check_unhashable(args, kwargs, outcome):
                assert same(outcome, plain(*args, **kwargs)), (args, kwargs, outcome)


@SETTINGS
@given(call_sequences())
def test_untyped_memo_makes_one_call_per_equal_arguments_like_lru_cache(
    sequence: list[tuple[Any, Any]],
) -> None:
    calls: list[tuple[Any, ...]] = []

    def counted(a: Any = None, b: Any = None, *rest: Any, **kw: Any) -> tuple[Any, ...]:
        calls.append((a, b, rest, kw))
        return plain(a, b, *rest, **kw)

    memo = request_memo(counted)
    first_result: dict[Any, Any] = {}  # the lru_cache model: equal arguments, one entry
    with request_scope(max_entries=None):
        for args, kwargs, outcome in run_memo(memo, sequence):
            if check_unhashable(args, kwargs, outcome):
                continue
            key = (args, tuple(kwargs.items()))
            if key in first_result:
                assert outcome is first_result[key]  # a hit: the first equal call's result
            else:
                assert outcome == plain(*args, **kwargs)
                first_result[key] = outcome
    assert len(calls) == len(first_result)


@SETTINGS
@given(calls_of(anything), st.booleans())
def test_only_unhashable_arguments_are_refused_and_the_plain_call_agrees(
    call: tuple[Any, Any], typed: bool
) -> None:
    args, kwargs = call
    memo = request_memo(typed=typed)(plain)
    if not fits(args, kwargs):
        return
    with request_scope() as store:
        [(_, _, outcome)] = run_memo(memo, [call])
        if check_unhashable(args, kwargs, outcome):
            assert len(store) == 0 and store.stats.misses == 0  # refused: neither
        else:
            assert same(outcome, plain(*args, **kwargs))
            assert store.stats.misses == 1


# -- misspelt options get a "did you mean" ------------------------------------------


def _flask_ext(**options: Any) -> Any:
    from perrequest.flask import PerRequest

    return PerRequest(**options)


def _celery_install(**options: Any) -> Any:
    from celery import Celery

    from perrequest.celery import install

    return install(Celery("typos"), **options)


def _asgi(**options: Any) -> Any:
    from perrequest.asgi import RequestScopeMiddleware

    return RequestScopeMiddleware(lambda *a: None, **options)


def _wsgi(**options: Any) -> Any:
    from perrequest.wsgi import RequestScopeMiddleware

    return RequestScopeMiddleware(lambda *a: None, **options)


@pytest.mark.parametrize(
    ("make", "typo", "meant"),
    [
        (lambda **o: request_memo(**o), "maxsize", "max_entries"),
        (lambda **o: request_memo(**o), "outside", "outside_scope"),
        (lambda **o: request_scope(**o), "max_entires", "max_entries"),
        (_asgi, "on_clsoe", "on_close"),
        (_asgi, "scope_type", "scope_types"),
        (_wsgi, "maxentries", "max_entries"),
        (_flask_ext, "on_closed", "on_close"),
        (_celery_install, "max_entry", "max_entries"),
        (lambda **o: MemoStore(**o), "maxsize", "max_entries"),
        (lambda **o: request_scope(**o), "MAX_ENTRIES", "max_entries"),  # as in settings
        (lambda **o: request_memo(**o), "MaxSize", "max_entries"),
    ],
)
def test_a_misspelt_option_names_the_closest_valid_one(make: Any, typo: str, meant: str) -> None:
    with pytest.raises(TypeError, match=f"unknown option {typo}=. Did you mean {meant}=?"):
        make(**{typo: 1})


def test_an_option_passed_positionally_says_options_are_keywords() -> None:
    """``RequestScopeMiddleware(app, 100)``: Python alone would only count arguments."""
    from perrequest.asgi import RequestScopeMiddleware as ASGIMiddleware
    from perrequest.flask import PerRequest
    from perrequest.wsgi import RequestScopeMiddleware as WSGIMiddleware

    for made in (ASGIMiddleware, WSGIMiddleware, PerRequest):
        app = None if made is PerRequest else (lambda *a: None)
        with pytest.raises(
            TypeError, match=r"takes its options as keywords \(max_entries=.*not 100"
        ):
            made(app, 100)  # type: ignore[misc]


def test_a_middleware_made_without_its_app_says_how_to_pass_it() -> None:
    """``app.add_middleware(RequestScopeMiddleware(max_entries=100))``: an instance, made
    without the app. Python alone said "missing 1 required positional argument: 'app'"."""
    from starlette.applications import Starlette

    from perrequest.asgi import RequestScopeMiddleware as ASGIMiddleware
    from perrequest.wsgi import RequestScopeMiddleware as WSGIMiddleware

    with pytest.raises(TypeError, match=r"add_middleware\(RequestScopeMiddleware, max_entries"):
        Starlette().add_middleware(ASGIMiddleware(max_entries=100))  # type: ignore[call-arg,arg-type]
    with pytest.raises(TypeError, match=r"needs the WSGI app it wraps: app = Request"):
        WSGIMiddleware(max_entries=100)  # type: ignore[call-arg]
    ASGIMiddleware(app=Starlette(), max_entries=100)  # the app as a keyword: fine
    WSGIMiddleware(app=lambda environ, start_response: [])


def test_a_store_you_make_takes_no_on_close() -> None:
    """Only a scope calls on_close: a store made by hand is never closed by one."""
    with pytest.raises(
        TypeError, match=r"MemoStore\(\) got an unknown option on_close=.*request_scope"
    ):
        MemoStore(on_close=print)  # type: ignore[call-arg]


def test_a_store_given_two_positional_arguments_is_named_memostore_in_the_error() -> None:
    """Python's own argument error names the class the user wrote, not a private base."""
    with pytest.raises(TypeError, match=r"^MemoStore\.__init__\(\) takes"):
        MemoStore(3, 4)  # type: ignore[call-arg]


def test_help_shows_the_options_not_the_catch_alls_that_explain_typos() -> None:
    """help(), IDEs and inspect show what to pass; *misused and **unknown only explain."""
    import inspect

    from perrequest.asgi import RequestScopeMiddleware as ASGIMiddleware
    from perrequest.flask import PerRequest
    from perrequest.wsgi import RequestScopeMiddleware as WSGIMiddleware

    for made, options in (
        (request_scope, ["max_entries", "on_close"]),
        (ASGIMiddleware, ["app", "max_entries", "scope_types", "on_close"]),
        (WSGIMiddleware, ["app", "max_entries", "on_close"]),
        (PerRequest, ["app", "max_entries", "on_close"]),
    ):
        assert list(inspect.signature(made).parameters) == options


def test_a_misspelt_add_middleware_option_says_where_it_came_from() -> None:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from perrequest.asgi import RequestScopeMiddleware

    app = Starlette()
    app.add_middleware(RequestScopeMiddleware, max_entrys=10)  # accepted here, used later
    with pytest.raises(TypeError, match=r"max_entrys=.*app\.add_middleware"), TestClient(app):
        pass


@pytest.mark.parametrize(
    ("make", "where"),
    [
        (lambda **o: request_scope(**o), "request_scope("),
        (lambda **o: MemoStore(**o), "MemoStore("),
        (_asgi, "perrequest.asgi.RequestScopeMiddleware("),
        (_wsgi, "perrequest.wsgi.RequestScopeMiddleware("),
        (_flask_ext, "PerRequest("),
        (_celery_install, "perrequest.celery.install("),
    ],
)
def test_a_bad_value_names_the_entry_point_and_the_option(make: Any, where: str) -> None:
    """Through ``app.add_middleware(..., max_entries="100")`` the error surfaces as
    Starlette builds its stack: "max_entries must be..." alone pointed nowhere (a probe)."""
    with pytest.raises(TypeError, match=rf"^{re.escape(where)}max_entries=\.\.\.\) must be"):
        make(max_entries="100")
    if where != "MemoStore(":  # a store has no on_close: a scope's option
        with pytest.raises(TypeError, match=rf"^{re.escape(where)}on_close=\.\.\.\) must be"):
            make(on_close="print")


# -- a probe of misuse (7 December): each was a confusing error, or nothing cached ----------


def test_request_memo_refuses_what_djangos_method_decorator_hands_it() -> None:
    """method_decorator wraps a partial of the bound method anew on every call: a new memo
    per call, nothing cached, the store filled to its bound."""
    from django.utils.decorators import method_decorator

    class Repository:
        @method_decorator(request_memo)
        def perms(self, user_id: int) -> set[str]:
            return set()

    with request_scope(), pytest.raises(TypeError, match="on the method itself"):
        Repository().perms(1)

    class Plain:
        def load(self) -> str:
            return "loaded"

    on_purpose = request_memo(functools.partial(Plain().load))  # made once: memoized
    with request_scope():
        assert on_purpose() == "loaded" and on_purpose() == "loaded"
        assert on_purpose.cache_info().hits == 1  # type: ignore[attr-defined]


def test_a_contextmanager_result_is_refused_not_cached_for_one_with() -> None:
    """Cached, the second ``with`` failed deep in contextlib ('... has no attribute args')."""
    import contextlib

    @request_memo
    @contextlib.contextmanager
    def connection(name: str) -> Any:
        yield name

    with request_scope(), pytest.raises(TypeError, match="good for one with block"):
        connection("db")


def test_the_wsgi_middleware_refuses_the_flask_class_for_an_app() -> None:
    """Accepted, every request failed inside Flask ('function' has no attribute 'rstrip')."""
    from flask import Flask

    from perrequest.wsgi import RequestScopeMiddleware

    with pytest.raises(TypeError, match=r"not the class Flask: .*Flask\(__name__\)"):
        RequestScopeMiddleware(Flask)

    class IterableApp:  # PEP 3333: a class whose instances, made per request, are the body
        def __init__(self, environ: Any, start_response: Any) -> None:
            start_response("200 OK", [])

        def __iter__(self) -> Any:
            yield b"ok"

    RequestScopeMiddleware(IterableApp)  # a WSGI app as it is


def test_a_loaders_argument_error_names_the_loader() -> None:
    """It named ``_sync_load.<locals>.load``, a private function."""
    from perrequest import request_batch

    @request_batch
    def users(keys: list[int]) -> list[int]:
        return keys

    with pytest.raises(TypeError, match=r"^test_a_loaders_argument_error_names_the_loader"):
        users.load(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"users\.load\(\) takes 1 positional argument"):
        users.load(1, 2)  # type: ignore[call-arg]


def test_no_live_scopes_inside_a_scope_says_which_is_open() -> None:
    """Called inside memo_scope, it blamed a leak: the open scope was the fixture's."""
    from perrequest.testing import assert_no_live_scopes

    with request_scope(), pytest.raises(AssertionError, match="active here, where this was"):
        assert_no_live_scopes()


def test_a_method_whose_instance_is_not_named_self_is_told_to_name_it() -> None:
    """A method whose first parameter is not ``self`` is keyed by its arguments, the
    instance among them: an unhashable instance (a plain dataclass) is told to name that
    parameter ``self`` (or give ``key=``), not to pass a tuple; a staticmethod's list
    keeps the usual advice."""

    @dataclasses.dataclass
    class Repo:
        n: int

        @request_memo
        def row(this, i: int) -> int:  # the misuse
            return i

        @staticmethod
        @request_memo
        def total(items: list[int]) -> int:
            return sum(items)

        @request_memo
        def merge(self, other: Repo) -> int:  # a method: its second parameter is no self
            return other.n

        @staticmethod
        @request_memo
        def add(a: Repo, b: Repo) -> int:  # an instance, not the instance: no rename
            return a.n + b.n

    with request_scope():
        with pytest.raises(
            UnhashableArguments,
            match=r"'this' is the first parameter of .*"
            r"Repo\.row.*name it self",
        ):
            Repo(1).row(2)
        with pytest.raises(UnhashableArguments, match=r"a tuple instead of a list") as refused:
            Repo.total([1])
        assert "name it self" not in str(refused.value)
        with pytest.raises(UnhashableArguments, match=r"argument 'other'") as refused:
            Repo(1).merge(Repo(2))
        assert "name it self" not in str(refused.value)
        with pytest.raises(
            UnhashableArguments,
            match=r"If it is the instance, .*Otherwise make "
            r"Repo hashable",
        ):
            Repo.add(Repo(1), Repo(2))
