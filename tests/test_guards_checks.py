"""Guards of the checks of what users pass in (_checks) that no other test needed: each test
here fails with its guard deleted (a block-deletion mutation pass of the core, 5 December
2026)."""

from __future__ import annotations

import asyncio
import functools
from unittest import mock

import pytest

from perrequest import request_memo, request_scope
from perrequest.errors import UnhashableArguments


def test_unhashable_arguments_that_do_not_bind_are_named_by_position() -> None:
    """A call keyed by its shape (typed=True) with an unhashable argument and one argument
    too many: the error still says which argument, by position, not inspect's
    "too many positional arguments"."""

    @request_memo(typed=True)
    def f(x: object) -> object:
        return x

    with request_scope(), pytest.raises(UnhashableArguments, match="'#0' is unhashable"):
        f([1], 2)  # type: ignore[call-arg]


def test_a_builtin_method_without_a_signature_can_be_memoized() -> None:
    """_checks.is_method: a callable in a class whose signature cannot be
    read (str.format) is not taken for a method, and decorating it does not fail."""
    fmt = request_memo(str.format)
    with request_scope():
        assert fmt("{}-{}", 1, 2) == "1-2"
        assert fmt("{}-{}", 1, 2) == "1-2"
        assert fmt.cache_info().hits == 1


def test_a_refused_coroutine_result_is_closed_not_left_never_awaited() -> None:
    """_checks.refuse_memoized_result: the coroutine a sync memo returned
    is refused and closed: no "coroutine ... was never awaited" warning later."""
    import gc
    import warnings

    async def body() -> int:
        return 1

    @request_memo
    def f(x: int) -> object:
        return body()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with request_scope(), pytest.raises(TypeError, match="coroutine"):
            f(1)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_a_callable_whose_wrapped_attribute_raises_can_be_memoized() -> None:
    """_targets.refuse_memo_target: looking for functools.lru_cache down the ``__wrapped__``
    chain reads each object's ``__wrapped__``, and ``getattr``'s default covers an
    AttributeError only. A callable whose ``__wrapped__`` raises something else (a proxy
    that resolves its target on demand, none registered yet) is looked at no further:
    without the ``try``, decorating it raised that error. (A proxy whose every attribute
    raises, as an unbound werkzeug LocalProxy's, raises at the ``cache_parameters`` look
    before: only ``__wrapped__`` raising reaches this.)"""
    calls: list[int] = []
    looked: list[bool] = []

    class Lazy:
        def __call__(self, x: int) -> int:
            calls.append(x)
            return x * 2

        @property
        def __wrapped__(self) -> object:
            looked.append(True)
            raise LookupError("no target registered yet")

    for decorator in (request_memo, request_memo()):
        calls.clear()
        double = decorator(Lazy())
        with request_scope():
            assert double(2) == 4 and double(2) == 4
        assert calls == [2]
    assert looked, "__wrapped__ was never read: the test tests nothing"


@pytest.mark.parametrize("kind", ["Mock", "MagicMock", "AsyncMock", "autospec"])
def test_a_mock_can_be_memoized(kind: str) -> None:
    """A Mock answers every ``hasattr``, so the look for functools.lru_cache's attributes
    took one for an lru_cache and refused it; they are looked up statically now."""
    fetch = (
        mock.create_autospec(lambda x: x, return_value=3)
        if kind == "autospec"
        else getattr(mock, kind)(return_value=3)
    )
    memo = request_memo(fetch)

    async def twice() -> list[int]:
        async with request_scope():
            return [await memo(1), await memo(1)]

    with request_scope():
        results = asyncio.run(twice()) if kind == "AsyncMock" else [memo(1), memo(1)]
    assert results == [3, 3] and fetch.call_count == 1
    with pytest.raises(TypeError, match="lru_cache"):  # the real one is still refused
        request_memo(functools.lru_cache(lambda x: x))


@pytest.mark.parametrize("name", ["get_n\u00ba", "\ufb01nd_user", "\uff55ser"])
def test_a_function_whose_name_python_would_normalise_can_be_memoized(name: str) -> None:
    """Python stores identifiers NFKC-normalised: a generated ``def`` of such a name (a
    factory's ``fn.__name__ = f"get_{field}"``) was not found under it (KeyError)."""

    def getter(row: int) -> tuple[str, int]:
        return (name, row)

    getter.__name__ = getter.__qualname__ = name
    memo = request_memo(getter)
    with request_scope():
        assert memo(1) == memo(1) == (name, 1)
        assert memo.cache_info().hits == 1
