"""Helpers for test suites: count open scopes, a ``memo_scope`` pytest fixture, and
the ``perrequest_outside_scope`` option (``raise``: every memo and loader left at
``outside_scope="warn"`` fails the test when called outside a scope, so a forgotten
middleware or ``bind_scope`` shows up).

Registered as a pytest plugin through the ``pytest11`` entry point, so all of
it is available wherever perrequest is installed.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import memo
from ._active import live_scopes
from .scope import request_scope
from .store import MemoStore

__all__ = ["assert_no_live_scopes", "live_scopes"]


def assert_no_live_scopes() -> None:
    """Fail when any scope is still open: a request or job that never ended."""
    count = live_scopes()
    if count:
        raise AssertionError(
            f"{count} perrequest scope(s) are still open. Something opened a scope and never "
            "closed it: a response iterable whose close() was not called, a request_scope() "
            "entered without exiting, or a streaming body that was never consumed."
        )


try:
    import pytest
except ImportError:  # pragma: no cover - the helpers above work without pytest
    pass
else:

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
        memo.outside_override = mode

    def pytest_unconfigure(config: pytest.Config) -> None:
        memo.outside_override = None
