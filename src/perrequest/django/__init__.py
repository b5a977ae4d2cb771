"""Django middleware: one store per request, for sync and async views alike.

The store is set and reset around ``get_response`` in ``__call__``, never in
``process_request``/``process_response``: under ASGI those run in different
contexts, and a token set in one cannot be reset in the other. The store
closes when Django closes the response (its ``close``, set on the response,
runs Django's own with the store active); a streaming response's content is
wrapped (through the public ``streaming_content`` setter) so each chunk sees
the store. docs/frameworks/django.md has the details.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from types import MethodType
from typing import Any

try:
    from asgiref.sync import iscoroutinefunction, markcoroutinefunction

    from ._settings import read_settings  # Django's settings
except ImportError as exc:  # name the extra to install
    from .._extras import missing_extra

    toolbar = " ('perrequest[toolbar]' for its toolbar)"  # which imports this first
    missing_extra(exc, __name__, "django", "django", also=toolbar)

from .._active import REQUEST_KEY, _current, close_request, open_request, opened_outside
from .._checks import binds, is_wsgi_app

__all__ = ["RequestScopeMiddleware"]


class RequestScopeMiddleware:
    """Open a fresh store for each request; close it when the response is complete.

    Sync and async capable, so async views get no thread switch. List it
    first in ``MIDDLEWARE``.

    Args:
        get_response: The rest of the middleware stack, as Django passes it.
            The options come from ``settings.PERREQUEST`` (``"MAX_ENTRIES"``,
            ``"ON_CLOSE"``: a callable or a dotted path to one), read here.

    Raises:
        ImproperlyConfigured: A bad ``settings.PERREQUEST``, naming the key.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        _check_get_response(get_response)
        self.get_response = get_response
        self._options = read_settings()
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: Any) -> Any:
        if self._is_async:
            return self._acall(request)
        if _opened_outside(request):
            return self.get_response(request)
        cell, token = open_request(self._options)
        request._perrequest_cell = cell
        try:
            response = self.get_response(request)
        except BaseException:
            close_request(cell, token)
            raise
        _current.reset(token)  # the thread as it was; the scope stays open
        return _tie_to_response(response, cell)

    async def _acall(self, request: Any) -> Any:
        if _opened_outside(request):
            return await self.get_response(request)
        cell, token = open_request(self._options)
        request._perrequest_cell = cell
        try:
            response = await self.get_response(request)
        except BaseException:  # cancellation (client gone) closes the store too
            close_request(cell, token)
            raise
        _current.reset(token)
        return _tie_to_response(response, cell)


def _check_get_response(get_response: object) -> None:
    """Made with an application (Django's ``ASGIHandler``, ``WSGIHandler``) instead of
    listed in ``MIDDLEWARE``: say which middleware wraps it."""
    if binds(get_response, 1):  # what Django gives: a callable of the request
        return
    if is_wsgi_app(get_response):
        kind, article = "wsgi", "a"
    elif binds(get_response, 3):
        kind, article = "asgi", "an"
    else:
        return
    raise TypeError(
        f"perrequest.django.RequestScopeMiddleware goes in settings.MIDDLEWARE, where Django "
        f"makes it with get_response, a callable of the request; {get_response!r} is {article} "
        f"{kind.upper()} app: wrap it with perrequest.{kind}.RequestScopeMiddleware instead"
    )


def _opened_outside(request: Any) -> bool:
    """An outer perrequest layer opened this request's scope: the same middleware
    listed twice (its cell on the request: not in ``request.META``, which under ASGI is a
    dict of plain values that code pickles or logs as JSON), or the WSGI/ASGI application
    wrapped as well (in the environ, which is ``request.META``, or the ASGI scope). None
    is active where nothing is (about 4,000 instructions a request less)."""
    if _current.get() is None:
        return False
    scope = getattr(request, "scope", None)  # Django's ASGIRequest: the ASGI scope
    return (
        opened_outside(getattr(request, "_perrequest_cell", None))
        or opened_outside(request.META.get(REQUEST_KEY))
        or (isinstance(scope, dict) and opened_outside(scope.get(REQUEST_KEY)))
    )


