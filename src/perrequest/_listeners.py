"""A closed scope's ``on_close`` and the scope listeners, called with its stats: a failure
of theirs is logged, never raised (DESIGN.md), except a task runner's time limit landing
in one (Celery's, RQ's: ``_signals``), which is the task's, not theirs."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from types import CoroutineType, MethodType

from ._signals import is_time_limit
from ._stats import ScopeStats, listeners

OnClose = Callable[[ScopeStats], object]

logger = logging.getLogger("perrequest")

# The on_close callbacks and listeners running here: one is not called for a scope that
# closes while it runs, or in a task or context copied meanwhile (a scope it opened
# itself), which would recurse, or chain tasks, forever.
_calling: ContextVar[tuple[OnClose, ...]] = ContextVar("perrequest.calling", default=())
IN_A_LISTENER_HINT = (
    "This code runs in a scope's on_close or a scope listener, which run with no store "
    "active, after the scope closed: open `with perrequest.request_scope():` in it if it "
    "needs one."
)
# Callbacks running one inside another's scope, beyond which none is called: each may be
# made anew (a partial, a lambda), so that none is recognised as running already.
_NESTED_MAX = 8


def notify(stats: ScopeStats, on_close: OnClose | None) -> None:
    """Call ``on_close`` then each listener (but those running here: the scope is one they
    opened); a time limit in one goes on once the others have run."""
    running, signalled = _calling.get(), None
    for listener in (on_close, *listeners) if on_close is not None else tuple(listeners):
        if running and (len(running) >= _NESTED_MAX or any(_same(listener, r) for r in running)):
            continue  # a scope it opened itself (in a scope, a task, a task run eagerly)
        token = _calling.set((*running, listener))
        try:
            returned = listener(stats)
            if type(returned) is CoroutineType:  # its body would never run
                returned.close()
                raise TypeError(
                    f"{listener!r} returned a coroutine, which nothing awaits: it runs as the "
                    "scope closes, in sync code. Make it a plain function that hands the stats "
                    "to a task (loop.create_task) or a queue."
                )
        except Exception as exc:
            if signalled is None and is_time_limit(exc):
                signalled = exc  # the task's: it must see it (a soft time limit's cleanup)
            else:
                what = "the scope's on_close" if listener is on_close else "scope listener"
                log(logger.exception, "perrequest: %s %r raised", what, listener)
        finally:
            _calling.reset(token)
    if signalled is not None:
        try:
            raise signalled
        finally:
            signalled = None  # this frame, in its traceback: a reference cycle


def log(method: Callable[..., None], message: str, *args: object) -> None:
    """Log as a scope closes. A handler whose ``emit`` raises is reported on stderr, as
    logging's own handlers report their failures: it never fails the request, nor keeps
    the scope's other callbacks from running."""
    try:
        method(message, *args)
    except Exception:
        traceback.print_exc()


def _same(callback: OnClose, running: OnClose) -> bool:
    """The same callback: the object, or a bound method made again (``self.record``)."""
    return callback is running or (
        type(callback) is MethodType
        and type(running) is MethodType
        and callback.__self__ is running.__self__
        and callback.__func__ is running.__func__
    )
