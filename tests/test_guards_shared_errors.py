"""Guards of the shared tier's error copies (_shared_errors) that no other test needed: each
test here fails with its guard deleted (a block-deletion mutation pass, 5 December 2026)."""

from __future__ import annotations

import sys
from http import HTTPStatus
from typing import Any

import pytest
from signals import RaiseAfter, Signalled, interrupted_by

from perrequest._shared_errors import NOTE, Call, Raised, SharedComputationError


class Upstream:
    """An object an error keeps: it makes the error unsafe to copy, so it goes by name."""


class Keeps(Exception):
    """An error keeping an object: not copied, named (as httpx.HTTPStatusError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.response = Upstream()


class Unreadable(Exception):
    """An error whose message cannot be read (a __str__ of its own that fails)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.response = Upstream()

    def __str__(self) -> str:
        raise RuntimeError("no message here")


class NotesFail(Exception):
    """An error whose __notes__ cannot be read (a property of its own that fails)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.response = Upstream()

    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        raise RuntimeError("no notes here")


def test_an_error_whose_message_cannot_be_read_still_reaches_a_waiter_by_name() -> None:
    """_shared_errors._named: an error that cannot be copied goes to waiters by name, quoting
    its message; a message that raises as it is read is said to be unreadable. Unguarded,
    the __str__'s error escapes from where the computing request's error is recorded."""
    error = Unreadable("db down")
    raised = Raised(Call(), error)
    waiting = raised.error_for(Call())
    assert type(waiting) is SharedComputationError
    assert "Unreadable: (its message could not be read)" in str(waiting)
    assert waiting.__notes__ == [NOTE]
    assert raised.error_for(raised.call) is error  # the computing request's own, untouched


def test_an_error_whose_notes_cannot_be_read_still_reaches_a_waiter_by_name() -> None:
    """_shared_errors._named: the notes of an error going by name are read through its own
    code, which may raise (a property, a __getattr__): then it has none of its own. Unguarded,
    that error escapes from where the computing request's error is recorded."""
    error = NotesFail("db down")
    waiting = Raised(Call(), error).error_for(Call())
    assert type(waiting) is SharedComputationError
    assert "NotesFail: db down" in str(waiting)
    assert waiting.__notes__ == [NOTE]


class Carrying(Exception):
    """An error carrying a value besides its message."""

    def __init__(self, message: str, value: object) -> None:
        super().__init__(message, value)


def test_an_error_carrying_a_plain_enum_member_reaches_a_waiter_as_a_copy() -> None:
    """_shared_errors._Copy.value: a member of an enum defined once, of a plain value (an
    HTTPStatus), refers to no frame: the copy keeps it, so the waiter gets the error's
    own type, not a SharedComputationError. Unguarded, every enum member is unsafe."""
    error = Carrying("upstream failed", HTTPStatus.BAD_GATEWAY)
    waiting = Raised(Call(), error).error_for(Call())
    assert type(waiting) is Carrying and waiting is not error
    assert waiting.args == ("upstream failed", HTTPStatus.BAD_GATEWAY)
    assert waiting.args[1] is HTTPStatus.BAD_GATEWAY


def test_an_error_keeping_a_traceback_reaches_a_waiter_as_a_copy_without_it() -> None:
    """_shared_errors._Copy.value: a traceback or frame an error keeps (an exc_info it saved)
    holds the computing request's locals; the copy carries None in its place and is still
    the error's own type. Unguarded, such an error reaches waiters by name only."""
    try:
        raise ValueError("inner")
    except ValueError as inner:
        tb = inner.__traceback__
    error = Carrying("retry failed", tb)
    error.frame = tb.tb_frame if tb is not None else None  # type: ignore[attr-defined]
    waiting = Raised(Call(), error).error_for(Call())
    assert type(waiting) is Carrying
    assert waiting.args == ("retry failed", None)
    assert waiting.frame is None  # type: ignore[attr-defined]


def test_a_signal_while_a_waiters_copy_is_made_reaches_that_waiter() -> None:
    """_shared_errors._safe_copy: a signal handler's ``Exception`` (Celery's soft time limit)
    raised inside the copy made for a waiter was taken for an error that cannot be copied:
    the waiter got a SharedComputationError and the signal was lost. Its type tells it
    (raised by a real SIGUSR1 handler: tests/signals.py), and it goes on."""
    raised = Raised(Call(), ValueError("db down"))
    at = RaiseAfter(Signalled, "vars", "error", "_safe_copy")
    at.armed = True
    sys.setprofile(at)
    with interrupted_by(Signalled, at):
        raised.error_for(Call())
    waiting = raised.error_for(Call())  # no signal: a copy, as ever
    assert type(waiting) is ValueError and str(waiting) == "db down"


def test_a_real_signal_while_an_uncopyable_error_is_copied_reaches_the_caller() -> None:
    """_shared_errors._safe_copy: for an error that cannot be copied (an object it keeps),
    a soft time limit's exception raised by its SIGUSR1 handler during the copy was
    dropped: the caller got its own error (a review). Its type tells it."""
    import signal

    def soft_time_limit(signum: int, frame: Any) -> None:
        raise Signalled("soft time limit")

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name == "value" and armed:
            armed.clear()
            signal.raise_signal(signal.SIGUSR1)  # the soft limit lands in the copy

    error = Keeps("502 from upstream")
    armed = [True]
    previous = signal.signal(signal.SIGUSR1, soft_time_limit)
    tracing = sys.gettrace()  # coverage's, when it measures: left running after
    try:
        sys.settrace(tracer)
        with pytest.raises(Signalled):
            Raised(Call(), error)
    finally:
        sys.settrace(tracing)
        signal.signal(signal.SIGUSR1, previous)
    assert not armed, "the signal never came: the test tests nothing"
    assert type(Raised(Call(), error).error_for(Call())) is SharedComputationError


def test_an_import_error_reaches_a_waiter_with_its_name_and_path() -> None:
    """_Copy.error: ``ImportError`` keeps ``name`` and ``path`` beside its arguments, in its
    ``__reduce__`` state; the copy dropped them (a waiter's ``exc.name`` was None). They
    are set as pickle sets them."""
    error = ModuleNotFoundError("No module named 'plugins.pay'", name="plugins.pay", path="/p")
    waiting = Raised(Call(), error).error_for(Call())
    assert type(waiting) is ModuleNotFoundError and waiting is not error
    assert (waiting.name, waiting.path) == ("plugins.pay", "/p")
    assert waiting.__notes__ == [NOTE]


def test_an_error_carrying_a_module_level_class_reaches_a_waiter_as_a_copy() -> None:
    """_Copy.value: ``decimal.DivisionByZero``'s arguments hold classes (the signals that
    fired); a class defined at module level refers to no request's frame, so the copy keeps
    it (a SharedComputationError before). One defined in a call may: not copied."""
    import decimal

    try:
        decimal.Decimal(1) / decimal.Decimal(0)
    except decimal.DivisionByZero as exc:
        error = exc
    waiting = Raised(Call(), error).error_for(Call())
    assert type(waiting) is decimal.DivisionByZero and waiting.args == error.args

    class Local:
        pass

    named = Raised(Call(), ValueError(Local)).error_for(Call())
    assert type(named) is SharedComputationError
