"""Which store is active (a ``ContextVar``: tasks and copied contexts inherit it), and the
one lifecycle that opens and closes scopes: ``open_scope``/``close_scope`` (a store made at
once), ``open_request``/``close_request`` (a middleware's, its store made when needed).
"""

from __future__ import annotations

import contextvars
import gc
import inspect
import logging
import os
import sys
import threading
import time
from collections import deque
from contextvars import ContextVar, Token
from typing import Any

from ._checks import check_max_entries, check_on_close
from ._listeners import OnClose as OnClose  # re-exported: the integrations import it here
from ._listeners import log, notify
from ._listeners import logger as logger
from ._stats import listeners
from .store import DEFAULT_MAX_ENTRIES, MemoStore

# The active store; or, for a scope a middleware opened, until its store is first
# needed, the request's "cell": a list ``[options]`` that the store is appended to
# when made (see ``open_request``). Typed Any: the hit paths read a
# store's attributes from it, and a cell's AttributeError sends them to ``here()``.
_current: ContextVar[Any] = ContextVar("perrequest.store", default=None)

# One item per open scope. deque.append and deque.pop are atomic, so counting
# costs no lock on the path every request takes (and, unlike a list's, allocate
# nothing at a small size).
_live: deque[None] = deque()
_opened, _closed = _live.append, _live.pop  # bound once: a call through ``_live.`` binds anew
_now = time.perf_counter
_get, _set = _current.get, _current.set

# The sync batch fetches whose batch function runs here: in this thread, or in one it
# started with this context copied (asyncio.to_thread) or bound (``bind_scope``). Their
# keys are fetched again here, never waited for: the fetch waits for this code.
within: ContextVar[tuple[Any, ...]] = ContextVar("perrequest.fetching", default=())


def _forked() -> None:
    """In a forked child, the forking thread's scopes are the parent's to close and report:
    closed here quietly (a process pool started in a request would otherwise run every job
    in its store), each with a fresh lock first (a thread left in the parent may hold it)."""
    active = _current.get()
    for _ in range(_NESTED_SCOPES_MAX):
        if type(active) is list:  # a middleware's cell (a closed one ends below)
            if len(active) == 1:  # no store made
                active[:] = [None, _NONE_MADE]
                break
            active[0] = None
            active = active[1]
        if type(active) is not MemoStore:
            break
        if not active._closed:  # a closed one that kept its token: what it replaced
            active._flights, active._lock = {}, threading.RLock()
            active._shut(False)
        token, active._token = active._token, None
        if token is None or token.old_value is Token.MISSING:
            break
        active = token.old_value  # the scope this one was opened in
    _live.clear()  # the count: these, and other threads' scopes, which are not here


def open_scope(
    max_entries: int | None = DEFAULT_MAX_ENTRIES, on_close: OnClose | None = None
) -> MemoStore:
    """Make a new store active here."""
    store = MemoStore(max_entries)
    store._on_close = on_close
    store._opened_at = _now()  # one clock read: cheaper than asking who will see it
    _opened(None)
    store._before = _unwound(_current.get())  # never a closed scope under this one
    store._token = _current.set(store)
    del store._before  # kept only if a signal's exception came before the token was
    return store


# What a middleware's scope is opened with: (max_entries, on_close).
Options = tuple[int | None, OnClose | None]


def check_options(where: str, max_entries: object, on_close: object) -> Options:
    """The options of a scope, checked; errors name ``where(option=...)``."""
    return (
        check_max_entries(max_entries, f"{where}(max_entries=...)"),
        check_on_close(on_close, f"{where}(on_close=...)"),
    )


# The store of a cell closed before anybody needed one: closed, shared, never written.
_NONE_MADE = MemoStore(1)
_NONE_MADE._shut(False)
_NESTED_SCOPES_MAX = 1000  # in one thread, beyond which a fork leaves the outer ones open

if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forked)


def open_request(options: Options) -> tuple[list[Any], Token[Any]]:
    """Open a middleware's scope for one request: its cell (``_current``: a request that
    memoizes nothing makes no store) and the ``Token`` to reset. A watched scope gets its
    store at once, timed. The cell holds no ``Token``, so that a middleware that
    deep-copies the ASGI scope (where it is left) can."""
    _opened(None)
    if options[1] is None and not listeners:
        cell = [options]
        return cell, _set(cell)
    store = MemoStore(options[0])
    store._on_close = options[1]
    store._opened_at = _now()
    return [options, store], _current.set(store)