def _tie_to_response(response: Any, cell: list[Any]) -> Any:
    """End the scope when Django closes the response (the WSGI server's ``close()``, the
    ASGI handler's after the last byte), after Django's own close (its closers, then
    ``request_finished``) has run with the store active; a streaming body's chunks see
    the store too."""
    try:
        # A file's content (read as it is sent: no app code) is left alone. Looked for on
        # streaming responses only: a missing attribute costs an exception in getattr.
        streaming = getattr(response, "streaming", False)
        file = streaming and getattr(response, "file_to_stream", None) is not None
        hook = vars(response).get("close")  # a view's or middleware's: rare
        closing = _Closing(response, None if hook is None else _hook(hook, response), cell, file)
        if streaming and not file:
            # The body holds ``closing`` (its ``end``): a middleware above that replaces
            # ``close`` does not end the scope under the body.
            content = response.streaming_content
            if getattr(response, "is_async", False):
                response.streaming_content = _produce_async(content, cell, closing.end)
            else:
                response.streaming_content = _produce(content, cell, closing.end)
        response.close = closing
    except BaseException:
        close_request(cell, None)
        raise
    return response


class _Closing:
    """``response.close``: the response's own close (a ``hook`` set on it by a view or
    middleware, or its class's) with the store active, then the scope ends. Holds the
    response weakly (no cycle with its close; a file's strongly, until closed). A
    response dropped unclosed (a middleware above replaced it) frees it, which ends the
    scope, and only the scope: cheaper than a ``weakref.finalize`` per response. Pickled
    (the site cache stores responses) as the class's close of the response: a copy read
    back has no scope to end."""

    __slots__ = ("_cell", "_file", "_hook", "_response")

    def __init__(
        self, response: Any, hook: Callable[[], object] | None, cell: list[Any], file: bool
    ) -> None:
        self._response = weakref.ref(response)
        self._hook, self._cell = hook, cell
        # Django's WSGI handler hands a file's response over as the server's file wrapper,
        # keeping only this close (on the file): it must keep the response until then.
        self._file = response if file else None

    def __call__(self) -> None:
        target, self._file = self._response(), None
        token = _current.set(self._cell)
        try:
            if self._hook is not None:
                self._hook()
            elif target is not None:
                type(target).close(target)
        finally:
            _current.reset(token)
            close_request(self._cell, None)

    def end(self) -> None:
        """End the scope, and only the scope (idempotent)."""
        close_request(self._cell, None)

    def __del__(self, close_request: Callable[..., None] = close_request) -> None:
        # A default, not the global: an exiting interpreter may have wiped the module.
        if self._cell[0] is not None:  # not closed yet (a call less: the common case)
            close_request(self._cell, None)

    def __reduce__(self) -> tuple[Any, ...]:
        if self._hook is not None:
            return _hook_of, (self._hook,)
        return getattr, (self._response(), "close")  # read back: the class's, bound


def _hook(hook: Callable[[], object] | None, response: Any) -> Callable[[], object] | None:
    """The ``close`` a view or middleware set on ``response`` itself (``hook``): not
    perrequest's (a response object returned again), nor the class's own bound to it (a
    page read back from the cache: ``_Closing.__reduce__``), which would hold it in a cycle."""
    while type(hook) is _Closing:
        hook = hook._hook
    if type(hook) is MethodType and hook.__self__ is response:
        return None if hook.__func__ is getattr(type(response), "close", None) else hook
    return hook


def _hook_of(hook: Callable[[], object]) -> Callable[[], object]:
    """A response's own ``close`` hook, as read back from a pickle (``_Closing``)."""
    return hook


def _produce(content: Iterable[Any], cell: list[Any], end: Callable[[], object]) -> Iterator[Any]:
    """Each chunk of a sync streaming body, produced with the request's store active.
    A body that raises ends the scope at once (``end``): Django's ASGI handler never
    closes a response whose body failed."""
    iterator, active = None, cell
    while True:
        token = _current.set(active)
        try:
            if iterator is None:
                iterator = iter(content)
            chunk = next(iterator)
        except StopIteration:
            return
        except BaseException:
            end()
            raise
        finally:
            active = _current.get()  # a request_scope() the body holds across its yields
            _current.reset(token)
        yield chunk


async def _produce_async(
    content: AsyncIterable[Any], cell: list[Any], end: Callable[[], object]
) -> AsyncIterator[Any]:
    """The async twin of ``_produce``. Django does not close an async body left
    suspended: its cleanup runs when the loop finalizes it, with this request's
    store active, closed by then, so that it touches nobody's store."""
    iterator, active = aiter(content), cell
    try:
        while True:
            token = _current.set(active)
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:  # the client left: Django closes the response
                raise
            except BaseException:
                end()
                raise
            finally:
                active = _current.get()  # as in _produce
                _current.reset(token)
            yield chunk
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            token = _current.set(active)
            try:
                await aclose()
            finally:
                _current.reset(token)
