"""Code that a garbage collection runs sees no store.

A streaming body abandoned on a client disconnect is often kept alive by a
reference cycle, so its ``finally`` runs when the collector finds the cycle, in
the context of whatever code the collection interrupted: another request's. A
``gc.callbacks`` hook hides the active store while each collection runs, so
``__del__``, generator cleanups, weakref callbacks and the ``aclose()`` tasks
scheduled meanwhile run outside any scope. One collection runs at a time, in one
thread and context, so one slot holds the hiding token (docs/security.md).

CPython 3.11 collects inside allocations, possibly in the middle of a contextvars
operation holding a borrowed pointer to the mapping that hiding replaces: a
``copy_context()`` keeps it alive until that operation has returned, proved by a
collection starting at another instruction (no other thread runs meanwhile).
3.12+ collects between bytecodes.
"""

from __future__ import annotations

import contextvars
import gc
import inspect
import sys
import threading
from contextvars import ContextVar, Token
from typing import Any

_COLLECTS_INSIDE_ALLOCATIONS = sys.version_info < (3, 12)
_keep: list[contextvars.Context] = []
_kept_at: tuple[int, int, int] | None = None  # (thread, frame, instruction)
_hidden: Token[Any] | None = None
_var: ContextVar[Any] | None = None


def _hide_during_collections(phase: str, info: dict[str, Any]) -> None:
    global _hidden
    var = _var
    if var is None:
        return
    if phase == "start":
        if var.get() is None:
            return  # nothing to hide: leave the context untouched
        if _COLLECTS_INSIDE_ALLOCATIONS:
            _keep_mapping_alive()
        _hidden = var.set(None)
    elif _hidden is not None:
        token, _hidden = _hidden, None
        try:
            var.reset(token)
        except ValueError:  # another context than at "start": cannot happen, never fail
            var.set(token.old_value)
        if _COLLECTS_INSIDE_ALLOCATIONS:
            # The interrupted operation may be a reset that removes the variable: it
            # cleared the variable's cached value before allocating, and will install
            # its mapping after we return, but our reset just cached the store again.
            # Entering and leaving a context invalidates every cached value.
            contextvars.Context().run(int)


def _keep_mapping_alive() -> None:
    """3.11: keep the current mapping alive, and drop what earlier operations needed."""
    global _kept_at
    hook = inspect.currentframe()
    frame = hook.f_back.f_back if hook and hook.f_back else None  # the interrupted code
    at = (threading.get_ident(), id(frame), frame.f_lasti if frame else -1)
    if at != _kept_at:
        _keep.clear()
        _kept_at = at
    if len(_keep) < 64:  # one operation allocates a few dozen objects at most
        _keep.append(contextvars.copy_context())  # shares the current mapping


def install(var: ContextVar[Any]) -> None:
    """Hide ``var`` (the active store, or None) from everything collections run."""
    global _var
    _var = var
    if _hide_during_collections not in gc.callbacks:
        gc.callbacks.append(_hide_during_collections)
