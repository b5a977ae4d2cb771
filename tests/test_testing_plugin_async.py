"""The pytest plugin with async tests: memo_scope is active in them, and one that leaves a
scope active fails, under anyio's plugin (asyncio and trio) and pytest-asyncio's."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # each test runs pytest in a subprocess

pytest_plugins = ["pytester"]

# Both backends, one module-scoped runner each: every async fixture and test of the module
# runs in one task of anyio's, made as the first of them starts.
_ANYIO = """
import pytest

@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param

@pytest.fixture(scope="module")
async def app_client():  # an httpx.AsyncClient(transport=ASGITransport(app)), say
    yield "client"
"""


def test_memo_scope_is_active_in_an_anyio_test_after_an_async_fixture(
    pytester: pytest.Pytester,
) -> None:
    """anyio's runner task is made as the first async fixture starts, in a copy of the
    context then: memo_scope, a sync fixture set up after it, was not active in the test
    (its memos called outside any scope). Nor is its store active in the test after it."""
    pytester.makepyfile(
        _ANYIO
        + """
import perrequest
from perrequest import request_memo

@request_memo(outside_scope="raise")
async def price(sku):
    return len(sku)

@pytest.fixture
async def session():
    yield "session"

@pytest.mark.anyio
async def test_a_memo_scope_after_async_fixtures(app_client, session, memo_scope):
    assert perrequest.current_store() is memo_scope
    assert await price("abc") == 3 and len(memo_scope) == 1

@pytest.mark.anyio
class TestInAClass:
    async def test_b_memo_scope_in_a_method(self, app_client, memo_scope):
        assert perrequest.current_store() is memo_scope

@pytest.mark.anyio
async def test_c_the_next_test_runs_outside_any_scope(app_client):
    assert not perrequest.in_request_scope()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=6)  # three tests, two backends


