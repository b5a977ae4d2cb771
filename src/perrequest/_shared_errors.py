"""What a shared computation raised, and the copy another request's waiter gets.

A waiter in another request never receives the computing request's exception
object, whose traceback's frames hold that request's local variables. It gets a
copy that carries plain values only (and copies of the exceptions among them),
or a ``SharedComputationError`` naming the original. The error reaches this
process's waiters as a value (``Raised``), not through ``_flight``: so no frame
of a waiter's traceback (``_flight``'s included) holds the original either.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from datetime import time as dtime
from decimal import Decimal
from enum import Enum
from types import FrameType, TracebackType
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from ._results import is_lazy, refuse_memoized_result
from ._signals import is_time_limit
from .errors import PerRequestError


class SharedComputationError(PerRequestError):
    """Raised in a request that waited for another request's computation of a shared
    entry, when that computation's exception could not be copied safely (it carried
    objects other than plain values: ``httpx.HTTPStatusError``'s request and response).
    ``except`` the original type does not catch it: catch this too, or handle the
    failure inside the memoized function."""

    original_type: str = ""
    """The original exception's type, ``module.qualname`` (``"httpx.HTTPStatusError"``)."""


Fn = Callable[..., Any]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
NOTE = "perrequest: raised by the same computation in another request"
# What a copy of an error may carry besides exceptions and the containers below:
# values that cannot refer to a frame. Anything else makes it a SharedComputationError.
_ATOMS = frozenset(
    (type(None), bool, int, float, complex, str, bytes, Decimal, UUID, date, datetime, dtime,
     timedelta)
)  # fmt: skip
_GROUPS = (ExceptionGroup, BaseExceptionGroup)  # copied; a subclass is not
_ZONES = (timezone, ZoneInfo)  # tzinfo a copied datetime may keep: shared, immutable
_DEEPEST, _MOST = 10, 1000  # nesting and values a copy may carry, all told
_LONGEST = 2000  # characters of the original's message a SharedComputationError quotes


class Call:
    """One caller of a shared computation: whether it ran the function itself; and, where
    the computation runs more than the function (the Redis tier stores), what it raised."""

    __slots__ = ("error", "ran")

    def __init__(self) -> None:
        self.ran = False
        # What the function raised, by id (the error would hold its frames, which hold this:
        # a cycle); 0: watched, nothing raised yet; None: the computation is the function.
        self.error: int | None = None


