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
import threading
from collections.abc import Awaitable, Callable, Hashable
from types import FrameType, TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from ._lifecycle import (
    OnClose,
    _current,
    _is_async_callable,
    check_on_close,
    close_scope,
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


class _OpenScopes:
    """The scopes one ``request_scope()`` object has open, found again at exit.

    By the frame of the with-statement that opened it (held, so that its id
    cannot be reused meanwhile), innermost first: right even when a generator
    holding the scope is closed from another context. A with-statement made
    through a helper (``ExitStack.enter_context``, a wrapper's own
    ``__enter__``/``__exit__``) enters and exits from frames of its own: then by
    the object whose methods did both (the stack, the wrapper), whatever
    thread or context closes it. Failing both, the scope active in this context.
    """

    __slots__ = ("_by_frame", "_by_owner", "_entries", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_frame: dict[FrameType, list[MemoStore]] = {}
        self._by_owner: dict[int, list[MemoStore]] = {}
        # store id -> (its frame, its owner, held alive while the scope is open)
        self._entries: dict[int, tuple[FrameType, object]] = {}

    def add(self, frame: FrameType, store: MemoStore) -> None:
        owner = _method_owner(frame)
        with self._lock:
            self._entries[id(store)] = (frame, owner)
            self._by_frame.setdefault(frame, []).append(store)
            if owner is not None:
                self._by_owner.setdefault(id(owner), []).append(store)

    def take(self, frame: FrameType) -> MemoStore | None:
        with self._lock:
            stores = self._by_frame.get(frame)
            if not stores and (owner := _method_owner(frame)) is not None:
                stores = self._by_owner.get(id(owner))
            if stores:
                store = stores[-1]
            else:
                current = _current.get()
                if current is None or id(current) not in self._entries:
                    return None
                store = current
            entered, entered_by = self._entries.pop(id(store))
            _discard(self._by_frame, entered, store)
            if entered_by is not None:
                _discard(self._by_owner, id(entered_by), store)
            return store


def _method_owner(frame: FrameType) -> object:
    """The ``self`` of a method's frame (a helper's ``__enter__``, an ExitStack), or None."""
    code = frame.f_code
    if code.co_argcount and code.co_varnames[0] == "self":
        return frame.f_locals.get("self")
    return None


def _discard(index: dict[Any, list[MemoStore]], key: Any, store: MemoStore) -> None:
    stores = index.get(key)
    if stores is not None:
        stores.remove(store)
        if not stores:
            del index[key]


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
        # One object may be entered again while open, nested or from several
        # threads at once, like decimal.localcontext(): see _OpenScopes.
        self._open = _OpenScopes()

    def _enter(self, frame: FrameType) -> MemoStore:
        store = open_scope(self._max_entries, self._on_close)
        self._open.add(frame, store)
        return store

    def _exit(self, frame: FrameType) -> None:
        store = self._open.take(frame)
        if store is None:
            raise RuntimeError("request_scope() exited by a with-statement that did not enter it")
        if _current.get() is store:
            end_scope(store)
        else:
            # A scope opened later is active here (a generator's scope closed inside
            # a newer block), or this is another context: leave what is active alone.
            close_scope(store)

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
