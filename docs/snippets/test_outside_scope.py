"""A forgotten scope fails the test, with the pytest option.

Run it: `pytest --perrequest-outside-scope=raise test_outside_scope.py`

With the option, every memo left at the default (outside_scope="warn") raises
NoActiveScope outside a scope, so a test that forgot its scope fails instead of
passing uncached. A memo declared outside_scope="call" keeps calling through.
"""

import pytest
from perrequest import MemoStore, NoActiveScope, request_memo


@request_memo  # outside_scope="warn": the option makes it raise in the tests
def price(sku: str) -> int:
    return len(sku)


@request_memo(outside_scope="call")  # meant to run outside requests too
def label(sku: str) -> str:
    return sku.title()


def test_a_forgotten_scope_fails() -> None:
    with pytest.raises(NoActiveScope):
        price("apple")


def test_a_memo_declared_call_calls_through() -> None:
    assert label("apple") == "Apple"


def test_with_a_scope(memo_scope: MemoStore) -> None:
    assert price("apple") == 5
