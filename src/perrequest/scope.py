"""Request scopes: which store is active, and the one lifecycle every entry point uses.

The active store lives in a ``ContextVar``, so asyncio tasks and copied
contexts (``asyncio.to_thread``, ``sync_to_async``, ``run_in_threadpool``)
inherit it and concurrent requests never see each other's. ``ScopeLifecycle``
is the single place that opens a store, activates it, and closes it: the
middlewares and ``request_scope`` all go through it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Hashable, Iterable, Iterator
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from .errors import NoActiveScope
from .store import DEFAULT_MAX_ENTRIES, MemoStore, ScopeStats, check_max_entries

__all__ = [
    "OnClose",
    "ScopeLifecycle",
    "ScopedBody",
    "bind_scope",
    "check_on_close",
    "current_store",
    "in_request_scope",
    "live_scopes",
    "request_scope",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

OnClose = Callable[[ScopeStats], object]

logger = logging.getLogger("perrequest")

_current: ContextVar[MemoStore | None] = ContextVar("perrequest.store", default=None)

# The ids of the open stores: a dict, whose item assignment and pop are atomic
# (no lock on the path every request takes); emptied as scopes close.
_live: dict[int, bool] = {}

_NO_SCOPE_HINT = (
    "Add perrequest's RequestScopeMiddleware to the app, or wrap the code in "
    "`with perrequest.request_scope():` (workers, scripts, tests)."
)


def live_scopes() -> int:
    """How many scopes are open in this process right now."""
    return len(_live)


def check_on_close(on_close: object) -> OnClose | None:
    """Validate an ``on_close`` option: None or a callable taking ``ScopeStats``."""
    if on_close is not None and not callable(on_close):
        raise TypeError(
            f"on_close must be a callable taking ScopeStats, or None, not "
            f"{type(on_close).__name__} {on_close!r}"
        )
    return cast("OnClose | None", on_close)


def _restore(token: Token[MemoStore | None], store: MemoStore) -> None:
    """Undo ``_current.set(store)``: restore what was active before it."""
    try:
        _current.reset(token)
    except ValueError:
        # Left in another context than the one entered (a generator closed by
        # another task or request). Only undo our own store there: whatever
        # else that context holds belongs to someone else.
        if _current.get() is store:
            previous = token.old_value
            _current.set(None if previous is Token.MISSING else previous)


class ScopeLifecycle:
    """One open scope: its store, and the close that runs exactly once.

    Every entry point goes through it. Creating one opens a store and makes it
    the active one in the current context; ``leave()`` restores the previous
    store there, and ``close()`` ends the scope, when the response is
    complete; ``end()`` does both, for a scope that ends where it began.
    ``activate()``/``deactivate()`` re-enter the scope elsewhere (a response
    body produced after the app returned). ``close`` is idempotent and
    thread-safe.
    """

    __slots__ = ("_on_close", "_token", "store")

    def __init__(
        self, max_entries: int | None = DEFAULT_MAX_ENTRIES, on_close: OnClose | None = None
    ) -> None:
        store = self.store = MemoStore(max_entries)
        self._on_close = on_close
        _live[id(store)] = True
        self._token = _current.set(store)

    def leave(self) -> None:
        """Restore, in this context, the store that was active when the scope opened."""
        _restore(self._token, self.store)

    def end(self) -> None:
        """``leave()`` then ``close()``."""
        _restore(self._token, self.store)
        self.close()

    def activate(self) -> Token[MemoStore | None]:
        """Make this scope's store the active one in the current context."""
        return _current.set(self.store)

    def deactivate(self, token: Token[MemoStore | None]) -> None:
        """Undo ``activate``."""
        _restore(token, self.store)

    def close(self) -> None:
        """Clear the store, then report its stats to the log and ``on_close``."""
        store = self.store
        if _live.pop(id(store), None) is None:
            return  # closed already: whoever popped it closes it, exactly once
        on_close = self._on_close
        debug = logger.isEnabledFor(logging.DEBUG)
        stats = store._close(on_close is not None or debug)
        if stats is None:
            return
        if debug:
            logger.debug("request scope closed: %s", stats)
        if on_close is not None:
            try:
                on_close(stats)
            except Exception:
                logger.exception("perrequest: on_close callback %r raised", on_close)

    def iterate(self, body: Iterable[T]) -> ScopedBody[T]:
        """Wrap a lazy response body: each chunk is produced with this scope active,
        and the scope closes when the server calls ``close()`` on the wrapper (or,
        if it never does, when the wrapper is garbage collected)."""
        return ScopedBody(body, self)

    async def aiterate(self, body: AsyncIterable[T]) -> AsyncIterator[T]:
        """The async twin of ``iterate``: chunks are produced with this scope active,
        and the scope closes when the body is exhausted, fails or is closed."""
        iterator = aiter(body)
        try:
            while True:
                token = self.activate()
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    return
                finally:
                    self.deactivate(token)
                yield chunk
        finally:
            try:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    token = self.activate()
                    try:
                        await aclose()
                    finally:
                        self.deactivate(token)
            finally:
                self.close()


