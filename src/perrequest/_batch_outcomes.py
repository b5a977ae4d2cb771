"""A load's outcomes: the values fetched, by cache key, and what each caller gets.

A batch function may break the hash of a key it is given (a model instance it saves, hashed
by a primary key it does not have yet). That key's value is kept by identity: its callers
get it, and it is not stored (``_BatchSpec.keep`` logs it); an async batch hands it to
the callers it holds, and does not store it either."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ._flight import MISSING
from ._signals import is_time_limit


class Unhashed:
    """A cache key whose hash raised once fetched, held as the key of its outcome."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __hash__(self) -> int:
        return id(self.key)

    def __eq__(self, other: object) -> bool:
        return type(other) is Unhashed and other.key is self.key


def same(key: Any, cache_key: Any) -> bool:
    try:
        return key is cache_key or bool(key == cache_key)
    except Exception:  # a load key that cannot be compared: not the same
        return False


def put_all(out: dict[Hashable, Any], cks: list[Hashable], values: list[Any]) -> None:
    try:
        out.update(zip(cks, values, strict=True))
    except Exception as exc:  # a key's hash raised (TypeError, or what its model raises)
        if is_time_limit(exc):  # a soft time limit: the task's
            raise
        for ck, value in zip(cks, values, strict=True):  # by identity
            try:
                out[ck] = value
            except Exception as failure:
                if is_time_limit(failure):  # in another key's __hash__
                    raise
                out[Unhashed(ck)] = value


def pick(out: dict[Hashable, Any], ck: Hashable) -> Any:
    """``ck``'s outcome in ``out``, MISSING if none."""
    try:
        return out[ck]
    except Exception:  # its hash raised; or KeyError: an equal key, whose hash raised
        for kept, value in out.items():
            if type(kept) is Unhashed and same(ck, kept.key):
                return value
        return MISSING


def missing_keys(keys: list[Any], cks: list[Hashable], values: Any = None) -> dict[Hashable, Any]:
    """The keys missing (all, without ``values``): cache key to first load key."""
    wanted: dict[Hashable, Any] = {}
    for i, ck in enumerate(cks):
        if (values is None or values[i] is MISSING) and ck not in wanted:
            wanted[ck] = keys[i]
    return wanted


def settled(cks: list[Hashable], values: list[Any], got: dict[Hashable, Any]) -> list[Any]:
    """The value of each key (``values``', else what was ``got``), or the first failure
    among them raised."""
    found = [pick(got, ck) if v is MISSING else v for ck, v in zip(cks, values, strict=True)]
    for value in found:
        if issubclass(type(value), Exception):
            try:
                raise value
            finally:  # this frame, in the error's traceback: a reference cycle
                value = found = values = got = None  # type: ignore[assignment]
    return found
