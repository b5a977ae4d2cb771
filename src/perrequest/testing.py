"""Helpers for test suites: count open scopes, a ``memo_scope`` pytest fixture, and
the ``perrequest_outside_scope`` option (``raise``: every memo and loader left at
``outside_scope="warn"`` fails the test when called outside a scope, so a forgotten
middleware or ``bind_scope`` shows up).

Registered as a pytest plugin through the ``pytest11`` entry point, so all of
it is available wherever perrequest is installed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from typing import Any

from . import memo
from ._active import _current, _unwound, close_request, close_scope, live_scopes
from .scope import in_request_scope, request_scope
from .store import MemoStore

__all__ = ["assert_no_live_scopes", "live_scopes"]

_NOTHING: Any = object()


def assert_no_live_scopes() -> None:
    """Fail when any scope is still open: a request or job that never ended."""
    count = live_scopes()
    if count:
        here = (
            " One of them is active here, where this was called: the memo_scope fixture's, "
            "or a request_scope() around this call; check after it closes."
            if in_request_scope()
            else ""
        )
        raise AssertionError(
            f"{count} perrequest scope(s) are still open. Something opened a scope and never "
            "closed it: a response iterable whose close() was not called, a request_scope() "
            f"entered without exiting, or a streaming body that was never consumed.{here}"
        )


try:
    import pluggy
    import pytest
except ImportError:  # pragma: no cover - the helpers above work without pytest
    pytest = None  # type: ignore[assignment]
# The plugin needs pytest 7+ (StashKey) and pluggy 1.1+ (force_exception); with older ones
# (docs/testing.md) only the helpers above are here, and a suite runs as without perrequest.
if hasattr(pytest, "StashKey") and hasattr(getattr(pluggy, "Result", None), "force_exception"):

    @pytest.fixture
    def memo_scope() -> Iterator[MemoStore]:
        """Run the test inside a fresh request scope and yield its store."""
        with request_scope() as store:
            yield store

    __all__ += ["memo_scope"]

    def pytest_addoption(parser: pytest.Parser) -> None:
        help = (
            "what every @request_memo and @request_batch left at outside_scope='warn' does "
            "when called outside a request scope during the tests: warn, call or raise"
        )
        parser.addini("perrequest_outside_scope", help)
        parser.addoption("--perrequest-outside-scope", choices=memo.OUTSIDE_SCOPE, help=help)

    _OVERRIDDEN = pytest.StashKey[str | None]()

    def pytest_configure(config: pytest.Config) -> None:
        mode = config.getoption("--perrequest-outside-scope", None) or config.getini(
            "perrequest_outside_scope"
        )
        if not mode:
            return
        if mode not in memo.OUTSIDE_SCOPE:
            raise pytest.UsageError(
                f"perrequest_outside_scope = {mode!r}: use one of {', '.join(memo.OUTSIDE_SCOPE)}"
            )
        # Given back as it was: a run inside this one (pytester) ends before it does.
        config.stash[_OVERRIDDEN] = memo.outside_override
        memo.outside_override = mode

    def pytest_unconfigure(config: pytest.Config) -> None:
        if _OVERRIDDEN in config.stash:
            memo.outside_override = config.stash[_OVERRIDDEN]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, None]:
        """A test that leaves a scope active (``request_scope().__enter__()`` without its
        exit) fails, and the scope is closed: every test after it would share its store.
        An async test is checked in its own context (see ``_in_its_context``)."""
        before = _current.get()
        left_in_its_context: list[bool] = []
        found = _async_test(item)
        if found is not None:  # run wrapped, then given back
            holder, name, function = found
            funcargs = getattr(item, "funcargs", {})
            setattr(holder, name, _in_its_context(function, funcargs, left_in_its_context))
        outcome = yield
        if found is not None:
            setattr(holder, name, function)
        left = _close_left_open(before) or bool(left_in_its_context)
        if left and outcome.excinfo is None:  # the message alone: no trace of pluggy's
            outcome.force_exception(_left_active(item.nodeid))

    # The scope a fixture's set-up (an xunit setup_function's too) left active, by fixture:
    # still open once the teardown its fixture is finalized in has ended (every finalizer
    # run: an ExitStack fixture's, the node's), it was entered and never exited, and every
    # test in between shared its store (a fixture that yields inside
    # ``with request_scope():`` has closed it by then).
    _opened_by: dict[object, tuple[object, Any]] = {}
    _finalized: list[tuple[object, object, Any]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(fixturedef: object) -> Generator[None, Any, None]:
        before = _current.get()
        yield
        opened = _left_open(before)
        if opened is not None:
            _opened_by[fixturedef] = before, opened

    def pytest_fixture_post_finalizer(fixturedef: Any) -> None:
        if fixturedef in _opened_by:
            _finalized.append((fixturedef.argname, *_opened_by.pop(fixturedef)))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown() -> Generator[None, Any, None]:
        outcome = yield
        failure = None
        for name, before, opened in _finalized:
            if _left_open(None, opened) is None:  # closed, as it should be
                continue
            _close(opened)
            if _current.get() is opened or _current.get() is _store_of(opened):
                _current.set(before)
            # pytest runs setup_function and its kin as fixtures
            who = (
                "An xunit setup_*()" if str(name).startswith("_xunit_") else f"The fixture {name!r}"
            )
            failure = failure or _left_active(who)
        _finalized.clear()
        if failure is not None and outcome.excinfo is None:
            outcome.force_exception(failure)

    def _left_active(who: str) -> BaseException:
        return pytest.fail.Exception(
            f"{who} left a perrequest scope active: a request_scope() entered and never "
            "exited (its __enter__ called by hand, an ExitStack never closed). It is closed "
            "now; the tests after this one would have shared its store. Use 'with "
            "request_scope():', or the memo_scope fixture.",
            pytrace=False,
        )


def _async_test(item: object) -> tuple[Any, str, Any] | None:
    """An async test's coroutine function, where anyio's plugin and pytest-asyncio's find
    it: (object, attribute, function); the test's function (``item.obj``), or under
    Hypothesis' ``@given``, its inner test. None for another test (an async generator,
    which neither runs)."""
    test: Any = getattr(item, "obj", None)
    holder, name = (test.hypothesis, "inner_test") if hasattr(test, "hypothesis") else (item, "obj")
    function = getattr(holder, name, None)
    return (holder, name, function) if inspect.iscoroutinefunction(function) else None


def _in_its_context(
    test: Callable[..., Awaitable[Any]], funcargs: dict[str, Any], left: list[bool]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """``test``, run with ``memo_scope``'s store active in its own context; the scopes it
    leaves active there are closed, and ``True`` is appended to ``left``. That
    context is not pytest's: anyio runs the async fixtures and tests sharing its runner
    (kept by a module-scoped async fixture, say) in one task, made as the first of them
    starts, where a store that a sync fixture makes active later is not, and one left
    active stays for the next test; pytest-asyncio runs a test in a copy of pytest's."""

    @functools.wraps(test)
    async def in_its_context(*args: Any, **kwargs: Any) -> Any:
        store, here = funcargs.get("memo_scope"), _left_open(None)
        if type(store) is not MemoStore or store._closed:
            store = None
        elif here is not None and not (
            type(here) is MemoStore and here._opened_at < store._opened_at
        ):
            store = None  # the latest opened wins, as nested scopes do: an async fixture's
        token = _current.set(store) if store is not None else None
        before = _current.get()
        try:
            return await test(*args, **kwargs)
        finally:
            if _close_left_open(before):
                left.append(True)
            if token is not None:
                _current.reset(token)

    return in_its_context


