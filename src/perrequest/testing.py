"""Helpers for test suites: count open scopes, and a ``memo_scope`` pytest fixture.

Registered as a pytest plugin through the ``pytest11`` entry point, so the
fixture is available wherever perrequest is installed.
"""

from __future__ import annotations

from collections.abc import Iterator

from .scope import live_scopes, request_scope
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