class ScopedBody(Iterator[T]):
    """A response iterable that keeps its scope active while it yields and closes it after.

    WSGI servers call ``close()`` when the response is done (PEP 3333), also
    when the client went away mid-body; that is when the scope ends.
    """

    __slots__ = ("_body", "_iterator", "_lifecycle")

    def __init__(self, body: Iterable[T], lifecycle: ScopeLifecycle) -> None:
        self._body = body
        self._iterator: Iterator[T] | None = None
        self._lifecycle = lifecycle

    def __iter__(self) -> ScopedBody[T]:
        return self

    def __next__(self) -> T:
        token = self._lifecycle.activate()
        try:
            if self._iterator is None:
                self._iterator = iter(self._body)
            return next(self._iterator)
        finally:
            self._lifecycle.deactivate(token)

    def close(self) -> None:
        """Close the wrapped body (with the scope active), then the scope."""
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                token = self._lifecycle.activate()
                try:
                    close()
                finally:
                    self._lifecycle.deactivate(token)
        finally:
            self._lifecycle.close()

    def __del__(self) -> None:
        # A server that never calls close() breaks PEP 3333; free the store anyway.
        self._lifecycle.close()


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


class request_scope:
    """Open a fresh, isolated store for a ``with``/``async with`` block or each decorated call.

    On exit the previous store (or none) is active again and the new one is
    closed: cleared at once, ``on_close(stats)`` called, stats logged at DEBUG.
    """

    __slots__ = ("_max_entries", "_on_close", "_open")

    def __init__(
        self,
        *,
        max_entries: int | None = DEFAULT_MAX_ENTRIES,
        on_close: OnClose | None = None,
    ) -> None:
        self._max_entries = check_max_entries(max_entries)
        self._on_close = check_on_close(on_close)
        # The scopes this object has open, by store: one object may be entered
        # again while open (nested, or in several threads at once), like
        # decimal.localcontext(); each exit closes the scope its context opened.
        self._open: dict[int, ScopeLifecycle] = {}

    def _enter(self) -> MemoStore:
        lifecycle = ScopeLifecycle(self._max_entries, self._on_close)
        self._open[id(lifecycle.store)] = lifecycle
        return lifecycle.store

    def _exit(self) -> None:
        lifecycle = self._open.pop(id(_current.get()), None)
        if lifecycle is None:
            # Exited in another context than it was entered in (a generator
            # resumed elsewhere): close the scope entered last.
            try:
                _, lifecycle = self._open.popitem()
            except KeyError:
                raise RuntimeError(
                    "request_scope() exited more often than it was entered"
                ) from None
        lifecycle.end()

    def __enter__(self) -> MemoStore:
        return self._enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit()

    async def __aenter__(self) -> MemoStore:
        return self._enter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit()

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        if not callable(fn):
            raise TypeError(f"@request_scope() decorates a function, not {fn!r}")
        _refuse_generator(fn, "@request_scope()")
        max_entries, on_close = self._max_entries, self._on_close

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                lifecycle = ScopeLifecycle(max_entries, on_close)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    lifecycle.end()

            return cast("Callable[P, R]", run_async)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            lifecycle = ScopeLifecycle(max_entries, on_close)
            try:
                return fn(*args, **kwargs)
            finally:
                lifecycle.end()

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

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def bound_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            token = _current.set(store)
            try:
                return await fn(*args, **kwargs)
            finally:
                _restore(token, store)

        return cast("Callable[P, R]", bound_async)

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> R:
        token = _current.set(store)
        try:
            return fn(*args, **kwargs)
        finally:
            _restore(token, store)

    return bound
