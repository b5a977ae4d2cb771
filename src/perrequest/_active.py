"""Which store is active: the ContextVar, and the one lifecycle that opens and closes scopes.

The active store lives in a ``ContextVar``, so asyncio tasks and copied
contexts (``asyncio.to_thread``, ``sync_to_async``, ``run_in_threadpool``)
inherit it and concurrent requests never see each other's. ``request_scope``,
``bind_scope`` and every integration open and close scopes here:
``open_scope``/``close_scope`` for a store made at once, ``open_request``/
``close_request`` for the middlewares' requests, whose store is made when
first needed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from typing import Any

from . import _gc_guard
from ._stats import ScopeStats, listeners, observed
from .store import DEFAULT_MAX_ENTRIES, MemoStore

OnClose = Callable[[ScopeStats], object]

logger = logging.getLogger("perrequest")

# The active store; or, for a scope a middleware opened, until its store is first
# needed, the request's "cell": a list ``[options]`` that the store is appended to
# when made (see ``open_request``). Typed Any: the hit paths read a
# store's attributes from it, and a cell's AttributeError sends them to ``here()``.
_current: ContextVar[Any] = ContextVar("perrequest.store", default=None)
_gc_guard.install(_current)  # finalizers run by the garbage collector see no store

# One item per open scope. deque.append and deque.pop are atomic, so counting
# costs no lock on the path every request takes (and, unlike a list's, allocate
# nothing at a small size).
_live: deque[None] = deque()
_now = time.perf_counter


# -- the lifecycle -------------------------------------------------------------------------------


def open_scope(
    max_entries: int | None = DEFAULT_MAX_ENTRIES, on_close: OnClose | None = None
) -> MemoStore:
    """Make a new store and make it the active one in the current context.

    The scope is timed (``stats.duration_s``) when somebody will see its stats:
    an ``on_close``, a scope listener, DEBUG logging. Two clock reads are a
    tenth of what the middleware may add to a request.
    """
    store = MemoStore(max_entries, on_close)
    if on_close is not None or listeners or logger.isEnabledFor(logging.DEBUG):
        store._opened_at = _now()
    _live.append(None)
    store._token = _current.set(store)
    return store


# What a middleware's scope is opened with: (max_entries, on_close).
Options = tuple[int | None, OnClose | None]

# The store of a cell closed before anybody needed one: closed, shared, never written.
_NONE_MADE = MemoStore(1)
_NONE_MADE._closed = True


def open_request(options: Options) -> tuple[list[Any], Token[Any]]:
    """Open a middleware's scope for one request, and make it the active one here.

    Returns the request's "cell" and the ``Token`` that ``close_request``
    resets. The cell, ``[options]``, is what the ContextVar holds until the
    store is first needed: a request that memoizes nothing makes no store.
    Whoever makes it (``here``) appends it to the cell and sets it in its own
    context, where the hit paths then find the store itself. A scope with an
    ``on_close``, or opened while a scope listener is registered, gets its
    store at once, timed.

    The cell is what a middleware leaves in the request under ``REQUEST_KEY``;
    it holds no ``Token``, so that a middleware that deep-copies the ASGI
    scope can.
    """
    _live.append(None)
    if options[1] is None and not listeners:
        cell = [options]
        return cell, _current.set(cell)
    store = MemoStore(*options)
    store._opened_at = _now()
    return [options, store], _current.set(store)


def close_request(cell: list[Any], token: Token[Any] | None) -> None:
    """End the scope ``open_request`` opened: reset ``token`` if the scope is active
    here, then close its store if one was made. Idempotent."""
    if cell[0] is None:
        return
    cell[0] = None  # closed: nothing is made from it any more
    if len(cell) == 1:
        cell.append(_NONE_MADE)  # whoever still holds the cell finds a closed scope
    store = cell[1]
    if token is not None:
        active = _current.get()
        if active is cell or active is store:
            try:
                _current.reset(token)
            except ValueError:  # another context than the one it was set in
                _set_back(token)
    if store is _NONE_MADE:
        _live.pop()
    else:
        close_scope(store)


def forget_closed() -> None:
    """Drop a closed scope left active here: it means no scope (a generator that kept a
    ``request_scope()`` open across its yields and was closed from elsewhere leaves one),
    and a request that starts here should not carry it along, nor give it back."""
    active = _current.get()
    if type(active) is list:
        if active[0] is None:
            _current.set(None)
    elif active is not None and active._closed:
        _current.set(None)


def opened_by_a_middleware() -> bool:
    """Whether the active scope is one a perrequest middleware opened for a request:
    a cell, or a store made from one (its ``_token`` is None); not a ``request_scope()``."""
    active = _current.get()
    return type(active) is list or (active is not None and active._token is None)


def holds(cell: list[Any]) -> bool:
    """Whether the current context has ``cell``'s scope active (its store, if made)."""
    active = _current.get()
    return active is cell or (len(cell) > 1 and active is cell[1])