def _close_left_open(before: object) -> bool:
    """Close the scopes active here that were opened since ``before`` was, the latest first,
    and make ``before`` active again; say whether there was one."""
    found = False
    for _ in range(100):  # scopes opened one inside another, the latest first
        left = _left_open(before)
        if left is None:
            break
        found = True
        _close(left)
        if _current.get() is left:  # not undone here (opened in another context)
            _current.set(before)
    return found


def _close(left: Any) -> None:
    """Close ``left``: a ``request_scope()`` (no middleware leaves its scope active: each
    gives the thread back as the app returns, and a body's chunks get it around each one)."""
    if type(left) is list:  # a middleware's cell, made active by hand
        close_request(left, None)
    else:
        close_scope(left)


def _left_open(before: object, left: Any = _NOTHING) -> Any:
    """``left`` (by default, the scope active here) if it is open and not ``before`` (nor
    the store made from ``before``, a middleware's cell, since), or None. A closed one left
    active (closed in another thread) is harmless: the next look unwinds it, as here."""
    left = _unwound(_current.get()) if left is _NOTHING else left
    if left is before or left is None or left is _store_of(before):
        return None
    return left if (left[0] is not None if type(left) is list else not left._closed) else None


def _store_of(cell: object) -> object:
    """The store made from a middleware's cell (by the first memo that needed one), or None."""
    return cell[1] if type(cell) is list and len(cell) > 1 else None
