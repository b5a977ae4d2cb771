"""Signals raised where CPython runs their handlers: right after a C call returns. For the
guards of code that must tell Celery's soft time limit (billiard's ``SoftTimeLimitExceeded``,
raised by its SIGUSR1 handler) from the failure of what it called (a key's ``__hash__``),
and must not swallow a ``KeyboardInterrupt``."""

from __future__ import annotations

import contextlib
import signal as signals
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from billiard.exceptions import SoftTimeLimitExceeded


class Signalled(SoftTimeLimitExceeded):
    """What billiard's SIGUSR1 handler raises: Celery's soft time limit (an Exception)."""


def _soft_time_limit(signum: int, frame: Any) -> None:
    raise Signalled("soft time limit")  # as billiard's SIGUSR1 handler does


def raise_like_a_signal(signal: type[BaseException]) -> None:
    """``Signalled`` comes from a real SIGUSR1 handler in the main thread, as Celery's soft
    time limit does (where CPython runs handlers: the windows the guards must cover)."""
    if signal is not Signalled or threading.current_thread() is not threading.main_thread():
        raise signal
    previous = signals.signal(signals.SIGUSR1, _soft_time_limit)
    try:
        signals.raise_signal(signals.SIGUSR1)  # its handler runs before this returns
    finally:
        signals.signal(signals.SIGUSR1, previous)
    raise AssertionError("SIGUSR1's handler did not run")


class Interrupt(BaseException):
    """A KeyboardInterrupt that pytest does not take for the user's."""


class RaiseAfter:
    """A profile function (``sys.setprofile``) that, once ``armed``, raises ``signal`` as the
    C call ``c_call`` returns in a frame of ``function`` (called from ``caller``, if given),
    and disarms: ``armed`` still true afterwards means the signal never came."""

    def __init__(
        self, signal: type[BaseException], c_call: str, function: str, caller: str = ""
    ) -> None:
        self.signal, self.c_call, self.function, self.caller = signal, c_call, function, caller
        self.armed = False

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if not self.armed or event != "c_return" or frame.f_code.co_name != self.function:
            return
        if getattr(arg, "__name__", "") != self.c_call:
            return
        if self.caller and frame.f_back.f_code.co_name != self.caller:
            return
        self.armed = False
        raise_like_a_signal(self.signal)


class RaiseAtCall:
    """``RaiseAfter`` for a Python function's start (its ``RESUME``, where CPython runs
    handlers too): raises ``signal`` as ``function``, called from ``caller`` (if given),
    begins."""

    def __init__(self, signal: type[BaseException], function: str, caller: str = "") -> None:
        self.signal, self.function, self.caller = signal, function, caller
        self.armed = False

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if not self.armed or event != "call" or frame.f_code.co_name != self.function:
            return
        if self.caller and frame.f_back.f_code.co_name != self.caller:
            return
        self.armed = False
        raise_like_a_signal(self.signal)


@contextlib.contextmanager
def interrupted_by(signal: type[BaseException], at: Any = None) -> Iterator[None]:
    """The block raises ``signal``; the profile function set for it is removed whatever
    happens; and ``at`` (a ``RaiseAfter``, a ``RaiseAtCall``), if given, must have fired."""
    try:
        with pytest.raises(signal):
            yield
    finally:
        sys.setprofile(None)
    if at is not None:
        assert not at.armed, "the signal never came: the test tests nothing"


@contextlib.contextmanager
def raising_at_a_back_edge(filename: str, signal: type[BaseException]) -> Iterator[list[bool]]:
    """The first backward jump of code in ``filename`` raises ``signal`` (a JUMP event of
    ``sys.monitoring``, CPython 3.12+), as a signal handler's exception at a loop's back
    edge, which CPython 3.13 lets escape the ``with`` around the loop (cpython#130279).
    Yields ``armed``, empty once it fired."""
    monitoring = sys.monitoring
    tool = next(i for i in range(6) if monitoring.get_tool(i) is None)
    armed = [True]

    def at_jump(code: Any, at: int, to: int) -> Any:
        if code.co_filename == filename and to < at and armed:
            raise signal(armed.pop())
        return monitoring.DISABLE

    monitoring.use_tool_id(tool, "perrequest test")
    monitoring.register_callback(tool, monitoring.events.JUMP, at_jump)
    monitoring.set_events(tool, monitoring.events.JUMP)
    try:
        yield armed
    finally:
        monitoring.set_events(tool, 0)
        monitoring.register_callback(tool, monitoring.events.JUMP, None)
        monitoring.free_tool_id(tool)


def free_for_another_thread(lock: Any) -> bool:
    """Whether another thread can take ``lock`` (within a second); then frees any hold this
    thread was left with (a reentrant lock a skipped ``with`` kept), for the tests after."""
    from concurrent.futures import ThreadPoolExecutor

    def take() -> bool:
        if not lock.acquire(timeout=1):
            return False
        lock.release()
        return True

    with ThreadPoolExecutor(1) as pool:
        free = pool.submit(take).result()
    with contextlib.suppress(RuntimeError):  # held here: not any more
        while True:
            lock.release()
    return free