def test_memo_scope_is_active_in_a_pytest_asyncio_test_after_an_async_fixture(
    pytester: pytest.Pytester,
) -> None:
    """pytest-asyncio runs a test in a copy of pytest's context, memo_scope's store active."""
    pytester.makepyfile(
        """
import pytest, pytest_asyncio, perrequest
from perrequest import request_memo

@request_memo(outside_scope="raise")
async def price(sku):
    return len(sku)

@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app_client():
    yield "client"

@pytest_asyncio.fixture
async def session():
    yield "session"

@pytest.mark.asyncio(loop_scope="module")
async def test_a_memo_scope_after_async_fixtures(app_client, session, memo_scope):
    assert perrequest.current_store() is memo_scope
    assert await price("abc") == 3 and len(memo_scope) == 1

@pytest.mark.asyncio(loop_scope="module")
async def test_b_the_next_test_runs_outside_any_scope(app_client):
    assert not perrequest.in_request_scope()
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)


_LEFT_OPEN = (
    "test_*::test_a_leaves_its_scope_open* left a perrequest scope active: a "
    "request_scope() entered*It is closed now*memo_scope fixture."
)


def test_an_anyio_test_that_leaves_a_scope_open_fails_and_the_next_sees_no_store(
    pytester: pytest.Pytester,
) -> None:
    """The check looked at pytest's context, not the runner task's that the test ran in:
    the test passed, and the next test of the module ran inside its store, reading its
    entries (a red-team's finding of 6 December 2026)."""
    pytester.makepyfile(
        _ANYIO
        + """
import perrequest
from perrequest import request_scope
from perrequest.testing import live_scopes

@pytest.mark.anyio
async def test_a_leaves_its_scope_open(app_client):
    request_scope().__enter__()
    perrequest.set("user", "alice")

@pytest.mark.anyio
async def test_b_sees_no_store(app_client):
    assert perrequest.get("user") is None and not perrequest.in_request_scope()
    assert live_scopes() == 0
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([_LEFT_OPEN, _LEFT_OPEN])


def test_a_pytest_asyncio_test_that_leaves_a_scope_open_fails_and_the_scope_is_closed(
    pytester: pytest.Pytester,
) -> None:
    """The check looked at pytest's context, not the copy the test ran in: the test
    passed, and its scope stayed open for the rest of the run."""
    pytester.makepyfile(
        """
import contextlib, pytest, perrequest
from perrequest import request_scope
from perrequest.testing import live_scopes

stacks = []

@pytest.mark.asyncio
async def test_a_leaves_its_scope_open():
    stacks.append(contextlib.ExitStack())
    stacks[-1].enter_context(request_scope())  # never closed

@pytest.mark.asyncio
async def test_a_leaves_its_scope_open_inside_memo_scope(memo_scope):
    request_scope().__enter__()

@pytest.mark.asyncio
async def test_b_sees_no_store():
    assert not perrequest.in_request_scope() and live_scopes() == 0

def test_c_sees_no_store_either():
    assert not perrequest.in_request_scope() and live_scopes() == 0
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([_LEFT_OPEN, _LEFT_OPEN])


def test_an_async_test_under_hypothesis_is_checked_too(pytester: pytest.Pytester) -> None:
    """Under Hypothesis' @given, anyio's plugin and pytest-asyncio's run its inner test,
    which is what is run in the test's context. An async generator, which neither runs,
    is left as it is."""
    pytester.makepyfile(
        _ANYIO
        + """
import perrequest
from hypothesis import given, settings, strategies as st
from perrequest import request_scope
from perrequest.testing import live_scopes

@settings(max_examples=3)
@given(st.integers())
@pytest.mark.anyio
async def test_a_leaves_its_scope_open_anyio(app_client, n):
    request_scope().__enter__()

@pytest.mark.anyio
async def test_b_sees_no_store(app_client):
    assert not perrequest.in_request_scope()

@settings(max_examples=3)
@given(st.integers())
@pytest.mark.asyncio
async def test_a_leaves_its_scope_open_pytest_asyncio(n):
    request_scope().__enter__()

@settings(max_examples=3)
@given(st.integers())
@pytest.mark.asyncio
async def test_c_closes_its_scope(n):
    with request_scope():
        perrequest.set("n", n)
        assert perrequest.get("n") == n

def test_d_sees_no_store():
    assert not perrequest.in_request_scope() and live_scopes() == 0

@pytest.mark.asyncio
async def test_e_an_async_generator():  # pytest-asyncio marks it xfail, not run
    yield
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-W", "ignore")
    result.assert_outcomes(passed=4, failed=3, xfailed=1)
    result.stdout.fnmatch_lines([_LEFT_OPEN, _LEFT_OPEN, _LEFT_OPEN])


def test_an_async_fixtures_own_scope_is_the_tests(pytester: pytest.Pytester) -> None:
    """An async fixture that opens a scope for the test (inside memo_scope's, say: the
    pattern docs/testing.md gives for anyio) is where the test runs: memo_scope's store
    was made active over it (a review)."""
    pytester.makepyfile(
        """
import pytest, pytest_asyncio, perrequest
from perrequest import request_scope

@pytest_asyncio.fixture
async def tenant_scope(memo_scope):
    with request_scope() as store:
        yield store

@pytest.mark.asyncio
async def test_in_the_async_fixtures_scope(tenant_scope):
    assert perrequest.current_store() is tenant_scope

@pytest.fixture
def anyio_backend():
    return "asyncio"

@pytest.fixture
async def tenant_scope_anyio(memo_scope):
    with request_scope() as store:
        yield store

@pytest.mark.anyio
async def test_anyio_in_the_async_fixtures_scope(tenant_scope_anyio):
    assert perrequest.current_store() is tenant_scope_anyio
"""
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_memo_scope_wins_over_a_module_fixtures_scope_opened_before_it(
    pytester: pytest.Pytester,
) -> None:
    """A module-scoped async fixture holding a scope open (anyio runs it in the module's
    one task): the scope opened latest is the test's, as nested scopes go, so memo_scope's
    fresh store, opened after it, is where each test runs. A first version kept whatever
    open scope was there: the tests ran in the module's store, the second one served the
    first one's entry (a second review)."""
    pytester.makepyfile(
        """
import pytest, perrequest
from perrequest import request_memo, request_scope

calls = []

@request_memo(outside_scope="raise")
async def price(sku):
    calls.append(sku)
    return len(sku)

@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"

@pytest.fixture(scope="module")
async def seeded():
    with request_scope() as store:
        await price("seed")
        yield store

@pytest.mark.anyio
async def test_a_runs_in_its_fresh_memo_scope(seeded, memo_scope):
    await price("abc")
    assert perrequest.current_store() is memo_scope and len(memo_scope) == 1

@pytest.mark.anyio
async def test_b_does_not_see_test_a_entries(seeded, memo_scope):
    before = len(calls)
    await price("abc")
    assert len(calls) == before + 1
"""
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)
