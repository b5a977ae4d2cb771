"""Memo keys of calls the generated wrappers (``_wrappers``) do not key themselves, by
their shape as ``functools.lru_cache`` does, and a clear error when they cannot be hashed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Hashable
from decimal import Decimal
from typing import Any

from .errors import UnhashableArguments

# Marks the key of a call with keyword arguments, so that f(a, b) and f(a, b=...)
# never produce equal keys.
KWARGS: Any = object()


def is_method(fn: Callable[..., Any]) -> bool:
    """A function defined in a class body whose first parameter is ``self`` or ``cls``:
    keyed by identity, so equal instances never share entries and unhashable ones work."""
    parts = getattr(fn, "__qualname__", "").split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return (
        bool(params)
        and params[0].name in ("self", "cls", "mcs")
        and params[0].kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
    )


def typed_tag(value: object) -> object:
    """A type tag for ``typed=True``, deep enough that equal-but-different values differ:
    ``1``/``1.0``/``True``, signed zeros, and the same inside tuples and frozensets."""
    kind = type(value)
    if isinstance(value, tuple):
        return (kind, tuple(map(typed_tag, value)))
    if isinstance(value, frozenset):
        return (kind, frozenset((v, typed_tag(v)) for v in value))
    if isinstance(value, float):
        return (kind, math.copysign(1.0, value))
    if isinstance(value, complex):
        return (kind, math.copysign(1.0, value.real), math.copysign(1.0, value.imag))
    if isinstance(value, Decimal):
        return (kind, value.is_signed())
    return kind


def call_key(spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Hashable, Any]:
    """The key of a call, and the object its entry keeps alive (``self``, so that its
    ``id`` cannot be reused within the scope). Not checked for hashability."""
    key: Any
    if spec.key_fn is not None:
        key = spec.key_fn(*args, **kwargs)
        try:
            hash(key)
        except TypeError as exc:
            raise UnhashableArguments(
                f"the key= function of @request_memo {spec.name} returned an unhashable "
                f"{type(key).__name__} ({exc}). Make it return a hashable value, such as "
                "a tuple of strings and numbers."
            ) from None
        return key, None
    method = spec.is_method and bool(args)
    rest = args[1:] if method else args
    if spec.typed:
        key = (
            rest,
            tuple(kwargs.items()),
            tuple(map(typed_tag, rest)),
            tuple(map(typed_tag, kwargs.values())),
        )
    elif kwargs:
        key = (KWARGS, rest, tuple(kwargs.items()))
    else:
        key = rest
    if method:
        return (id(args[0]), key), args[0]
    return key, None


def unhashable(
    spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any], error: TypeError
) -> UnhashableArguments:
    """The error for a call whose key cannot be hashed, naming the parameter."""
    try:
        bound = inspect.signature(spec.fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        named = [(f"#{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    else:
        named = []
        for name, value in bound.arguments.items():
            kind = bound.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                named += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
            elif kind is inspect.Parameter.VAR_KEYWORD:
                named += list(value.items())
            else:
                named.append((name, value))
        if spec.is_method:
            named = named[1:]
    fix = (
        "Pass a hashable value (a tuple instead of a list, a frozenset instead of a set), "
        "or give the decorator key=, a function of the same arguments that returns a "
        "hashable key."
    )
    for name, value in named:
        try:
            hash(value)
        except TypeError:
            return UnhashableArguments(
                f"@request_memo {spec.name}: argument {name!r} is unhashable "
                f"({type(value).__name__}), so it cannot be part of a cache key. {fix}"
            )
    return UnhashableArguments(
        f"@request_memo {spec.name}: the arguments cannot be hashed ({error}). {fix}"
    )
