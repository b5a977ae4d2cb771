"""The one lifecycle every entry point uses: open a scope, activate it, close it.

``open_scope`` and its companions are the single place where a store is
created, made active in a ``ContextVar``, and closed: the middlewares,
``request_scope`` and the Celery integration all go through them, and so do
the response-body wrappers that keep a scope active while a body is produced
after the app returned. They run once or twice per request, so they are
plain functions doing as little as possible; the state of a scope lives on
its store.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from contextvars import ContextVar, Token
from typing import Any, Final, Generic, TypeVar, cast

from .store import DEFAULT_MAX_ENTRIES, MemoStore, ScopeStats

__all__ = [
    "REQUEST_KEY",
    "AsyncScopedBody",
    "OnClose",
    "ScopedBody",
    "check_on_close",
    "close_in_scope",
    "close_scope",
    "deactivate",
    "end_scope",
    "leave_scope",
    "live_scopes",
    "open_scope",
    "opened_outside",
]

T = TypeVar("T")

OnClose = Callable[[ScopeStats], object]

logger = logging.getLogger("perrequest")
_DEBUG = logging.DEBUG
# Logger.isEnabledFor answers from this dict (cleared in place when levels
# change); reading it directly saves a Python call on every request.
_level_cache: dict[int, bool] = getattr(logger, "_cache", {})

_current: ContextVar[MemoStore | None] = ContextVar("perrequest.store", default=None)

# Scopes opened and closed in this process. next() on an itertools.count is
# atomic, so no lock sits on the path every request takes.
_count_open = itertools.count()
_count_closed = itertools.count()

_new_store = object.__new__
_now = time.perf_counter


def live_scopes() -> int:
    """How many scopes are open in this process right now."""
    while True:  # a consistent pair: no scope closed while the opened count was read
        closed = _peek(_count_closed)
        opened = _peek(_count_open)
        if _peek(_count_closed) == closed:
            return opened - closed


def _peek(counter: itertools.count[int]) -> int:
    """An itertools.count's next value, read without taking it: "count(41)" -> 41."""
    return int(repr(counter)[6:-1])