def close_request(cell: list[Any], token: Token[Any] | None) -> None:
    """Reset ``token`` here, where it was set (with whatever the request left active: a
    generator's scope left suspended), or where the scope is active; close its store."""
    options = cell[0]
    if options is None:
        return
    cell[0] = None  # closed: nothing is made from it any more
    if len(cell) == 1:  # whoever still holds the cell finds a closed scope
        cell.append(MemoStore(options[0]) if listeners else _NONE_MADE)  # a listener since
    store = cell[1]
    if token is not None:
        try:
            _current.reset(token)
        except (ValueError, RuntimeError):  # another context's; or reset already
            if (active := _get()) is cell or active is store:  # a copy holding the scope
                _current.set(None if token.old_value is token.MISSING else token.old_value)
    if store is _NONE_MADE:
        _closed()
    else:
        close_scope(store)


def forget_closed() -> None:
    """Drop a closed scope left active here (a generator's, closed elsewhere), so that a
    request starting here neither carries it along nor gives it back."""
    active = _unwound(_current.get())
    if active is not None and (active[0] is None if type(active) is list else active._closed):
        _current.set(None)


def opened_by_a_middleware() -> bool:
    """A cell, or a store made from one (no ``_token``); not a ``request_scope()``."""
    active = _current.get()
    return type(active) is list or (active is not None and active._token is None)


def here() -> MemoStore | None:
    """The store active here (closed ones included); a cell's is made by whoever needs it
    first, and set here for the hit paths, undone with whatever set the cell."""
    active = _current.get()
    if type(active) is MemoStore and active._closed and active._token is not None:
        active = _unwound(active)  # a call only where there is something to unwind
    if type(active) is list:
        if len(active) == 1:
            options = active[0]
            if options is None:  # closed meanwhile
                active.append(_NONE_MADE)
            else:
                store = MemoStore(options[0])  # a cell's scope has no on_close
                store._opened_at = _now()  # its duration_s counts from here
                active.append(store)  # of two threads' stores, the first appended is the store
        active = active[1]
        _current.set(active)
    return active  # type: ignore[no-any-return]


def is_resolved(active: Any) -> bool:
    """``active``, as read, is what ``here()`` makes of it (not a cell, whose store it makes,
    nor a scope closed elsewhere, which it unwinds): else, look again."""
    return here() is active


def _leave(store: MemoStore) -> None:
    """Restore here what was active before ``open_scope``, while the store, or a scope opened
    on it since, is active here: a block, a decorated job, gives the thread back what it
    had, whatever it left open (enter a, enter b, exit a: b stays open, not active). One
    closed in a copy of the context that opened it (a generator's, finalized by the loop's
    ``aclose()`` task or the collector) keeps its token: the context that opened it
    unwinds it as it next looks (``_unwound``)."""
    token = store._token
    if token is None or not opened_on(_unwound(_current.get()), store):
        return
    try:
        _current.reset(token)
        store._token = None
    except ValueError:  # a copy of the context that set it: restore here, keep the token
        _current.set(None if token.old_value is token.MISSING else token.old_value)
    _unwound(_current.get())  # a scope under it that closed out of order


def opened_on(active: Any, store: MemoStore) -> bool:
    """Whether ``active`` is ``store``, or a scope opened on it since, here (by what the
    tokens of scopes opened since replaced, or what one replaced as a signal's exception
    came before it kept its token)."""
    while active is not store and type(active) is MemoStore:
        if active._token is not None:
            active = active._token.old_value
        elif (active := getattr(active, "_before", None)) is None:
            break
    return active is store


def _unwound(active: Any) -> Any:
    """``active``; or, for a scope closed in another context that kept its token, what was
    active before it (and before any such scope under it), where the token was set: only
    there (a copy, a bound callable, another request's task: it stays closed)."""
    while type(active) is MemoStore and active._closed and active._token is not None:
        try:
            _current.reset(active._token)
        except (ValueError, RuntimeError):  # set in another context: not this one's
            break
        active._token = None
        active = _current.get()
    return active


