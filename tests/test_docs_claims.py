"""What the docs say, checked against the code: quoted messages, named options, claims.

tests/test_docs.py runs the snippets; this file keeps the sentences true that
no snippet runs: an error message a page quotes, a default a page states, the
advice a page promises the message gives.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import itertools
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import perrequest
from perrequest import NoActiveScope, request_batch, request_memo, request_scope

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _error(fn: object) -> BaseException:
    assert callable(fn)
    with pytest.raises(BaseException) as info:
        fn()
    return info.value


def _in_a_plain_thread(fn: object) -> BaseException:
    """Run ``fn`` in a thread that does not copy the context, inside a scope."""
    assert callable(fn)
    caught: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed back to the test
            caught.append(exc)

    with request_scope():
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=10)
    assert not thread.is_alive() and caught
    return caught[0]


# -- errors.md: NoActiveScope's "what to do" -------------------------------------------------


def test_no_active_scope_in_a_thread_says_to_use_bind_scope() -> None:
    """errors.md: inside a request, NoActiveScope "usually means code runs in a thread
    started without the context: use bind_scope". The message must say so too: a
    FastAPI user whose middleware is registered, calling current_store() from
    run_in_executor, was told only to add the middleware."""
    exc = _in_a_plain_thread(perrequest.current_store)
    assert isinstance(exc, NoActiveScope)
    assert "perrequest.bind_scope(fn)" in str(exc), str(exc)
    assert "run_in_executor" in str(exc), str(exc)


def test_a_raising_memo_in_a_thread_says_to_use_bind_scope() -> None:
    @request_memo(outside_scope="raise")
    def price(sku: str) -> int:
        return len(sku)

    exc = _in_a_plain_thread(lambda: price("apple"))
    assert isinstance(exc, NoActiveScope)
    assert "outside_scope='raise'" in str(exc), str(exc)
    assert "perrequest.bind_scope(fn)" in str(exc), str(exc)


def test_bind_scope_outside_a_scope_says_where_to_call_it() -> None:
    exc = _error(lambda: perrequest.bind_scope(print))
    assert isinstance(exc, NoActiveScope)
    assert "Call it inside the request" in str(exc)


# -- errors.md and faq.md: the quoted messages ------------------------------------------------


def test_did_you_mean_max_entries_as_quoted() -> None:
    """faq.md and errors.md quote: request_memo(maxsize=10) raises
    `TypeError: ... Did you mean max_entries=?`."""
    exc = _error(lambda: request_memo(maxsize=10))
    assert type(exc) is TypeError and "Did you mean max_entries=?" in str(exc)
    for page in ("faq.md", "errors.md"):
        assert "Did you mean max_entries=?" in (DOCS / page).read_text()


def test_outside_scope_warning_reads_as_errors_md_quotes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """errors.md quotes the WARNING; each quoted piece is in the logged message."""

    @request_memo
    def quoted_warning_claim(x: int) -> int:
        return x

    with caplog.at_level(logging.WARNING, logger="perrequest"):
        quoted_warning_claim(1)
    (record,) = [r for r in caplog.records if r.name == "perrequest"]
    message = record.getMessage()
    page = (DOCS / "errors.md").read_text()
    quote = re.search(r'The WARNING reads: "(.*?)" It is logged', page, re.S)
    assert quote, "errors.md no longer quotes the WARNING: update this test"
    pieces = [p.strip() for p in quote[1].replace("\n", " ").split("...")]
    pieces = [re.sub(r"`module\.function`", "{name}", p) for p in pieces]
    name = f"{quoted_warning_claim.__module__}.{quoted_warning_claim.__qualname__}"
    for piece in pieces:
        for part in piece.split("{name}"):
            assert part.replace("`", "").strip(" .,") in message.replace("`", ""), (
                f"errors.md quotes {part!r}; the WARNING is {message!r}"
            )
    assert name in message


# -- the defaults the pages state are the signatures' -----------------------------------------


def _defaults(obj: object) -> dict[str, object]:
    import inspect

    assert callable(obj)
    return {
        name: p.default
        for name, p in inspect.signature(obj).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_stated_defaults_are_the_signatures() -> None:
    from perrequest.asgi import RequestScopeMiddleware as Asgi
    from perrequest.flask import PerRequest
    from perrequest.wsgi import RequestScopeMiddleware as Wsgi

    assert perrequest.DEFAULT_MAX_ENTRIES == 10_000  # "10 000" in index.md, semantics.md
    for page in ("index.md", "semantics.md"):
        assert "10 000" in (DOCS / page).read_text()
    # frameworks/asgi.md's options fragment
    asgi = (DOCS / "frameworks" / "asgi.md").read_text()
    assert _defaults(Asgi) == {"max_entries": 10_000, "scope_types": ("http",), "on_close": None}
    for shown in ("max_entries=10_000,", 'scope_types=("http",),', "on_close=None,"):
        assert shown in asgi
    assert _defaults(Wsgi) == {"max_entries": 10_000, "on_close": None}
    # frameworks/flask.md's signature line
    flask = (DOCS / "frameworks" / "flask.md").read_text()
    assert "`PerRequest(app=None, *, max_entries=10_000, on_close=None)`" in flask
    assert _defaults(PerRequest) == {"app": None, "max_entries": 10_000, "on_close": None}
    assert _defaults(request_memo) == {
        "fn": None,
        "key": None,
        "typed": False,
        "max_entries": None,
        "outside_scope": "warn",
        "shared": None,
        "version": None,
    }


def test_redis_md_defaults_are_the_signatures() -> None:
    pytest.importorskip("redis")
    from perrequest.redis import RedisCache

    page = (DOCS / "redis.md").read_text()
    defaults = _defaults(RedisCache)
    stated = {
        "lock_timeout": ("`lock_timeout` (default 5 s)", 5.0),
        "op_timeout": ("**`op_timeout`** (default 0.5 s)", 0.5),
        "max_value_bytes": ("`max_value_bytes` (default 1 MiB)", 1024 * 1024),
        "retry_after": ("**`retry_after`** (default 1 s)", 1.0),
    }
    for name, (sentence, value) in stated.items():
        assert sentence in page, f"redis.md no longer says {sentence!r}: update this test"
        assert defaults[name] == value, f"redis.md says {sentence}; the code's is {defaults[name]}"
    assert "ttl" not in defaults and "namespace" not in defaults  # required, as stated


# -- frameworks/django.md: the ImproperlyConfigured table ------------------------------------


def _table_rows(page: Path, header: str, nth: int = 0) -> list[list[str]]:
    """The rows of the ``nth`` Markdown table whose header line starts with ``header``."""
    lines = page.read_text().splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith(header)][nth]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def _quoted_pieces(cell: str) -> list[str]:
    """The literal parts of a quoted message: `a ... b` is a and b."""
    (quote,) = re.findall(r"`([^`]+)`", cell)
    return [piece.strip() for piece in quote.split("...") if piece.strip()]


DJANGO_MISTAKES: dict[str, object] = {
    "`PERREQUEST` not a dict": [1],
    "an unknown key": {"MAX_ENTIRES": 3},
    "`MAX_ENTRIES` not an int": {"MAX_ENTRIES": "100"},
    "`ON_CLOSE` a dotted path that does not import": {"ON_CLOSE": "nowhere.record"},
    "`ON_CLOSE` not callable": {"ON_CLOSE": 3},
    "`ON_CLOSE` the dotted path of a module": {"ON_CLOSE": "django_project"},
}


def test_django_settings_errors_read_as_the_table_quotes() -> None:
    pytest.importorskip("django")
    import django_project

    django_project.setup()  # as tests/test_django.py: unless configured already
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from perrequest.django import RequestScopeMiddleware

    rows = _table_rows(DOCS / "frameworks" / "django.md", "| mistake | message says |")
    assert len(rows) == len(DJANGO_MISTAKES)
    for mistake, says in rows:
        (value,) = [v for k, v in DJANGO_MISTAKES.items() if mistake.startswith(k)]
        with override_settings(PERREQUEST=value), pytest.raises(ImproperlyConfigured) as info:
            RequestScopeMiddleware(lambda request: None)
        for piece in _quoted_pieces(says):
            assert piece in str(info.value), f"django.md: {mistake}: {piece!r} not in {info.value}"


# -- errors.md: every configuration mistake raises what its table says -----------------------


class _Repo:
    def rows(self, keys: list[int]) -> list[int]:
        return keys


def _gen() -> object:
    yield 1


def _wsgi_app(environ: object, start_response: object) -> list[bytes]:
    return []


async def _asgi_app(scope: object, receive: object, send: object) -> None:
    return None


async def _async_on_close(stats: object) -> None:
    return None


def _enter_class_itself() -> None:
    with request_scope:  # type: ignore[attr-defined]
        pass


def _config_mistakes() -> dict[str, list[object]]:
    """errors.md's first column (its start) -> calls that each make that mistake."""
    import collections

    import cachetools

    from perrequest.asgi import RequestScopeMiddleware as Asgi
    from perrequest.wsgi import RequestScopeMiddleware as Wsgi

    return {
        "`max_entries` not an int": [
            lambda v=v: request_scope(max_entries=v) for v in ("10", 1.5, True)
        ],
        "`max_entries` zero or negative": [lambda: request_scope(max_entries=0)],
        "`on_close` not callable": [
            lambda: request_scope(on_close=1),
            lambda: request_scope(on_close=_async_on_close),
            lambda: request_scope(on_close=lambda a, b: None),
        ],
        "an unknown option name": [
            lambda: request_memo(maxsize=10),
            lambda: request_scope(max_entires=1),
            lambda: Asgi(_asgi_app, max_entires=1),
            lambda: Wsgi(_wsgi_app, max_entires=1),
            lambda: perrequest.request_batch(maxsize=1),
        ],
        "`request_memo(outside_scope=...)`": [lambda: request_memo(outside_scope="ignore")],
        "`request_memo(key=...)`": [
            lambda: request_memo(key=_async_on_close),
            lambda: request_memo(typed=1),
        ],
        "`request_memo(shared=...)` a `dict`": [
            lambda: request_memo(shared={}),
            lambda: request_memo(shared=collections.OrderedDict()),
        ],
        "`request_memo(shared=...)` given a class": [
            lambda: request_memo(shared=cachetools.LRUCache)
        ],
        "`RedisCache(ttl=None)`": [],  # tests/test_redis.py (needs redis-py)
        "`RedisCache` on something else": [],  # tests/test_redis.py
        "`request_memo(version=...)`": [
            lambda: request_memo(version=2),
            lambda: request_memo(version=2, shared=cachetools.LRUCache(10)),
        ],
        "`@request_memo`, `@request_scope()` or `bind_scope` on a generator": [
            lambda: request_memo(_gen),
            lambda: request_scope()(_gen),
        ],
        "`@request_batch` on a method": [
            lambda: request_batch(lambda ids, db: ids),
            lambda: request_batch(_Repo.rows),
        ],
        "`@request_memo` over `@functools.lru_cache`": [
            lambda: request_memo(functools.lru_cache(_coroutine)),
            lambda: request_memo()(functools.cache(_coroutine)),
        ],
        "`@request_memo` over `@property`": [
            lambda: request_memo(property(_coroutine)),
            lambda: request_memo(functools.cached_property(_coroutine)),
        ],
        "`@request_memo` over `functools.singledispatchmethod`": [
            lambda: request_memo(functools.singledispatchmethod(_coroutine)),
            lambda: request_memo(functools.partialmethod(_coroutine)),
        ],
        "`@request_scope()` on a class": [lambda: request_scope()(Exception)],
        "`@method_decorator(request_memo)`": [],  # test_bad_input.py (its call raises)
        "the WSGI middleware given a class": [lambda: Wsgi(_FlaskLike)],
        "`import perrequest.prometheus`": [],  # tests/test_extras.py (hides the package)
        "`add_scope_listener(None)`": [lambda: perrequest.add_scope_listener(None)],
        "`@request_scope` without the parentheses": [lambda: request_scope(print)],
        "`with request_scope:`": [_enter_class_itself],
        "`MemoStore(on_close=...)`": [lambda: perrequest.MemoStore(on_close=print)],
        '`scope_types` containing `"lifespan"`': [
            lambda: Asgi(_asgi_app, scope_types=("lifespan",))
        ],
        "the ASGI middleware": [lambda: Asgi(_wsgi_app), lambda: Wsgi(_asgi_app)],
        "the ASGI or WSGI middleware listed": [
            lambda: Asgi(_get_response),
            lambda: Wsgi(_get_response),
        ],  # and the Django one: test_django.py
        "a bad `settings.PERREQUEST`": [],  # test_django_settings_errors_read_as_the_table_quotes
    }


