"""Request scopes: the helpers on the active store, ``request_scope`` and ``bind_scope``.

Which store is active, and opening and closing scopes, is ``_active``'s.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar, cast

from ._active import (
    _NONE_MADE,
    OnClose,
    _current,
    active_store,
    check_options,
    close_scope,
    here,
    live_scopes,
    open_scope,
    opened_on,
    within,
)
from ._checks import explains_options, is_async_callable
from ._listeners import IN_A_LISTENER_HINT, _calling
from ._results import refuse_coroutine
from ._stats import add_scope_listener, remove_scope_listener
from ._targets import refuse_class, refuse_generator, refuse_task
from .errors import NoActiveScope
from .store import DEFAULT_MAX_ENTRIES, MemoStore, check_key

__all__ = [
    "add_scope_listener",
    "bind_scope",
    "current_store",
    "in_request_scope",
    "remove_scope_listener",
    "request_scope",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# Reentrant, as every lock here: a collection may start inside the block, and run
# a finalizer that takes the lock again.
_entering = threading.RLock()

OPEN_SCOPE_HINT = (
    "Add perrequest's RequestScopeMiddleware to the app, or wrap the code in "
    "`with perrequest.request_scope():` (workers, scripts, tests)."
)
# Where code runs outside a scope although the app has the middleware.
_IN_A_THREAD = (
    "a thread that does not copy the context (loop.run_in_executor, threading.Thread, "
    "executor.submit, Flask's copy_current_request_context): hand it the request's scope "
    "with perrequest.bind_scope(fn)"
)
_UNWRAPPED = (
    "code the middleware does not wrap (a middleware outside it, Starlette's 500 handler, "
    "Flask's test_request_context(), start-up code, a Django management command or a "
    "signal sent outside a request): open `with perrequest.request_scope():` there, or "
    "decorate it with @perrequest.request_scope()"
)
REGISTERED_HINT = (
    "If the middleware is there, this code runs outside the requests it serves: in "
    f"{_IN_A_THREAD}; or in {_UNWRAPPED}."
)
NO_SCOPE_HINT = f"{OPEN_SCOPE_HINT} {REGISTERED_HINT}"

# The ASGI scope type that the middleware let through without a store (a "websocket"
# left out of its scope_types, the "lifespan"), so that errors there name the fix
# rather than the middleware the app has.
passed_through: ContextVar[str | None] = ContextVar("perrequest.passed_through", default=None)


# Where a scope is open in the process but not here: the middleware is there, most likely.
ELSEWHERE_HINT = (
    "A request scope is open in this process, but not here: this code most likely runs in "
    f"{_IN_A_THREAD}. Or it runs in {_UNWRAPPED}. Or the open scope is a response's not "
    "closed yet (a test client's, read after client.get(...): its store was active only "
    "while the app ran; close it, and open `with perrequest.request_scope():` for the "
    "test's own code). docs/errors.md, 'Called outside a scope'."
)

ENDED_HINT = (
    "This code runs in a request scope that has ended: after its request (a task that "
    "outlived it, a callback or a bind_scope() callable called late), where nothing is "
    "cached any more. Do the work within the request (await the task; a Starlette "
    "BackgroundTask runs within the scope), or give it a scope of its own: "
    "`with perrequest.request_scope():`."
)


def no_scope_hint(hint: str = NO_SCOPE_HINT) -> str:
    """``hint``; or why there is no store here: the scope ended, the ASGI middleware let
    the scope through, or a scope is open in another thread (the middleware is there)."""
    active = here()
    if active is not None and active._closed:
        return ENDED_HINT
    if _calling.get():
        return IN_A_LISTENER_HINT
    kind = passed_through.get()
    if kind is None:
        return ELSEWHERE_HINT if live_scopes() else hint
    if kind == "lifespan":
        return (
            "This code runs in (or was started from) the ASGI lifespan, which never gets "
            "a store: wrap the start-up or shutdown work in "
            "`with perrequest.request_scope():`."
        )
    return (
        f"This code runs in (or was started from) an ASGI {kind!r} scope, which "
        f"RequestScopeMiddleware let through without a store, as its scope_types say: list "
        f"{kind!r} there (RequestScopeMiddleware(app, scope_types=('http', 'websocket')): a "
        "websocket's store lasts as long as its connection), or wrap the work (each "
        "message's, in a websocket) in `with perrequest.request_scope():`."
    )


def current_store() -> MemoStore:
    """The active store; raises ``NoActiveScope`` when no scope is open."""
    store = here()
    if store is None or store._closed:
        raise NoActiveScope(f"no request scope is active. {no_scope_hint()}")
    return store


def in_request_scope() -> bool:
    """True when a request scope is active in the current context."""
    store = _current.get()
    if type(store) is list:
        return store[0] is not None  # a cell: open until close_request
    if store is not None and store._closed and store._token is not None:
        store = here()  # closed in another context: what it replaced, unwound
    return store is not None and not store._closed


def get(key: Hashable, default: Any = None) -> Any:
    """The value at ``key`` in the active store, or ``default`` (also outside a scope).
    An unhashable ``key`` raises ``TypeError``, in a scope or not, as a dict would."""
    store = active_store()
    if store is None:
        check_key(key)  # refused as in a scope, not only once a store holds something
        return default
    return store.get(key, default)


def set(key: Hashable, value: Any) -> None:
    """Store ``value`` at ``key`` in the active store; raises ``NoActiveScope`` outside one."""
    current_store()[key] = value


def get_or_set(key: Hashable, factory: Callable[[], T]) -> T:
    """The value at ``key``, ``factory()`` (a zero-argument callable) filling it once;
    ``NoActiveScope`` outside a scope."""
    return current_store().get_or_set(key, factory)


def delete(key: Hashable) -> bool:
    """Remove ``key`` from the active store; whether it was there. ``NoActiveScope`` outside."""
    absent = object()
    return current_store().pop(key, absent) is not absent


if TYPE_CHECKING:  # type checkers flag ``with request_scope:`` themselves
    _Forgotten = type
else:

    class _Forgotten(type):
        """``with request_scope:`` (the class, not a scope): say how, not Python's plain
        "does not support the context manager protocol"."""

        def __enter__(cls) -> NoReturn:
            raise TypeError(
                "`with request_scope:` uses the class itself: call it, "
                "`with request_scope():` (or `async with request_scope():`), with the parentheses."
            )

        def __exit__(cls, *exc: object) -> None:  # never reached: __enter__ raised
            pass

        async def __aenter__(cls) -> NoReturn:
            _Forgotten.__enter__(cls)  # not cls.__enter__: the class's own, for its objects

        async def __aexit__(cls, *exc: object) -> None:
            pass


class request_scope(metaclass=_Forgotten):
    """Open a fresh, isolated store for a ``with``/``async with`` block or each decorated call.

    On exit the previous store (or none) is active again and the new one is
    closed: cleared at once, ``on_close(stats)`` called, stats logged at DEBUG.
    An object is single-use, like the context managers of ``contextlib``; as a
    decorator (``@request_scope()``) it opens a fresh scope for every call.

    Args:
        max_entries: The new store's bound (LRU eviction); None: unbounded.
        on_close: Called with the store's ``ScopeStats`` when the scope closes.
    """

    __slots__ = ("_max_entries", "_on_close", "_store")
    _max_entries: int | None
    _on_close: OnClose | None
    _store: MemoStore | bool | None  # None: not entered; True: entering; the store; False: exited

    @explains_options(
        "request_scope()",
        misused="request_scope() takes its options as keywords, not {0!r}. To decorate a "
        "function, call it: @request_scope(), with the parentheses.",
    )
    def __init__(
        self, *, max_entries: int | None = DEFAULT_MAX_ENTRIES, on_close: OnClose | None = None
    ) -> None:
        self._max_entries, self._on_close = check_options("request_scope", max_entries, on_close)
        self._store = None

    def __enter__(self) -> MemoStore:
        with _entering:
            if self._store is not None:
                raise RuntimeError(
                    "this request_scope() object was entered already: a scope object is "
                    "single-use. Create one per block (`with request_scope():`), or use it as "
                    "a decorator, which opens a fresh scope for every call."
                )
            self._store = True
        store = self._store = open_scope(self._max_entries, self._on_close)
        return store

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with _entering:  # two threads exiting it at once: one closes it, once
            store, self._store = self._store, False if self._store is not None else None
        if store is False:
            return  # exited already: a no-op
        if not isinstance(store, MemoStore):
            raise RuntimeError(
                "request_scope() exited, but it was not entered: let the statement that "
                "enters it exit it, `with request_scope():` (or an ExitStack's "
                "enter_context), rather than calling __exit__ by hand."
            )
        close_scope(store)

    async def __aenter__(self) -> MemoStore:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        refuse_task(fn, "@request_scope()")  # first: a check by isinstance evaluates a proxy
        if isinstance(fn, (staticmethod, classmethod)):
            # Above @staticmethod/@classmethod, as below it (and as request_memo): the
            # function is scoped and stays a static or class method.
            return cast("Callable[P, R]", type(fn)(self(fn.__func__)))
        if not callable(fn):
            raise TypeError(f"@request_scope() decorates a function, not {fn!r}")
        refuse_class(fn, "@request_scope()")
        refuse_generator(fn, "@request_scope()")
        options = self._max_entries, self._on_close
        return _around(fn, "@request_scope()", lambda: open_scope(*options), close_scope)


def bind_scope(fn: Callable[P, R]) -> Callable[P, R]:
    """Return ``fn`` bound to the scope active now, for whatever thread or task calls it.

    For ``loop.run_in_executor``, ``ThreadPoolExecutor.submit``, ``threading.Thread``
    and callbacks, which do not carry the context along. Called after the scope
    has closed, ``fn`` runs outside any scope. ``NoActiveScope`` outside a scope.

    Args:
        fn: A sync or async callable (not a generator function).
    """
    if not callable(fn):
        raise TypeError(f"bind_scope() takes a callable, not {fn!r}")
    refuse_generator(fn, "bind_scope()")
    store = active_store()
    if store is None:
        raise NoActiveScope(
            f"bind_scope({getattr(fn, '__qualname__', fn)!r}) was called outside a request "
            f"scope, so there is no scope to bind. Call it inside the request. "
            f"{no_scope_hint(OPEN_SCOPE_HINT)}"
        )

    fetching = within.get()  # a batch function's worker loads its fetch's keys itself

    def enter() -> tuple[Token[Any], Token[tuple[Any, ...]], Token[Any] | None]:
        # A closed store is not set: unwound by the call's code where it was opened, its
        # token would show the caller's scope to the call and be lost to the caller. The
        # shared closed one, with no token, is: misuse errors say the scope has ended.
        closed, opened_by = store._closed, store._token  # (the fn may close it)
        # Added to the caller's: called in another batch function, it keeps that fetch.
        fetch = within.set((*within.get(), *fetching))
        return _current.set(_NONE_MADE if closed else store), fetch, opened_by

    def leave(tokens: tuple[Token[Any], Token[tuple[Any, ...]], Token[Any] | None]) -> None:
        within.reset(tokens[1])
        opened_by = tokens[2]
        # The call closed its scope (a bound cleanup), with its token: here, where it opened
        # (closed by its opener elsewhere meanwhile, it is still what the call has active),
        # and it, or one opened on it, was active before the call: what it replaced is back
        # already, and stays.
        closed = store._token is None and _current.get() is not store
        if not (opened_by is not None and closed and opened_on(tokens[0].old_value, store)):
            _current.reset(tokens[0])

    return _around(fn, "bind_scope()", enter, leave)


def _around(
    fn: Callable[P, R], what: str, enter: Callable[[], T], leave: Callable[[T], object]
) -> Callable[P, R]:
    """``fn`` run between ``enter()`` and ``leave(entered)``; async if ``fn`` is."""
    if is_async_callable(fn):

        @functools.wraps(fn)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            entered = enter()
            try:
                return await cast("Awaitable[Any]", fn(*args, **kwargs))
            finally:
                leave(entered)

        return cast("Callable[P, R]", run_async)

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        entered = enter()
        try:
            result = fn(*args, **kwargs)
        finally:
            leave(entered)
        refuse_coroutine(result, fn, what)  # its body ran after leave(): outside the scope
        return result

    return run
