"""Guards found by a block-deletion mutation pass of the observability modules
(``prometheus``, ``testing``, ``django.toolbar``, ``_metrics``, ``_stats``): each test
fails when one block of theirs is deleted. Real parts only: a prometheus-client
registry, the scope machinery itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from perrequest import get_or_set, memo, prometheus, request_scope
from perrequest.testing import assert_no_live_scopes

pytest_plugins = ["pytester"]

SRC = Path(__file__).resolve().parents[1] / "src"


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


def test_instrumenting_another_registry_unregisters_the_first() -> None:
    """Moved to another registry, perrequest's metrics leave the first: it exposes none
    of them, and instrumenting it again later finds no clash with perrequest's own."""
    first, second = CollectorRegistry(), CollectorRegistry()
    prometheus.instrument(first)
    try:
        prometheus.instrument(second)
        assert "perrequest_" not in generate_latest(first).decode()
        assert "perrequest_scope_entries" in generate_latest(second).decode()
        prometheus.instrument(first)
        assert "perrequest_scope_entries" in generate_latest(first).decode()
    finally:
        prometheus.uninstrument()


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


def test_the_testing_helpers_import_without_pytest() -> None:
    """``assert_no_live_scopes`` is for any test runner: without pytest the module
    imports, and only the fixture and hooks are missing."""
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "import perrequest.testing as testing\n"
        "from perrequest import request_scope\n"
        "with request_scope():\n"
        "    try:\n"
        "        testing.assert_no_live_scopes()\n"
        "    except AssertionError:\n"
        "        print('open')\n"
        "testing.assert_no_live_scopes()\n"
        "print(sorted(testing.__all__))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["open", "['assert_no_live_scopes',", "'live_scopes']"]


def test_an_inner_pytest_run_with_the_option_gives_the_outer_run_its_own_back(
    pytester: pytest.Pytester,
) -> None:
    """A run of pytest inside the tests with ``--perrequest-outside-scope`` set the mode
    for the rest of the outer run, unless its end gives the outer one back."""
    before = memo.outside_override
    mode = "call" if before != "call" else "raise"
    pytester.makepyfile(
        f"""
        from perrequest import memo

        def test_in_force():
            assert memo.outside_override == {mode!r}
        """
    )
    result = pytester.runpytest_inprocess(f"--perrequest-outside-scope={mode}", "-p", "no:asyncio")
    result.assert_outcomes(passed=1)
    assert memo.outside_override == before


def test_a_star_import_of_the_testing_helpers_brings_the_fixture() -> None:
    """``from perrequest.testing import *`` in a conftest makes ``memo_scope`` a fixture
    there (the plugin not loaded: autoload off)."""
    namespace: dict[str, object] = {}
    exec("from perrequest.testing import *", namespace)
    assert {"memo_scope", "assert_no_live_scopes", "live_scopes"} <= set(namespace)