class _FlaskLike:  # its instances are the app
    def __call__(self, environ: object, start_response: object) -> object:
        return []


def _get_response(request: object) -> object:  # as Django makes each MIDDLEWARE class
    return request


async def _coroutine() -> int:
    return 1


def _runtime_mistakes() -> dict[str, list[object]]:
    """errors.md's "can only be seen when the code runs" table -> calls making each."""

    @request_memo
    def returns_a_coroutine() -> object:
        return _coroutine()

    @request_memo
    def returns_a_generator() -> object:
        return (x for x in [1])

    @request_memo
    async def returns_unawaited() -> object:
        return _coroutine()

    def assign_a_memo_key() -> None:
        @request_memo
        def f(x: int) -> int:
            return x

        f(1)
        store = perrequest.current_store()
        (memo_key,) = list(store)
        store[memo_key] = 2

    def exit_unentered() -> None:
        request_scope().__exit__(None, None, None)

    def key_for_another_signature() -> None:
        class Repo:
            @request_memo(key=lambda user_id: user_id)
            def user(self, user_id: int) -> int:
                return user_id

        Repo().user(1)

    @request_batch
    def counts_wrong(keys: list[Any]) -> list[Any]:
        return [*keys, 0]

    @request_batch
    def lacks_a_key(keys: list[Any]) -> dict[Any, Any]:
        return {}

    @request_batch
    def returns_a_set(keys: list[Any]) -> Any:
        return set(keys)

    @request_batch
    def returns_generators(keys: list[Any]) -> list[Any]:
        return [(key for _ in range(2)) for key in keys]

    @request_batch
    def sorts_its_keys(keys: list[Any]) -> list[Any]:
        keys.sort()
        return keys

    return {
        "a `@request_batch` function that returns another number": [lambda: counts_wrong.load(1)],
        "a `@request_batch` function whose mapping lacks": [lambda: lacks_a_key.load(1)],
        "a `@request_batch` function that returns something else": [lambda: returns_a_set.load(1)],
        "a `@request_batch` function that changes": [lambda: sorts_its_keys.load_many([2, 1])],
        "a `@request_batch` function returns, as a key's value": [
            lambda: returns_generators.load(1)
        ],
        "an unhashable load key": [lambda: counts_wrong.load([1, 2])],
        "a sync memoized function (or one run by": [returns_a_coroutine],
        "a memoized function returns a generator": [
            returns_a_generator,
            request_memo(lambda: itertools.islice([1], 1)),
        ],
        "an `async def` memo returns a coroutine it did not await": [
            lambda: asyncio.run(returns_unawaited())
        ],
        "`@request_memo` over `@contextlib.contextmanager`": [
            request_memo(contextlib.contextmanager(_gen)),
        ],
        "a `shared=RedisCache(...)` memo called with": [],  # tests/test_redis.py
        "a `shared=RedisCache(...)` memo returning": [],  # tests/test_redis.py
        "an unhashable key": [
            lambda: perrequest.get([1]),
            lambda: perrequest.set([1], 1),
            lambda: perrequest.current_store().__contains__([1]),
        ],
        "`get_or_set(key, 42)`": [lambda: perrequest.get_or_set("k", 42)],
        "`get_or_set(key, make)`": [lambda: perrequest.get_or_set("k", lambda key: key)],
        "`get_or_set` with a factory that returns a coroutine": [
            lambda: perrequest.get_or_set("k", _coroutine)
        ],
        "a `key=` function that cannot take": [key_for_another_signature],
        "assigning to a memo entry's key": [assign_a_memo_key],
        "exiting a `request_scope()` object": [exit_unentered],
    }


