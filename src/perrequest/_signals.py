"""Telling a signal handler's exception (Celery's soft time limit: an ``Exception`` its
SIGUSR1 handler raises) from the failure of the code it interrupted, where perrequest
catches that code's failures (listeners, error copies, Redis values, keys' hashes): it is
the task's."""

from __future__ import annotations

import inspect
import itertools
import signal
import threading
from types import FrameType
from typing import Any

_NUMBERS = frozenset(int(number) for number in signal.valid_signals())  # (an enum each: once)
_INTS = (int, signal.Signals)  # as CPython passes it, or made a Signals by the handler


def raised_by_a_signal_handler(exc: BaseException) -> bool:
    """Whether a Python signal handler raised ``exc``. CPython runs handlers in the main
    thread only, each as if called where the signal interrupted, with the signal's number
    and that frame as its arguments: a frame in the traceback whose arguments hold, one
    after the other, a signal number and the frame below it. Told by shape, not by the
    handlers installed now: a decorated or proxied handler (wrapt), one that uninstalled
    itself, are found."""
    if threading.current_thread() is not threading.main_thread():
        return False
    tb = exc.__traceback__
    # Not the first frame: the one handling it, still running (a handler's has returned),
    # whose locals read now (a copy kept on the frame, on 3.11) would hold ``exc``: a cycle.
    tb = None if tb is None else tb.tb_next
    while tb is not None:
        if _called_for_a_signal(tb.tb_frame):
            return True
        tb = tb.tb_next
    return False


def _called_for_a_signal(frame: FrameType) -> bool:
    """Whether ``frame``'s positional arguments (a wrapper's ``*args`` or ``args`` tuple
    spread) hold a signal number and, right after it, the frame below: ``(signum, frame)``,
    after ``self`` or a partial's arguments too. ``print_stack(f, limit)`` does not."""
    caller = frame.f_back
    if caller is None:
        return False
    code, values = frame.f_code, frame.f_locals
    names = list(code.co_varnames[: code.co_argcount])
    if code.co_flags & inspect.CO_VARARGS:
        names.append(code.co_varnames[code.co_argcount + code.co_kwonlyargcount])
    spread: list[Any] = []
    for name in names:
        value = values.get(name)
        spread.extend(value if type(value) is tuple else (value,))
    pairs = itertools.pairwise(spread)
    return any(b is caller and type(a) in _INTS and a in _NUMBERS for a, b in pairs)