def close_scope(store: MemoStore) -> None:
    """Restore the previous store if this one is active here, clear it, then log its
    stats at DEBUG and call ``on_close`` and the listeners, with no store active (but
    those running here: the scope is one they opened). Idempotent."""
    if store._closed:
        return
    _leave(store)
    on_close = store._on_close
    debug = logger.isEnabledFor(logging.DEBUG)
    _closed()  # first: code its values' __del__ run as it clears finds no scope open here
    stats = store._shut(on_close is not None or bool(listeners) or debug)
    if stats is None:  # nobody watches: the stats are made only if store.stats is read
        return
    # With no store active: not one open where the scope ends (a caller's block, another
    # request's, for a body closed or freed there), which on_close could read and write.
    hidden = _set(None)
    try:
        if debug:
            log(logger.debug, "request scope closed: %s", stats)
        notify(stats, on_close)
    finally:
        left = _get()
        if type(left) is MemoStore and not left._closed:
            log(logger.error, "perrequest: on_close or a scope listener left a scope open")
            close_scope(left)
        _current.reset(hidden)


def live_scopes() -> int:
    """How many scopes are open in this process right now."""
    return len(_live)


def active_store() -> MemoStore | None:
    """The active store, or None outside a scope (a closed store counts as none)."""
    store = here()
    return None if store is None or store._closed else store


# Where a middleware leaves the cell of the scope it opened, in the ASGI scope or WSGI
# environ (Django's middleware: on the request), so that a second perrequest layer on the
# same request (a mounted sub-app with its own middleware, one registered twice) shares it.
REQUEST_KEY = "perrequest.store"


def opened_outside(outer: object) -> bool:
    """True when ``outer``, what a request carries at ``REQUEST_KEY``, is the scope an outer
    perrequest layer opened, still active here: its cell, or a deep copy (hypercorn's
    ``ProxyFixMiddleware`` deep-copies the ASGI scope) holding the very options tuple
    (``deepcopy`` keeps a tuple of ints and None; a scope with ``on_close`` has its store
    at once)."""
    if type(outer) is not list or outer[0] is None:
        return False
    active = _current.get()
    if type(active) is list:
        return active[0] is outer[0]  # the cell, or a copy of it, open
    return len(outer) > 1 and active is outer[1]  # its store, made before any copy


# Code that a garbage collection runs sees no store (docs/security.md): a streaming body
# abandoned on a client disconnect is often in a reference cycle, so its ``finally`` runs
# inside a collection, in the context of whatever code that interrupted (another
# request's). This ``gc.callbacks`` hook hides the active store while each collection
# runs, from ``__del__``, generator cleanups, weakref callbacks and the ``aclose()`` tasks
# scheduled meanwhile. One collection runs at a time, in one thread and context, so one
# slot holds the hiding token. CPython 3.11 collects inside allocations, possibly in the
# middle of a contextvars operation holding a borrowed pointer to the mapping that hiding
# replaces: a ``copy_context()`` keeps it alive until that operation has returned, proved
# by a collection starting at another instruction (no other thread runs meanwhile).
# 3.12+ collects between bytecodes.
_COLLECTS_INSIDE_ALLOCATIONS = sys.version_info < (3, 12)
_keep: list[contextvars.Context] = []
_kept_at: tuple[int, int, int] | None = None  # (thread, frame, instruction)
_hidden: Token[Any] | None = None


def _hide_during_collections(
    phase: str, info: dict[str, Any], var: ContextVar[Any] = _current, keep: list[Any] = _keep
) -> None:
    # ``var``, ``keep``, not the globals: an exiting interpreter sets a module's names to None while
    # collections still run (a finalizer's allocations start them), and a wiped module
    # has nothing to hide.
    global _hidden
    if phase == "start":
        if var.get() is None:  # nothing to hide: leave the context untouched
            keep.clear()  # and no operation interrupted here needs earlier copies
            return
        if _COLLECTS_INSIDE_ALLOCATIONS:
            _keep_mapping_alive()
        _hidden = var.set(None)
    elif _hidden is not None:
        token, _hidden = _hidden, None
        try:  # noqa: SIM105 (no module globals here: see above)
            var.reset(token)
        except ValueError:  # another context's: its "stop" was missed (the recursion limit)
            pass  # never set here: the store belongs to the context that hid it
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


gc.callbacks.append(_hide_during_collections)