@pytest.mark.parametrize(
    ("nth", "mistakes", "in_scope"),
    [(0, _config_mistakes, False), (1, _runtime_mistakes, True)],
    ids=["configuration", "runtime"],
)
def test_every_mistake_raises_what_errors_md_says(
    nth: int, mistakes: Callable[[], dict[str, list[object]]], in_scope: bool
) -> None:
    """errors.md's two mistake tables: configuration, then mistakes made in a scope."""
    rows = _table_rows(DOCS / "errors.md", "| mistake | error |", nth=nth)
    checks = mistakes()
    unmatched = [m for m, _ in rows if not any(m.startswith(k) for k in checks)]
    assert not unmatched, f"errors.md rows without a check here: {unmatched}"
    for mistake, error in rows:
        (calls,) = [v for k, v in checks.items() if mistake.startswith(k)]
        named = set(
            re.findall(r"`(\w+Error|\w+Arguments|ImproperlyConfigured)`", error.split(":")[0])
        )
        assert named, f"errors.md: {mistake}: no exception class named in {error!r}"
        for call in calls:
            with request_scope() if in_scope else contextlib.nullcontext():
                exc = _error(call)
            assert type(exc).__name__ in named, f"{mistake}: {type(exc).__name__}: {exc}"


# -- the tests the pages cite exist -----------------------------------------------------------


