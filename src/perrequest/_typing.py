"""What ``@request_memo`` returns, as type checkers and ``cache_info()`` see it: a
Protocol generic in the function's parameters and result, as typeshed types
``functools.lru_cache``'s wrapper, so calls are checked against its signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    NamedTuple,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    overload,
)

if TYPE_CHECKING:  # the Redis tier's, imported with perrequest.redis only
    from ._redis_tier import RedisCacheInfo

__all__ = [
    "BoundMemoizedFunction",
    "CacheInfo",
    "MemoizedFunction",
    "RedisBoundMemoizedFunction",
    "RedisMemoizedFunction",
    "SharedBoundMemoizedFunction",
    "SharedCacheInfo",
    "SharedMemoizedFunction",
]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")
S_contra = TypeVar("S_contra", contravariant=True)


class CacheInfo(NamedTuple):
    """One function's counters in the active store, with ``functools``' field names;
    ``maxsize`` is the function's own ``max_entries=`` (or None)."""

    hits: int
    misses: int
    maxsize: int | None
    currsize: int


class SharedCacheInfo(NamedTuple):
    """A ``shared=`` memo's counters in the shared cache, process-wide (``shared_info()``):
    values found there, values computed, the cache's bound and size (all functions')."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class MemoizedFunction(Protocol[P, R_co]):
    """What ``@request_memo`` returns, as type checkers see it: the function, with the
    ``functools``-style extras, generic in its parameters and result."""

    __name__: str
    __qualname__: str

    @property
    def __wrapped__(self) -> Callable[P, R_co]: ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def cache_info(self) -> CacheInfo:
        """This function's hits, misses and entries in the active store."""

    def cache_clear(self) -> None:
        """Drop this function's entries in the active store."""

    def cache_delete(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the entry these arguments would hit; whether there was one."""

    @overload
    def __get__(self, instance: None, owner: type[Any], /) -> Self: ...

    @overload
    def __get__(
        self: MemoizedFunction[Concatenate[S, P2], R], instance: S, owner: type[Any], /
    ) -> BoundMemoizedFunction[S, P2, R]: ...

    @overload  # a staticmethod's, got from an instance (pyright; mypy binds it)
    def __get__(self, instance: object, owner: type[Any], /) -> Self: ...


class BoundMemoizedFunction(Protocol[S_contra, P, R_co]):
    """A memoized method got from an instance (``repo.row``): called without ``self``.

    The extras are the function's, not the bound method's (as with
    ``functools.lru_cache``), so ``cache_delete`` takes the instance too:
    ``repo.row.cache_delete(repo, 7)``.
    """

    __name__: str
    __qualname__: str

    @property
    def __wrapped__(self) -> Callable[Concatenate[S_contra, P], R_co]: ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def cache_info(self) -> CacheInfo:
        """The method's hits, misses and entries in the active store (all instances)."""

    def cache_clear(self) -> None:
        """Drop the method's entries in the active store, for every instance."""

    def cache_delete(self, instance: S_contra, /, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the entry ``instance`` and these arguments would hit; whether there was one."""


class SharedMemoizedFunction(MemoizedFunction[P, R_co], Protocol):
    """``MemoizedFunction`` for ``shared=`` memos, with ``shared_info()``."""

    def shared_info(self) -> SharedCacheInfo:
        """This function's counters in the shared cache, in this process."""

    @overload
    def __get__(self, instance: None, owner: type[Any], /) -> Self: ...

    @overload
    def __get__(
        self: SharedMemoizedFunction[Concatenate[S, P2], R], instance: S, owner: type[Any], /
    ) -> SharedBoundMemoizedFunction[S, P2, R]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any], /) -> Self: ...


class SharedBoundMemoizedFunction(BoundMemoizedFunction[S_contra, P, R_co], Protocol):
    """A ``shared=`` memoized method got from an instance."""

    def shared_info(self) -> SharedCacheInfo:
        """The method's counters in the shared cache, in this process."""


class RedisMemoizedFunction(MemoizedFunction[P, R_co], Protocol):
    """What ``@request_memo(shared=RedisCache(...))`` returns, as type checkers see it:
    with ``shared_info()``, the Redis tier's counters."""

    def shared_info(self) -> RedisCacheInfo:
        """This function's counters in the Redis tier, in this process."""

    @overload
    def __get__(self, instance: None, owner: type[Any], /) -> Self: ...

    @overload
    def __get__(
        self: RedisMemoizedFunction[Concatenate[S, P2], R], instance: S, owner: type[Any], /
    ) -> RedisBoundMemoizedFunction[S, P2, R]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any], /) -> Self: ...


class RedisBoundMemoizedFunction(BoundMemoizedFunction[S_contra, P, R_co], Protocol):
    """A memoized method with a Redis tier, got from an instance."""

    def shared_info(self) -> RedisCacheInfo:
        """The method's counters in the Redis tier, in this process."""
