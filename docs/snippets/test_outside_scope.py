"""A forgotten scope fails the test, with the pytest option.

Run it: `pytest --perrequest-outside-scope=raise test_outside_scope.py`

With the option, every memo called outside a scope raises NoActiveScope,
so a test that forgot its scope fails instead of passing uncached.
"""

import pytest
from perrequest import MemoStore, NoActiveScope, request_memo


@request_memo(outside_scope="call")  # the option overrides this too
def price(sku: str) -> int:
    return len(sku)


def test_a_forgotten_scope_fails() -> None:
    with pytest.raises(NoActiveScope):
        price("apple")


def test_with_a_scope(memo_scope: MemoStore) -> None:
    assert price("apple") == 5
