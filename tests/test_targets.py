"""What the decorators take: a probe of targets and descriptors (7 December 2026) found a
``functools.partial`` of an object whose ``__call__`` is async taken for sync, a deep copy
of a loader that lost ``clear()``, and three refusals that did not say what to write."""

from __future__ import annotations

import asyncio
import copy
import functools
import pickle
from typing import Any

import pytest

from perrequest import bind_scope, request_batch, request_memo, request_scope


class _AsyncLoader:  # a class-based async batch function, as errors.md's fix would bind it
    async def __call__(self, ids: list[int], db: str) -> list[str]:
        return [f"{db}:{i}" for i in ids]


class _Add:
    async def __call__(self, x: int, y: int) -> int:
        return x + y


def test_a_partial_of_an_object_whose_call_is_async_is_async_for_every_decorator() -> None:
    """``request_batch(functools.partial(loader, db=db))`` is the fix errors.md gives for a
    batch function of more parameters: over a class-based async one, it was refused for
    returning a coroutine, and request_memo, request_scope() and bind_scope alike."""

    async def main() -> list[Any]:
        async with request_scope():
            users = request_batch(functools.partial(_AsyncLoader(), db="main"))
            add = functools.partial(_Add(), 1)
            return [
                await users.load(1),
                await request_memo(add)(2),
                await request_scope()(add)(2),
                await bind_scope(add)(2),
            ]

    assert asyncio.run(main()) == ["main:1", 3, 3, 3]


def test_a_copied_or_pickled_loader_is_the_loader() -> None:
    """A deep copy (a settings object holding it) loaded from the original's entries but
    cleared its own spec's: clear() returned False and the stale value stayed. A loader is
    one per function, as a memo: copies and pickles are itself."""
    db = {1: "alice"}

    @request_batch
    def users(ids: list[int]) -> list[str]:
        return [db[i] for i in ids]

    with request_scope():
        copied = copy.deepcopy(users)
        assert copied is users and copy.copy(users) is users
        assert copied.load(1) == "alice"
        db[1] = "bob"
        assert copied.clear(1) is True
        assert copied.load(1) == "bob"
    assert pickle.loads(pickle.dumps(_module_loader)) is _module_loader
    of_a_partial = request_batch(functools.partial(_AsyncLoader(), db="main"))
    assert copy.deepcopy(of_a_partial) is of_a_partial  # no __qualname__ of its own


@request_batch
def _module_loader(ids: list[int]) -> list[int]:
    return ids


def test_method_makers_under_request_memo_are_refused_saying_which_order_works() -> None:
    with pytest.raises(TypeError, match=r"singledispatchmethod above @request_memo"):

        class Dispatching:
            @request_memo  # type: ignore[call-overload]
            @functools.singledispatchmethod
            def get(self, key: object) -> object:
                return key

    def _get(self: object, kind: str, key: str) -> str:
        return kind + key

    with pytest.raises(TypeError, match=r"partialmethod\(request_memo\(fn\), \.\.\.\)"):
        request_memo(functools.partialmethod(_get, "user"))  # type: ignore[call-overload]

    class Works:  # the orders the messages give
        user = functools.partialmethod(request_memo(_get), "user")

        @functools.singledispatchmethod
        @request_memo
        def get(self, key: object) -> object:
            return key

    with request_scope():
        assert Works().user("a") == "usera" and Works().get(1) == 1


def test_request_batch_over_classmethod_says_what_to_decorate() -> None:
    with pytest.raises(TypeError, match=r"the class method .*Repo\.users.* @staticmethod"):

        class Repo:
            @request_batch  # type: ignore[arg-type]
            @classmethod
            def users(cls, ids: list[int]) -> list[int]:
                return ids


def test_request_scope_on_a_class_is_refused() -> None:
    """Accepted, the class became a function: isinstance() and subclasses failed far away,
    and only __init__ ran in the scope."""
    with pytest.raises(TypeError, match=r"not the class .*ImportJob: .*the method that does"):

        @request_scope()
        class ImportJob:
            def run(self) -> None:
                pass


def test_a_partial_subclass_with_a_call_of_its_own_is_judged_by_that_call() -> None:
    """Unwrapping every functools.partial (the fix above) ignored a subclass's own
    __call__: an async one was taken for sync, a generator one let through (a review)."""

    def fetch(user_id: int, db: str) -> dict[str, Any]:
        return {"id": user_id, "db": db}

    class AsyncPartial(functools.partial[Any]):
        async def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return super().__call__(*args, **kwargs)

    class GeneratorPartial(functools.partial[Any]):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            yield from super().__call__(*args, **kwargs)

    async def main() -> Any:
        async with request_scope():
            return await request_memo(AsyncPartial(fetch, db="main"))(1)

    assert asyncio.run(main()) == {"id": 1, "db": "main"}
    with pytest.raises(TypeError, match="__call__ is a generator function"):
        request_scope()(GeneratorPartial(fetch, db="main"))
