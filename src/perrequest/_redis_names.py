"""Which functions a Redis tier can key. Its keys hold the function's ``module.qualname``
and the arguments, so whatever else a function's values depend on must be the same in
every function of that name, in every process, or one would read another's values."""

from __future__ import annotations

import inspect
import weakref
from typing import Any


def code_of(fn: object) -> object:
    """The code behind ``fn`` (through ``functools.wraps``), or None if it has none."""
    return getattr(inspect.unwrap(fn), "__code__", None)  # type: ignore[arg-type]


def name_problem(fn: object) -> str | None:
    """Why ``fn`` cannot name its Redis keys, or None. The keys hold ``module.qualname``,
    so a callable whose name others share would share their values: every lambda is
    ``<lambda>``; a partial or a callable object has only its class's name."""
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        return f"a {type(fn).__name__} object has no __qualname__ of its own"
    if "<lambda>" in qualname:
        return "every lambda is named <lambda>"
    return None


def state_problem(fn: object, made: dict[object, tuple[Any, ...]]) -> str | None:
    """Why ``fn``'s values may depend on more than its name and arguments, or None: a bound
    method's instance; or, for a function defined in another, the objects it reads from
    that one, when a function of the same code was made with others before (a view's
    closure over its request's user, made again by the next request). ``made``: the
    objects each such code was first made with (held weakly where they can be)."""
    if inspect.ismethod(fn):
        return (
            "a bound method's instance is not in its Redis keys. Give key=, a function of "
            "the same arguments returning what tells instances apart too"
        )
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    # The code's own qualname: functools.wraps gives a closure another function's name.
    if code is None or "<locals>" not in getattr(code, "co_qualname", ""):
        return None
    read = [(n, c) for n, c in zip(code.co_freevars, cells, strict=False) if n != "__class__"]
    values = tuple(_held(c) for _, c in read)
    # By name too: one decorator's wrapper (its code) around two functions named apart.
    first = made.setdefault((code, getattr(fn, "__qualname__", None)), values)
    if first is values or all(map(_same, first, values)):
        return None
    return (
        f"it reads {', '.join(n for n, _ in read)} from the function it is defined in, and "
        "another function of its code read other objects there: they are not in its Redis "
        "keys, so the two would read each other's values. Pass them as arguments, or give "
        "key= returning them with the arguments"
    )


def _held(cell: Any) -> Any:
    try:
        value = cell.cell_contents
    except ValueError:  # not assigned yet
        return None
    if inspect.isfunction(value):  # a decorator's wrapped function: by its name, as keys
        return (f"{value.__module__}.{value.__qualname__}",)  # (one defined again: the same)
    try:
        return weakref.ref(value)
    except TypeError:  # an int, a str, a list: held as it is
        return (value,)


_VALUES = (str, int, float, bytes, bool, complex)  # equal is the same, for what a key reads


def _same(first: Any, now: Any) -> bool:
    if type(first) is not type(now):
        return False
    if isinstance(first, weakref.ref):
        return first() is not None and first() is now()
    if first is None or first[0] is now[0]:
        return True
    return type(first[0]) in _VALUES and type(now[0]) is type(first[0]) and first[0] == now[0]