def test_every_test_a_page_cites_exists() -> None:
    """security.md and reliability.md say which test checks each guarantee: a renamed
    or removed test must take the sentence with it."""
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    missing = []
    for page in pages:
        text = page.read_text()
        for path, name in re.findall(r"(tests/\w+\.py)::(\w+)", text):
            source = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
            if not re.search(rf"^(?:def|class|async def) {name}\b|^{name} = ", source, re.M):
                missing.append(f"{page.name}: {path}::{name}")
        for path in re.findall(r"(?<![\w/])(tests/\w+\.py)\b", text):
            if not (ROOT / path).is_file():
                missing.append(f"{page.name}: {path}")
        for name in re.findall(r"`(test_\w+)`", text):
            in_tests = any(
                re.search(rf"def {name}\b", p.read_text()) for p in (ROOT / "tests").glob("*.py")
            )
            if not in_tests and not (ROOT / "tests" / f"{name}.py").is_file():
                missing.append(f"{page.name}: {name}")
    assert not missing, f"pages cite tests that do not exist: {missing}"


# -- links between pages ----------------------------------------------------------------------


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug, as mkdocs makes a heading's anchor."""
    import unicodedata

    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.replace("`", ""))
    text = unicodedata.normalize("NFKD", text)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _prose(page: Path) -> str:
    return re.sub(r"^(`{3,}).*?^\1", "", page.read_text(), flags=re.S | re.M)


