"""Guards found by a block-deletion mutation pass of the observability modules
(``prometheus``, ``testing``, ``django.toolbar``, ``_metrics``, ``_stats``): each test
fails when one block of theirs is deleted. Real parts only: a prometheus-client
registry, the scope machinery itself."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from perrequest import get_or_set, prometheus, request_scope
from perrequest.testing import assert_no_live_scopes


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    prometheus.instrument(registry)
    yield registry
    prometheus.uninstrument()


def test_prometheus_records_nothing_for_a_scope_that_did_nothing(
    registry: CollectorRegistry,
) -> None:
    """A scope with no hits, misses or entries (a static file, a probe) adds no
    histogram sample (docs/observability.md): it would drown the real requests."""
    for _ in range(3):
        with request_scope():
            pass
    assert registry.get_sample_value("perrequest_scope_entries_count") == 0
    assert registry.get_sample_value("perrequest_scope_saved_seconds_count") == 0
    with request_scope():  # the control: a scope that did something is recorded
        get_or_set("k", lambda: 1)
    assert registry.get_sample_value("perrequest_scope_entries_count") == 1
    assert registry.get_sample_value("perrequest_scope_saved_seconds_count") == 1


def test_assert_no_live_scopes_fails_while_a_scope_is_open() -> None:
    assert_no_live_scopes()
    scope = request_scope()
    scope.__enter__()
    try:
        with pytest.raises(AssertionError, match=r"1 perrequest scope\(s\) are still open"):
            assert_no_live_scopes()
    finally:
        scope.__exit__(None, None, None)
    assert_no_live_scopes()
