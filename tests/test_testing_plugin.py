"""The pytest plugin: the memo_scope fixture and the perrequest_outside_scope option."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # each test runs pytest in a subprocess

pytest_plugins = ["pytester"]

USER_TEST = """
from perrequest import request_batch, request_memo

@request_memo  # outside_scope="warn", the default
def lookup(key):
    return key

@request_batch
def names(keys):
    return [str(key) for key in keys]

def test_called_outside_any_scope():
    assert lookup(1) == 1

def test_loader_called_outside_any_scope():
    assert names.load(1) == "1"

def test_inside_the_fixture(memo_scope):
    assert lookup(2) == 2 and len(memo_scope) == 1

@request_memo(outside_scope="call")  # meant to run outside requests too: its author's choice
def label(key):
    return str(key)

def test_a_memo_declared_call_runs_outside_any_scope():
    assert label(3) == "3"
"""


def test_by_default_a_memo_outside_a_scope_is_called_and_warned_about(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(USER_TEST)
    result = pytester.runpytest_subprocess()  # the plugin loads through its entry point
    result.assert_outcomes(passed=4)


@pytest.mark.parametrize("how", ["flag", "ini"])
def test_the_option_makes_every_memo_and_loader_outside_a_scope_raise(
    pytester: pytest.Pytester, how: str
) -> None:
    pytester.makepyfile(USER_TEST)
    if how == "ini":
        pytester.makeini("[pytest]\nperrequest_outside_scope = raise\n")
        result = pytester.runpytest_subprocess()
    else:
        result = pytester.runpytest_subprocess("--perrequest-outside-scope=raise")
    result.assert_outcomes(passed=2, failed=2)  # the fixture's test, and the "call" memo's
    result.stdout.fnmatch_lines(
        ["*NoActiveScope*lookup was called outside a request scope (the tests'*"]
    )
    result.stdout.fnmatch_lines(["*NoActiveScope*names was called outside a request scope*"])


def test_a_bad_option_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USER_TEST)
    pytester.makeini("[pytest]\nperrequest_outside_scope = loud\n")
    result = pytester.runpytest_subprocess()
    result.stderr.fnmatch_lines(
        ["*perrequest_outside_scope = 'loud': use one of warn, call, raise*"]
    )
    assert result.ret != 0
