"""Unit tests of memoized code, with the memo_scope fixture.

Run it: `pytest test_pricing.py`
"""

from collections.abc import Iterator

import pytest
from perrequest import MemoStore, request_memo
from perrequest.testing import assert_no_live_scopes


@request_memo
def price(sku: str) -> int:
    return len(sku)


@pytest.fixture(autouse=True)
def no_leaked_scopes() -> Iterator[None]:
    yield
    assert_no_live_scopes()  # every scope the test opened was closed


def test_pricing(memo_scope: MemoStore) -> None:  # a fresh scope
    assert price("apple") == price("apple") == 5
    assert memo_scope.stats.hits == 1


def test_each_test_gets_its_own_store(memo_scope: MemoStore) -> None:
    assert len(memo_scope) == 0
