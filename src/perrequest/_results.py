"""What a call's result may not be, told on the call path (``_targets`` refuses at
decoration): a memo never caches what would serve once."""

from __future__ import annotations

import contextlib
import csv
import itertools
import re
from collections.abc import AsyncIterator, Iterator
from types import AsyncGeneratorType, CoroutineType, GeneratorType
from typing import Any

from ._checks import is_async_callable


def refuse_coroutine(result: object, fn: object, what: str) -> None:
    """A sync call that returned a coroutine ran its body outside the scope: say so."""
    if type(result) is CoroutineType:
        result.close()
        raise TypeError(
            f"{what}: {getattr(fn, '__qualname__', fn)!r} returned a coroutine, so its body "
            "would run after the scope ended. Use it on the async def itself, or make the "
            "function around it async."
        )


@contextlib.contextmanager
def _made() -> Iterator[None]:
    yield


@contextlib.asynccontextmanager
async def _made_async() -> AsyncIterator[None]:
    yield


# What a @contextmanager (@asynccontextmanager) function returns: good for one `with`.
_CONTEXTS = (type(_made()), type(_made_async()))
# Iterators that only run out: the builtins' (a map(), an iter() of a list), itertools'
# (not count, cycle or repeat, which never do: counters), re.finditer's, csv's readers.
# Not every iterator: a file or StringIO (a buffer written to), a cursor (executed again).
_ONE_SHOT = [iter([]), iter(()), iter(""), iter(range(0)), iter(set()), iter({}), reversed([])]
_ITERTOOLS = (
    "accumulate", "batched", "chain", "combinations", "combinations_with_replacement",
    "compress", "dropwhile", "filterfalse", "groupby", "islice", "pairwise", "permutations",
    "product", "starmap", "takewhile", "zip_longest",
)  # fmt: skip
_ITERATORS = {
    map, filter, zip, enumerate, *map(type, _ONE_SHOT), type(itertools.tee([])[0]),
    *(getattr(itertools, name) for name in _ITERTOOLS if hasattr(itertools, name)),
    type(re.finditer("", "")), type(csv.reader([])), csv.DictReader,
}  # fmt: skip
# What a memo refuses to cache, by the type of the value (one set lookup per miss).
LAZY: frozenset[type] = frozenset(
    {CoroutineType, GeneratorType, AsyncGeneratorType, *_CONTEXTS, *_ITERATORS}
)


def is_lazy(value: object) -> bool:
    """``value`` would serve once (its type is in ``LAZY``). A class whose metaclass cannot
    hash it (``__eq__`` without ``__hash__``) is none of those: its values are cached."""
    try:
        return type(value) in LAZY
    except TypeError:
        return False


def one_shot(value: Any) -> str:
    """What ``value``, which would serve once, is (for a message); closed if it can be
    closed here, so that its body never runs (an async generator's needs awaiting)."""
    if type(value) in (CoroutineType, GeneratorType):
        value.close()
    if type(value) is CoroutineType:
        return "a coroutine"
    if issubclass(type(value), _CONTEXTS):
        return "the context manager of a @contextmanager function, good for one with block"
    if type(value) in (GeneratorType, AsyncGeneratorType):
        return "an async generator" if type(value) is AsyncGeneratorType else "a generator"
    return f"a one-shot iterator ({type(value).__name__})"


def refuse_memoized_result(fn: object, value: Any) -> None:
    """Cached, a coroutine or iterator would serve once: the next call gets it exhausted."""
    fix = "Return a list (list(...)), or memoize the function consuming it"
    if type(value) is CoroutineType:
        fix = "Memoize the async def itself, or make the function around it async"
        if is_async_callable(fn):  # an async def returning one it did not await
            fix = "Await it in the function (return await ...)"
    elif issubclass(type(value), _CONTEXTS):
        fix = "Memoize the function computing what the with block uses"
    kind = one_shot(value)
    raise TypeError(
        f"{getattr(fn, '__qualname__', fn)!r} returned {kind}, which would be cached "
        f"unconsumed and could be used only once. {fix}, so that a result is cached."
    )


def one_shots_failed(name: str, keys: list[Any], values: list[Any]) -> list[Any]:
    """A batch's values, each that would serve once (a coroutine not awaited, a generator)
    made its key's failure, as a memo refuses it: cached, later loads would get it spent."""
    try:
        if LAZY.isdisjoint(map(type, values)):  # one pass in C: the common case
            return values
    except TypeError:  # a class its metaclass cannot hash: looked at one by one
        pass
    return [
        TypeError(
            f"@request_batch {name} returned, as the value of key {key!r}: {one_shot(value)}, "
            "which would be cached unconsumed and could be used only once. Return the values "
            "themselves: awaited (asyncio.gather), or a list."
        )
        if is_lazy(value)
        else value
        for key, value in zip(keys, values, strict=True)
    ]