def own(call: Call, fn: Fn, is_async: bool) -> Fn:
    """``fn``, its own ``Exception`` kept on ``call``: only that one is handed to waiters,
    not one the rest of the computation raises (a signal handler's, as the value is stored)."""
    call.error = 0

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            call.error = id(exc)  # compared while it propagates, alive
            raise

    async def run_async(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            call.error = id(exc)
            raise

    return run_async if is_async else run


class Raised:
    """What a shared computation raised, handed to this process's waiters as a value, so
    that no frame of theirs (``_flight``'s) ever holds it: ``error_for(call)``."""

    __slots__ = ("call", "copy", "error")

    def __init__(self, call: Call, error: Exception) -> None:
        self.call, self.error = call, error
        # Copied now, as it is raised: its request may go on to change it (add_note).
        self.copy = _safe_copy(error, _Copy())

    def error_for(self, call: Call) -> BaseException:
        """The error itself for the call that raised it, a copy of its copy for any other
        (each waiter's own: another may change it too)."""
        return self.error if call is self.call else _safe_copy(self.copy, _Copy(note=False))


def _safe_copy(error: BaseException, copy: _Copy) -> BaseException:
    try:
        return copy.error(error, 0)
    except Exception as failure:  # _Unsafe, or the type's own code failing on its arguments
        if is_time_limit(failure):  # a soft time limit: the task's, not error's
            raise
        message, notes = _named(error)
        named = SharedComputationError(message)
        named.__notes__ = notes
        named.original_type = (
            error.original_type
            if type(error) is SharedComputationError
            else f"{type(error).__module__}.{type(error).__qualname__}"
        )
        return named


def computed(call: Call, fn: Fn, args: Args, kwargs: Kwargs) -> Any:
    """``fn(*args, **kwargs)`` for ``call``, an ``Exception`` returned as ``Raised``."""
    call.ran = True
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # only fn's: a signal handler's after it is no value to share
        if call.error is not None and id(exc) != call.error:
            raise  # the rest of the computation's (``own``): waiters compute
        return Raised(call, exc)
    if is_lazy(value):  # refused here, where the message can name fn
        refuse_memoized_result(fn, value)
    return value


async def computed_async(call: Call, fn: Fn, args: Args, kwargs: Kwargs) -> Any:
    call.ran = True
    try:
        value = await fn(*args, **kwargs)
    except Exception as exc:
        if call.error is not None and id(exc) != call.error:
            raise
        return Raised(call, exc)
    if is_lazy(value):
        refuse_memoized_result(fn, value)
    return value


def _named(error: BaseException) -> tuple[str, list[str]]:
    """The message and notes of the SharedComputationError standing for ``error``."""
    try:
        text = str(error)
    except Exception:
        text = "(its message could not be read)"
    if len(text) > _LONGEST:
        text = f"{text[:_LONGEST]}... ({len(text) - _LONGEST} more characters)"
    try:
        notes = _notes(getattr(error, "__notes__", None))
    except Exception:  # a __getattr__ of its own
        notes = []
    kind = f"{type(error).__module__}.{type(error).__qualname__}"
    message = f"another request computing this shared entry raised {kind}: {text}"
    return message, [*(note for note in notes if note != NOTE), NOTE]  # (of a copy: once)


def _notes(notes: object) -> list[str]:
    """An error's own notes (the strings among them), for its copy."""
    return [n for n in notes if type(n) is str] if isinstance(notes, list) else []


_PLAIN_SIZE = type("_Plain", (Exception,), {}).__basicsize__  # BaseException's, __weakref__
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement or type()


def _plain(kind: type) -> bool:
    """Whether an error of ``kind`` holds nothing but its ``args`` and attributes (no fields
    of C, ``__slots__``, ``__new__`` or ``__reduce__`` of its own), so that a new object given
    copies of both is a copy: its ``__init__`` is not asked to rebuild it from ``args``,
    which need not be its parameters (``HTTPException(status_code=404)``: ``args`` empty)."""
    for cls in kind.__mro__[:-1]:  # object's __new__ and __reduce__ are BaseException's
        if not cls.__flags__ & _HEAPTYPE:  # built in (not by its __module__: a class sets it)
            if cls.__basicsize__ != BaseException.__basicsize__:  # StopIteration's value
                return False
        elif (
            cls.__basicsize__ > _PLAIN_SIZE
            or vars(cls).get("__slots__")
            or any(name in vars(cls) for name in ("__new__", "__reduce__", "__reduce_ex__"))
        ):
            return False
    return True


def _global(cls: type) -> bool:
    """Whether ``cls`` is what its module holds at its name, as pickle checks a global: a
    class defined there refers to no request's frame; one made at run time (``type()``,
    a factory, a class in a function) may hold its request's data."""
    found: Any = sys.modules.get(cls.__module__)
    for name in cls.__qualname__.split("."):
        try:
            found = vars(found)[name]  # no __getattr__ of a module's or a class's runs
        except (TypeError, KeyError):
            return False
    return found is cls


class _Unsafe(Exception):
    """A value a copy of an error for another request may not carry."""


class _Copy:
    """One copy of one error: what it met (errors refer to each other), and what is left
    of its budget."""

    def __init__(self, note: bool = True) -> None:
        self.seen: dict[int, BaseException] = {}
        self.left = _MOST
        self.note = [NOTE] if note else []  # added to each copied error's own notes

    def error(self, error: BaseException, depth: int) -> BaseException:
        known = self.seen.get(id(error))
        if known is not None:  # an exception that refers to itself, or one met twice
            return known
        kind = type(error)
        # A class made in a call (it, its methods, may hold that call's data), or a group
        # subclass (its derive() and __slots__ may carry anything): not rebuilt.
        if not _global(kind) or (isinstance(error, BaseExceptionGroup) and kind not in _GROUPS):
            raise _Unsafe(error)
        args = self.value(error.args, depth)
        if _plain(kind):  # its state is its args and attributes: no code of its own runs
            clone: BaseException = kind.__new__(kind)
        else:  # what rebuilds it, as copy and pickle do (OSError's filename too; a group's
            rebuild = error.__reduce__()  # members, copied): its own code sees copies only
            if type(rebuild) is not tuple or len(rebuild) < 2 or rebuild[0] is not kind:
                raise _Unsafe(error)
            clone = kind(*self.value(rebuild[1], depth))
            if clone.args != args:
                raise _Unsafe(error)  # not rebuilt by its arguments
            if len(rebuild) > 2 and type(rebuild[2]) is dict:  # ImportError's name and path
                clone.__setstate__(self.value(rebuild[2], depth))  # as pickle sets them
        if type(clone) is not kind or clone is error:
            raise _Unsafe(error)  # not a new object of its type (one instance per message)
        clone.args = args
        self.seen[id(error)] = clone
        state = self.value(dict(vars(error)), depth)
        vars(clone).clear()
        vars(clone).update(state)
        clone.__notes__ = [*_notes(state.get("__notes__")), *self.note]  # its own kept
        return clone

    def value(self, value: Any, depth: int) -> Any:
        self.left -= 1
        if self.left < 0 or depth > _DEEPEST:
            raise _Unsafe(value)
        kind = type(value)
        if kind in _ATOMS:
            if getattr(value, "tzinfo", None) is None or type(value.tzinfo) in _ZONES:
                return value
            raise _Unsafe(value)  # a tzinfo of its own: any object
        if isinstance(value, Enum):  # a member of a class defined once, of a plain value
            if not _global(kind) or type(value.value) not in _ATOMS:
                raise _Unsafe(value)
            return value
        if isinstance(value, BaseException):
            return self.error(value, depth + 1)
        if isinstance(value, type) and _global(value):  # (decimal.DivisionByZero's args)
            return value
        if kind is TracebackType or kind is FrameType:
            return None
        if kind is tuple or kind is list or kind is set or kind is frozenset:
            return kind(self.value(item, depth + 1) for item in value)
        if kind is dict:
            return {
                self.value(k, depth + 1): self.value(v, depth + 1) for k, v in list(value.items())
            }
        raise _Unsafe(value)
