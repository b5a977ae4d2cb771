"""What a call's result may not be, told on the call path (``_targets`` refuses at
decoration): a memo never caches what would serve once."""

from __future__ import annotations

import contextlib
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


# What @contextmanager and @asynccontextmanager functions return: good for one `with`.
_CONTEXTS = (type(_made()), type(_made_async()))

# Each type's answer to "would a memo refuse a value of it": a coroutine (it runs later,
# once) or an iterator (a generator, a map(), a file, a cursor), which the first caller would
# exhaust. Looked up on every miss: an exact dict, as cheap as a frozenset's membership.
LAZY: dict[type, bool] = {}


def lazy_type(kind: type) -> bool:
    """Told once per type, kept: at most 256 types (types made at run time)."""
    if len(LAZY) >= 256:
        LAZY.clear()
    lazy = LAZY[kind] = kind is CoroutineType or issubclass(
        kind, (Iterator, AsyncIterator, *_CONTEXTS)
    )
    return lazy


def is_lazy(value: object) -> bool:
    try:
        return LAZY[type(value)]
    except KeyError:
        return lazy_type(type(value))


def refuse_memoized_result(fn: object, value: Any) -> None:
    """Cached, a coroutine or iterator would serve once: the next call gets it exhausted.
    Raises if ``value`` is one (its type told and kept, if not seen yet)."""
    if not lazy_type(type(value)):
        return
    kind, fix = "a generator", "Return a list (list(...)), or memoize the function consuming it"
    if type(value) is CoroutineType:
        kind = "a coroutine"
        fix = "Memoize the async def itself, or make the function around it async"
        if is_async_callable(fn):  # an async def returning one it did not await
            fix = "Await it in the function (return await ...)"
    elif issubclass(type(value), _CONTEXTS):
        kind = "the context manager of a @contextmanager function, good for one with block"
        fix = "Memoize the function computing what the with block uses"
    elif type(value) not in (GeneratorType, AsyncGeneratorType):
        kind = f"a one-shot iterator ({type(value).__name__})"
    if type(value) in (CoroutineType, GeneratorType):  # (an async generator's needs awaiting)
        value.close()
    raise TypeError(  # from None: a generated miss tells a new type in an except KeyError
        f"{getattr(fn, '__qualname__', fn)!r} returned {kind}, which would be cached "
        f"unconsumed and could be used only once. {fix}, so that a result is cached."
    ) from None
