"""Telling a signal handler's exception (Celery's soft time limit: an ``Exception`` its
SIGUSR1 handler raises) from the failure of the code it interrupted, where perrequest
catches that code's failures (listeners, error copies, Redis values): it is the task's."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


def raised_by_a_signal_handler(exc: BaseException) -> bool:
    """Whether a Python signal handler raised ``exc``. CPython runs handlers in the main
    thread only, each as if called where the signal interrupted, with the signal's number
    and that frame as its arguments: a frame in the traceback whose arguments hold a
    signal number and the frame below it. Told by shape, not by the handlers installed
    now: a decorated or proxied handler (wrapt), one that uninstalled itself, are found."""
    if threading.current_thread() is not threading.main_thread():
        return False
    numbers = signal.valid_signals()
    tb = exc.__traceback__
    # Not the first frame: the one handling it, still running (a handler's has returned),
    # whose locals read now (a copy kept on the frame, on 3.11) would hold ``exc``: a cycle.
    tb = None if tb is None else tb.tb_next
    while tb is not None:
        if _called_for_a_signal(tb.tb_frame, numbers):
            return True
        tb = tb.tb_next
    return False


def _called_for_a_signal(frame: FrameType, numbers: set[Any]) -> bool:
    caller = frame.f_back
    if caller is None:
        return False
    values: list[Any] = []
    for value in frame.f_locals.values():  # (signum, frame), or a wrapper's *args tuple
        values.extend(value if type(value) is tuple else (value,))
    return any(v is caller for v in values) and any(type(v) is int and v in numbers for v in values)