def _set_back(token: Token[Any]) -> None:
    """What ``reset(token)`` does, in a context other than the one it was set in."""
    _current.set(None if token.old_value is token.MISSING else token.old_value)


def _made(cell: list[Any]) -> MemoStore:
    """The store of a cell, made by whoever needs it first; closed if the scope is.

    Timed from then, if a listener or DEBUG logging will see its stats.
    """
    if len(cell) == 1:
        options = cell[0]
        if options is None:  # closed meanwhile
            cell.append(_NONE_MADE)
        else:
            new = MemoStore(*options)
            if observed():
                new._opened_at = _now()
            cell.append(new)  # of two threads' stores, the first appended is the store
    store: MemoStore = cell[1]
    return store


def here() -> MemoStore | None:
    """The store active in this context (closed ones included), made if it was not yet.

    Made, it is set in this context, where the hit paths then find it; the set
    is undone with whatever set the cell (a middleware's reset, a task's end).
    """
    active = _current.get()
    if type(active) is list:
        active = _made(active)
        _current.set(active)
    return active  # type: ignore[no-any-return]


def leave_scope(store: MemoStore, closing: bool = False) -> None:
    """Restore, in this context, what was active before ``open_scope``; the scope stays open.

    Only while the store is the active one here: a scope opened since (another
    request's body iterated in the same thread, say) is left alone. A scope
    closing out of order (``a`` entered, ``b`` entered, ``a`` exited) keeps its
    token: ``b``'s exit brings ``a`` back, closed, and then restores what ``a``
    replaced instead.
    """
    token = store._token
    if token is None:
        return
    if _current.get() is not store:
        if not closing:
            store._token = None
        return
    store._token = None
    _reset(token)
    active = _current.get()
    while type(active) is MemoStore and active._closed and active._token is not None:
        token, active._token = active._token, None  # closed out of order: unwind it too
        _reset(token)
        active = _current.get()


def _reset(token: Token[Any]) -> None:
    try:
        _current.reset(token)
    except ValueError:  # another context than the one the scope was opened in
        _set_back(token)


def close_scope(store: MemoStore) -> None:
    """End the scope: restore the previous store if this one is active here, clear it,
    then log its stats at DEBUG, call ``on_close`` and the listeners. Idempotent.

    Runs for every request, so what nobody needs is skipped: a store nothing
    was written to, that nobody watches, just closes.
    """
    if store._closed:
        return
    leave_scope(store, closing=True)
    if not store._opened_at and store._lock is None:  # unwritten, and nobody watches
        store._closed = True
        _live.pop()
        return
    on_close = store._on_close
    debug = logger.isEnabledFor(logging.DEBUG)
    stats = store._shut(on_close is not None or bool(listeners) or debug)
    _live.pop()
    if stats is None:  # nobody watches: the stats are made only if store.stats is read
        return
    if debug:
        logger.debug("request scope closed: %s", stats)
    for listener in (on_close, *listeners) if on_close is not None else tuple(listeners):
        try:
            listener(stats)
        except Exception:
            what = "the scope's on_close" if listener is on_close else "scope listener"
            logger.exception("perrequest: %s %r raised", what, listener)


def live_scopes() -> int:
    """How many scopes are open in this process right now."""
    return len(_live)


def active_store() -> MemoStore | None:
    """The active store, or None outside a scope (a closed store counts as none)."""
    store = here()
    return None if store is None or store._closed else store


# Where a middleware leaves the scope it opened (its cell; Django's middleware, its
# store), in the ASGI scope or WSGI environ, so that a second perrequest layer on
# the same request (a mounted sub-app with its own middleware, one registered
# twice) shares it.
REQUEST_KEY = "perrequest.store"


def opened_outside(request: Mapping[str, Any]) -> bool:
    """True when an outer perrequest layer opened this request's scope, still active here."""
    outer: MemoStore | list[Any] | None = request.get(REQUEST_KEY)
    if type(outer) is list:
        return outer[0] is not None and holds(outer)
    return outer is not None and outer is _current.get() and not outer._closed
