"""Telling a signal handler's exception (Celery's soft time limit: an ``Exception`` its
SIGUSR1 handler raises) from the failure of the code it interrupted, where perrequest
catches that code's failures (listeners, error copies, Redis values): it is the task's."""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import Any


def raised_by_a_signal_handler(exc: BaseException) -> bool:
    """Whether a Python signal handler installed now raised ``exc``. CPython runs handlers
    in the main thread only, each as if called where the signal interrupted, with that
    frame as its second argument: a frame of a handler's code whose arguments hold the
    frame below it (a function merely sharing a handler's code, a decorator's wrapper,
    is not one)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    codes = {_code_of(signal.getsignal(number)) for number in _readable()}
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code in codes and _passed(frame.f_back, frame.f_locals.values()):
            return True
        tb = tb.tb_next
    return False


def _readable() -> Iterable[int]:
    for number in signal.valid_signals():
        try:
            signal.getsignal(number)
        except (OSError, ValueError):  # a number this platform does not let Python read
            continue
        yield number


def _code_of(handler: Any) -> CodeType | None:
    """The code a handler runs first: a function's (a bound method's, a partial's), or a
    callable object's ``__call__``; None for ``SIG_DFL``, ``SIG_IGN`` and C functions."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    code = getattr(getattr(handler, "__func__", handler), "__code__", None)
    if code is None:
        code = getattr(getattr(type(handler), "__call__", None), "__code__", None)  # noqa: B004
    return code if isinstance(code, CodeType) else None


def _passed(caller: FrameType | None, arguments: Iterable[Any]) -> bool:
    """Whether ``caller`` is among ``arguments`` (or inside a ``*args`` tuple of them)."""
    if caller is None:
        return False
    for value in arguments:
        if value is caller or (type(value) is tuple and any(v is caller for v in value)):
            return True
    return False
