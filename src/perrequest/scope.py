"""Request scopes as users see them: the active store, the helpers, ``request_scope``
and ``bind_scope``.

The active store lives in a ``ContextVar``, so asyncio tasks and copied
contexts (``asyncio.to_thread``, ``sync_to_async``, ``run_in_threadpool``)
inherit it and concurrent requests never see each other's. Opening and
closing scopes is ``_lifecycle``'s job.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Hashable
from types import FrameType, TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from ._lifecycle import (
    OnClose,
    _current,
    _is_async_callable,
    check_on_close,
    deactivate,
    end_scope,
    live_scopes,
    open_scope,
)
from .errors import NoActiveScope
from .store import DEFAULT_MAX_ENTRIES, MemoStore, check_max_entries

__all__ = [
    "bind_scope",
    "current_store",
    "in_request_scope",
    "live_scopes",
    "request_scope",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_NO_SCOPE_HINT = (
    "Add perrequest's RequestScopeMiddleware to the app, or wrap the code in "
    "`with perrequest.request_scope():` (workers, scripts, tests)."
)


def _active_store() -> MemoStore | None:
    store = _current.get()
    if store is None or store._closed:
        return None
    return store


def current_store() -> MemoStore:
    """The active store; raises ``NoActiveScope`` when no scope is open."""
    store = _current.get()
    if store is None or store._closed:
        raise NoActiveScope(f"no request scope is active. {_NO_SCOPE_HINT}")
    return store


def in_request_scope() -> bool:
    """True when a request scope is active in the current context."""
    store = _current.get()
    return store is not None and not store._closed


def get(key: Hashable, default: Any = None) -> Any:
    """The value at ``key`` in the active store, or ``default`` (also outside a scope)."""
    store = _current.get()
    if store is None or store._closed:
        return default
    return store.get(key, default)


def get_or_set(key: Hashable, factory: Callable[[], T]) -> T:
    """``current_store().get_or_set(key, factory)``; raises ``NoActiveScope`` outside a scope."""
    return current_store().get_or_set(key, factory)


def set(key: Hashable, value: Any) -> None:
    """Store ``value`` at ``key`` in the active store; raises ``NoActiveScope`` outside one."""
    current_store()[key] = value


def _refuse_generator(fn: object, decorator: str) -> None:
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(
            f"{decorator} cannot decorate generator function {name}: its body runs after "
            "the call returns, outside the scope or the memo. Decorate a function that "
            "returns a list, or the function that consumes the generator."
        )


def _refuse_coroutine(result: object, fn: object, what: str) -> None:
    """A sync call that returned a coroutine ran its body outside the scope: say so."""
    if inspect.iscoroutine(result):
        result.close()
        raise TypeError(
            f"{what}: {getattr(fn, '__qualname__', fn)!r} returned a coroutine, so its body "
            "would run after the scope ended. Decorate the async def itself, or make the "
            "wrapper around it async."
        )


class request_scope:
    """Open a fresh, isolated store for a ``with``/``async with`` block or each decorated call.

    On exit the previous store (or none) is active again and the new one is
    closed: cleared at once, ``on_close(stats)`` called, stats logged at DEBUG.
    """

    __slots__ = ("_max_entries", "_on_close", "_open")

    def __init__(
        self,
        *misused: object,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        on_close: OnClose | None = None,
    ) -> None:
        if misused:
            raise TypeError(
                f"request_scope() takes its options as keywords, not {misused[0]!r}. To "
                "decorate a function, call it: @request_scope(), with the parentheses."
            )
        self._max_entries = check_max_entries(max_entries)
        self._on_close = check_on_close(on_close)
        # The scopes this object has open: store id -> (the frame that entered it,
        # held so that its id cannot be reused meanwhile; the store), in the order
        # they were opened. One object may be entered
        # again while open, nested or from several threads at once, like
        # decimal.localcontext(); each exit closes the scope its own
        # with-statement opened (found by its frame, even when a generator holding
        # it is closed from another context), or else the one active in this
        # context (an ExitStack enters and exits from frames of its own).
        self._open: dict[int, tuple[FrameType, MemoStore]] = {}

    def _enter(self, frame: FrameType) -> MemoStore:
        store = open_scope(self._max_entries, self._on_close)
        self._open[id(store)] = (frame, store)
        return store

    def _exit(self, frame: FrameType) -> None:
        opened = self._open
        snapshot = list(opened.items())  # one step: other threads may enter meanwhile
        found = next((key for key, (entered, _) in reversed(snapshot) if entered is frame), None)
        if found is None:
            current = _current.get()
            found = id(current) if id(current) in opened else None
        if found is None:
            raise RuntimeError("request_scope() exited by a with-statement that did not enter it")
        _, store = opened.pop(found)
        end_scope(store)

    def __enter__(self) -> MemoStore:
        return self._enter(sys._getframe(1))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(sys._getframe(1))

    async def __aenter__(self) -> MemoStore:
        return self._enter(sys._getframe(1))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(sys._getframe(1))

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        if not callable(fn):
            raise TypeError(f"@request_scope() decorates a function, not {fn!r}")
        _refuse_generator(fn, "@request_scope()")
        max_entries, on_close = self._max_entries, self._on_close

        if _is_async_callable(fn):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                store = open_scope(max_entries, on_close)
                try:
                    return await cast("Awaitable[Any]", fn(*args, **kwargs))
                finally:
                    end_scope(store)

            return cast("Callable[P, R]", run_async)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            store = open_scope(max_entries, on_close)
            try:
                result = fn(*args, **kwargs)
            finally:
                end_scope(store)
            _refuse_coroutine(result, fn, "@request_scope()")
            return result

        return run


def bind_scope(fn: Callable[P, R]) -> Callable[P, R]:
    """Return ``fn`` bound to the scope active now, for whatever thread or task calls it.

    For ``loop.run_in_executor``, ``ThreadPoolExecutor.submit``, ``threading.Thread``
    and callbacks, which do not carry the context along. Called after the scope
    has closed, ``fn`` runs outside any scope.
    """
    if not callable(fn):
        raise TypeError(f"bind_scope() takes a callable, not {fn!r}")
    store = _current.get()
    if store is None or store._closed:
        raise NoActiveScope(
            f"bind_scope({getattr(fn, '__qualname__', fn)!r}) was called outside a request "
            f"scope, so there is no scope to bind. Call it inside the request. {_NO_SCOPE_HINT}"
        )

    if _is_async_callable(fn):

        @functools.wraps(fn)
        async def bound_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            token = _current.set(store)
            try:
                return await cast("Awaitable[Any]", fn(*args, **kwargs))
            finally:
                deactivate(token, store)

        return cast("Callable[P, R]", bound_async)

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        token = _current.set(store)
        try:
            result = fn(*args, **kwargs)
        finally:
            deactivate(token, store)
        _refuse_coroutine(result, fn, "bind_scope()")
        return result

    return bound