def test_links_between_pages_and_their_anchors_exist() -> None:
    """mkdocs checks docs/ in strict mode; README.md, read on GitHub and PyPI, too."""
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    anchors = {
        page.resolve(): {_slug(h) for h in re.findall(r"^#+\s+(.*)$", _prose(page), re.M)}
        for page in pages
    }
    dead = []
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page.resolve()
            if not target.exists():
                dead.append(f"{page.relative_to(ROOT)}: {link}")
            elif anchor and target.suffix == ".md" and anchor not in anchors.get(target, set()):
                dead.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not dead, f"dead links: {dead}"


def test_exiting_an_unentered_scope_says_what_to_do() -> None:
    """DESIGN.md, Errors: every misuse's message says what to do instead."""
    exc = _error(lambda: request_scope().__exit__(None, None, None))
    assert type(exc) is RuntimeError
    assert "not entered" in str(exc) and "`with request_scope():`" in str(exc), str(exc)


def test_a_bad_listener_is_told_how_to_stop_one() -> None:
    """errors.md: add_scope_listener(None) -> TypeError "(to stop one,
    remove_scope_listener)": None is what a caller passes meaning "no listener"."""
    exc = _error(lambda: perrequest.add_scope_listener(None))  # type: ignore[arg-type]
    assert type(exc) is TypeError and "remove_scope_listener" in str(exc), str(exc)


def test_a_loader_outside_a_scope_names_the_same_fixes_as_a_memo(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """batching.md: a loader's outside_scope is request_memo's; semantics.md: the WARNING
    names the fix, bind_scope for a thread included. The loader's named only the
    middleware and request_scope()."""

    @perrequest.request_batch
    def loader_outside(keys: list[int]) -> list[int]:
        return keys

    @request_memo
    def memo_outside(key: int) -> int:
        return key

    with caplog.at_level(logging.WARNING, logger="perrequest"):
        loader_outside.load(1)
        memo_outside(1)
    loader, memo = (r.getMessage() for r in caplog.records if r.name == "perrequest")
    for fix in ("PerRequest(app)", "perrequest.django.RequestScopeMiddleware", "bind_scope"):
        assert fix in memo and fix in loader, (fix, loader)


def test_every_example_run_under_uvicorn_resets_contextvars() -> None:
    """README: "Under uvicorn, run with --reset-contextvars". examples/graphql_app.py's
    ``__main__`` ran ``uvicorn.run(app, ...)`` without it, while its docstring, and the
    other examples, pass it."""
    runs = []
    for path in sorted([*ROOT.glob("examples/**/*.py"), *ROOT.glob("docs/snippets/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "uvicorn.run":
                given = {k.arg: ast.unparse(k.value) for k in node.keywords}
                runs.append((path.relative_to(ROOT).as_posix(), given.get("reset_contextvars")))
    assert len(runs) >= 4, runs  # the glob found them
    assert [run for run in runs if run[1] != "True"] == []


def test_every_extra_the_pages_name_is_in_pyproject() -> None:
    """The FastAPI page said ``pip install perrequest fastapi`` where every other framework
    page names an extra: ``perrequest[fastapi]`` now exists, and every extra a page or an
    error message names is one pyproject.toml declares."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = set(extras["optional-dependencies"])
    texts = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("src/**/*.py")]
    named = {e for p in texts for e in re.findall(r"perrequest\[(\w+)\]", p.read_text())}
    assert "fastapi" in named and {"prometheus", "otel", "toolbar"} <= named
    assert named <= declared, named - declared
    assert "pip install perrequest fastapi" not in (DOCS / "frameworks/fastapi.md").read_text()