def _is_async_callable(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def check_on_close(on_close: object) -> OnClose | None:
    """Validate an ``on_close`` option: None or a sync callable taking ``ScopeStats``."""
    if on_close is None:
        return None
    if not callable(on_close):
        raise TypeError(
            f"on_close must be a callable taking ScopeStats, or None, not "
            f"{type(on_close).__name__} {on_close!r}"
        )
    if _is_async_callable(on_close):
        raise TypeError(
            f"on_close must be a plain (sync) function, not the async {on_close!r}: it runs "
            "as the scope closes, where nothing would await it. Record the stats in a sync "
            "function (hand them to a queue or a background task if the work is async)."
        )
    try:
        inspect.signature(on_close).bind(None)
    except TypeError:
        raise TypeError(
            f"on_close={on_close!r} cannot be called with one argument; it is called as "
            "on_close(stats) with a ScopeStats"
        ) from None
    except ValueError:  # no signature to check (some builtins): trust it
        pass
    return cast("OnClose", on_close)


# -- the lifecycle -------------------------------------------------------------------------------

# Where a middleware leaves the store it opened, in the ASGI scope or WSGI
# environ, so that a second perrequest middleware on the same request (a
# mounted sub-app with its own, or one registered twice) uses it instead of
# hiding it behind a new one.
REQUEST_KEY: Final = "perrequest.store"


def opened_outside(marker: object) -> bool:
    """True when ``marker`` (what is at ``REQUEST_KEY``; callers skip ``None``, the
    common case, themselves) is the store of an outer perrequest middleware, still
    open and active here: this request has its scope already."""
    current = _current.get()
    return marker is current and current is not None and not current._closed


def open_scope(
    max_entries: int | None = DEFAULT_MAX_ENTRIES, on_close: OnClose | None = None
) -> MemoStore:
    """Open a scope and make its new store the active one in the current context.

    The options must be validated already (``check_max_entries``,
    ``check_on_close``): this runs for every request.
    """
    store: MemoStore = _new_store(MemoStore)  # no __init__: nothing to validate again
    store._max_entries = max_entries
    store._on_close = on_close
    store._opened_at = _now()
    store._closed = False
    store._lock = store._order = store._subs = None
    next(_count_open)
    store._token = _current.set(store)
    return store


def leave_scope(store: MemoStore) -> None:
    """Restore, in this context, what was active before ``open_scope``; the scope stays open."""
    deactivate(store._token, store)


def end_scope(store: MemoStore) -> None:
    """``leave_scope`` then ``close_scope``: for a scope that ends where it began."""
    deactivate(store._token, store)
    close_scope(store)


def close_scope(store: MemoStore) -> None:
    """End the scope: clear its store, then log its stats at DEBUG and call ``on_close``.

    Idempotent. Called by whoever owns the end of the request, once the
    response is complete; code still running in the scope's context then
    finds itself outside any scope.
    """
    if store._closed:
        return
    store._closed = True
    store._closed_at = _now()
    next(_count_closed)
    if store._lock is None and store._on_close is None and not _level_cache.get(_DEBUG, True):
        return  # nothing written, nobody listening
    _report(store)


def _report(store: MemoStore) -> None:
    on_close = store._on_close
    debug = logger.isEnabledFor(_DEBUG)
    stats = store._shut(on_close is not None or debug)
    if stats is None:
        return
    if debug:
        logger.debug("request scope closed: %s", stats)
    if on_close is not None:
        try:
            on_close(stats)
        except Exception:
            logger.exception("perrequest: on_close callback %r raised", on_close)


def deactivate(token: Token[MemoStore | None], store: MemoStore) -> None:
    """Undo the ``_current.set(store)`` that gave ``token``."""
    try:
        _current.reset(token)
    except ValueError:
        _restore_foreign(token, store)


def _restore_foreign(token: Token[MemoStore | None], store: MemoStore) -> None:
    """Undo ``_current.set(store)`` in another context than the one it was made in
    (a generator closed by another task or request). Only undo our own store
    there: whatever else that context holds belongs to someone else."""
    if _current.get() is store:
        previous = token.old_value
        _current.set(None if previous is Token.MISSING else previous)


class ScopedBody(Generic[T]):
    """A response body that keeps its scope active while it is produced, and ends it.

    WSGI servers iterate the body after the app returned, and call ``close()``
    when the response is done (PEP 3333: also when the client went away);
    that is when the scope closes, after the body's own closing (``closers``,
    by default the body's ``close``) has run with the scope active. If a server
    never calls ``close()``, that happens when the body is garbage collected.
    """

    __slots__ = ("_body", "_chunks", "_closers", "_store")

    def __init__(
        self,
        body: Iterable[T],
        store: MemoStore,
        closers: list[Callable[[], object]] | None = None,
    ) -> None:
        self._body = body
        self._store: MemoStore | None = store
        self._chunks: Iterator[T] | None = None
        if closers is None:
            close = getattr(body, "close", None)
            closers = [] if close is None else [close]
        self._closers = closers

    def __iter__(self) -> Iterator[T]:
        store = self._store
        if store is None:
            return iter(())
        # The generator holds this body, so that a server keeping only the iterator
        # keeps the scope open too; the body does not hold it (no reference cycle).
        return _produce(self._body, store, self)

    def __next__(self) -> T:  # for servers that call next() on the body itself
        chunks = self._chunks
        if chunks is None:
            store = self._store
            chunks = self._chunks = iter(()) if store is None else _produce(self._body, store)
        return next(chunks)

    def close(self) -> None:
        """Close the wrapped body (with the scope active), then the scope."""
        store = self._store
        if store is None:
            return
        self._store = None
        try:
            if self._closers:
                token = _current.set(store)
                try:
                    _call_all(self._closers)
                finally:
                    deactivate(token, store)
        finally:
            close_scope(store)

    def __del__(self) -> None:
        # A server that never calls close() breaks PEP 3333; close everything anyway.
        if self._store is not None:
            self.close()


def close_in_scope(body: object, store: MemoStore) -> bool:
    """Make ``body.close()`` run with the scope active and then end it, leaving the
    body itself as it is (a server's ``wsgi.file_wrapper``, which the server must
    still recognise to use sendfile). False if the body will not take it.

    The new ``close`` is a ``ScopedBody``'s that holds only the old one: freed
    with the body, it ends the scope for a server that never calls ``close()``.
    """
    close = getattr(body, "close", None)
    closer: ScopedBody[bytes] = ScopedBody((), store, [] if close is None else [close])
    try:
        body.close = closer.close  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        closer._store = None  # it will not close anything: the caller wraps the body
        return False
    return True


def _call_all(closers: list[Callable[[], object]]) -> None:
    """Call every closer, even when one raises; then raise the first error."""
    error: BaseException | None = None
    for close in closers:
        try:
            close()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error


def _produce(body: Iterable[T], store: MemoStore, keep: object = None) -> Iterator[T]:
    """The chunks of ``body``, each produced with ``store`` active.

    A generator, because resuming one costs less than a call to ``__next__``,
    and this runs for every chunk of every response. ``keep`` is only held.
    """
    current = _current
    iterator = None
    while True:
        token = current.set(store)
        try:
            if iterator is None:
                iterator = iter(body)
            chunk = next(iterator)
        except StopIteration:
            return
        finally:
            try:
                current.reset(token)
            except ValueError:  # resumed in another context than the last chunk
                _restore_foreign(token, store)
        yield chunk


class AsyncScopedBody(Generic[T]):
    """The async twin of ``ScopedBody``, for an async response body (Django's ASGI).

    The scope closes when the body is exhausted, fails or is closed. ``close()``
    is sync because the framework calls it so (Django's ``response.close()``,
    from a worker thread): if the body was left suspended (the client went
    away mid-stream), it closes it on its own event loop, with the scope
    active, rather than leaving that to the garbage collector, which would run
    the body's ``finally`` in whatever context happened to collect it.
    """

    __slots__ = ("_body", "_chunks", "_closing", "_loop", "_store")

    def __init__(self, body: AsyncIterable[T], store: MemoStore) -> None:
        self._body = body
        self._store = store
        self._chunks: AsyncGenerator[T, None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    def __aiter__(self) -> AsyncIterator[T]:
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = self._produce()
        return chunks

    async def _produce(self) -> AsyncGenerator[T, None]:
        store = self._store
        self._loop = asyncio.get_running_loop()
        iterator = aiter(self._body)
        try:
            while True:
                token = _current.set(store)
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    return
                finally:
                    deactivate(token, store)
                yield chunk
        finally:
            try:
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    token = _current.set(store)
                    try:
                        await aclose()
                    finally:
                        deactivate(token, store)
            finally:
                close_scope(store)

    def close(self) -> None:
        """End the body and the scope; a suspended body is closed on its own loop."""
        store, chunks, loop = self._store, self._chunks, self._loop
        if store._closed or self._closing:
            return
        self._closing = True
        if chunks is None or loop is None or loop.is_closed():
            close_scope(store)  # never started: none of the body's code ran
            return
        try:
            loop.call_soon_threadsafe(_close_on_loop, chunks, store)
        except RuntimeError:  # the loop closed just now: nothing of the body can run again
            close_scope(store)


def _close_on_loop(chunks: AsyncGenerator[Any, None], store: MemoStore) -> None:
    def done(task: asyncio.Task[None]) -> None:
        close_scope(store)  # if the body could not be closed, the scope still is
        if not task.cancelled() and task.exception() is not None:
            logger.error("perrequest: closing a response body failed", exc_info=task.exception())

    asyncio.get_running_loop().create_task(chunks.aclose()).add_done_callback(done)
