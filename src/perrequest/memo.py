"""``@request_memo``: memoize a function within the active request scope.

Each decorated function's entries live in a dict of their own in the store,
keyed by its private ``_MemoSpec``: two functions never share entries and no
user key can equal a memo key. The hit is the wrapper's (``_wrappers``);
everything else is the spec's.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Hashable, MutableMapping
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, overload

from . import _checks, _flight
from ._active import active_store
from ._checks import check_max_entries, is_async_callable, unknown_option
from ._shared import Tier, check_shared, make_tier
from ._stats import Counter, function_name
from ._targets import refuse_generator, refuse_memo_target
from ._typing import CacheInfo, MemoizedFunction, SharedMemoizedFunction
from ._wrappers import make_wrapper
from .errors import NoActiveScope, ScopeClosed
from .scope import REGISTERED_HINT, no_scope_hint
from .store import MemoKey, MemoStore

if TYPE_CHECKING:  # never imported at run time: the core does not import redis
    from .redis import RedisCache, RedisMemoizedFunction

__all__ = ["request_memo"]

P = ParamSpec("P")
R = TypeVar("R")

_ABSENT: Any = object()  # what pop() returns for a missing entry
logger = logging.getLogger("perrequest")
# The test suite's choice (the pytest plugin's perrequest_outside_scope) for every memo
# and loader left at outside_scope="warn"; "call" and "raise" are their authors' choice.
outside_override: str | None = None
# Names warned about outside a scope, once each; bounded, like everything here.
warned_outside: set[str] = set()
_WARNED_MAX = 10_000
# Reentrant: a collection starting in it (3.12+: at any eval-breaker check) may run a cleanup
# that calls a memo outside any scope (the store is hidden), in this thread.
_warned_lock = threading.RLock()


def _forked() -> None:
    """A forked child is a process of its own: it warns once per function too (gunicorn
    --preload's workers after a call at import), with a lock no parent thread holds."""
    global _warned_lock
    warned_outside.clear()
    _warned_lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_forked)
OUTSIDE_SCOPE = ("warn", "call", "raise")
_OPTIONS = ("key", "typed", "max_entries", "outside_scope", "shared", "version")


class _MemoSpec:
    """Everything about one decorated function that is not on the hit path."""

    __slots__ = (
        "__weakref__",
        "fn",
        "is_async",
        "is_method",
        "key_fn",
        "keyof",
        "max_entries",
        "name",
        "outside_scope",
        "shared",
        "typed",
        "wrapper",
    )
    wrapper: weakref.ref[Callable[..., Any]]  # the generated wrapper, which _slow calls again

    def __init__(
        self,
        fn: Callable[..., Any],
        key_fn: Callable[..., Hashable] | None,
        typed: bool,
        max_entries: int | None,
        outside_scope: str,
        shared: object,
        version: str | int | None = None,
    ) -> None:
        self.fn = fn
        self.key_fn = key_fn
        self.typed = typed
        self.max_entries = max_entries
        self.outside_scope = outside_scope
        self.is_method = _checks.is_method(fn)
        self.is_async = is_async_callable(fn)
        self.name = function_name(fn)
        # The generated wrapper's twin (_wrappers.generate); None: _checks.call_key. Not a
        # closure over self: that cycle kept fn, and all its closure holds, for the GC.
        self.keyof: Callable[..., tuple[Hashable, Any]] | None = None
        self.shared: Tier | None = None if shared is None else make_tier(shared, self, version)

    def __repr__(self) -> str:
        return f"<request_memo {self.name}>"

    def checked(self, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            hash(key)
        except TypeError as exc:
            raise _checks.unhashable(self, args, kwargs, exc) from None

    def outside(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: Hashable) -> Any:
        """A call outside any scope: the key is still checked (the same error everywhere)."""
        self.checked(key, args, kwargs)
        redis_key = getattr(self.shared, "redis_key", None)  # a Redis tier's: encodable too
        if redis_key is not None:
            redis_key(key, args, kwargs)
        refuse_or_warn("request_memo", self.name, self.outside_scope, "cached", OUTSIDE_FIX)
        return self.fn(*args, **kwargs)  # for an async function, the caller awaits it

    def prepare(
        self, store: MemoStore, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Counter | None:
        """This function's counters, after checking the key; None if the scope has ended
        meanwhile (the call is then outside any scope)."""
        self.checked(key, args, kwargs)
        try:
            return store._counters[self.name]
        except KeyError:  # the store's or this function's first miss
            try:
                return store._counter(self.name)
            except ScopeClosed:
                return None

    def runner(self) -> Callable[..., Any]:
        if self.shared is not None:
            return self.shared.run_async if self.is_async else self.shared.run
        return _flight.run_async if self.is_async else _flight.run

    def cache_info(self) -> CacheInfo:
        store = active_store()
        hits, misses, currsize = (0, 0, 0) if store is None else store._info(self, self.name)
        return CacheInfo(hits, misses, self.max_entries, currsize)

    def cache_clear(self) -> None:
        # The shared cache outlives requests: cleared from anywhere, as cache_delete does.
        store = active_store()
        if store is not None:
            store._remove_owner(self)
        if self.shared is not None:
            self.shared.clear(self)

    def cache_delete(self, /, *args: Any, **kwargs: Any) -> bool:
        if self.keyof is None:  # keyed by call shape: any arguments make a key
            key, _ = _checks.call_key(self, args, kwargs)
        else:
            try:
                key, _ = self.keyof(*args, **kwargs)
            except TypeError as exc:  # the arguments do not bind: its only error
                raise TypeError(
                    f"{self.name}.cache_delete() takes the arguments a call takes ({exc})."
                    + " A method's takes its instance (a classmethod's, its class) too:"
                    " obj.method.cache_delete(obj, ...)." * self.is_method
                ) from None
        if self.is_method and self.key_fn is None:  # key= may leave the instance out
            _checks.check_instance(self.name, self.fn, args, kwargs)
        self.checked(key, args, kwargs)
        deleted = self.shared is not None and self.shared.delete((self, key))
        store = active_store()
        if store is None:
            return deleted
        return store.pop(MemoKey(self, key), _ABSENT) is not _ABSENT or deleted


@overload
def request_memo(fn: Callable[P, R], /) -> MemoizedFunction[P, R]: ...


@overload
def request_memo(
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    max_entries: int | None = None,
    outside_scope: Literal["warn", "call", "raise"] = "warn",
    shared: None = None,
) -> Callable[[Callable[P, R]], MemoizedFunction[P, R]]: ...


@overload
def request_memo(
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    max_entries: int | None = None,
    outside_scope: Literal["warn", "call", "raise"] = "warn",
    shared: MutableMapping[Any, Any],
) -> Callable[[Callable[P, R]], SharedMemoizedFunction[P, R]]: ...


@overload
def request_memo(
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    max_entries: int | None = None,
    outside_scope: Literal["warn", "call", "raise"] = "warn",
    shared: RedisCache,
    version: str | int | None = None,
) -> Callable[[Callable[P, R]], RedisMemoizedFunction[P, R]]: ...


def request_memo(
    fn: Any = None,
    /,
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    max_entries: int | None = None,
    outside_scope: Literal["warn", "call", "raise"] = "warn",
    shared: MutableMapping[Any, Any] | RedisCache | None = None,
    version: str | int | None = None,
    **unknown: Any,
) -> Any:
    """Memoize a sync or async function, method, classmethod or staticmethod per request.

    Within the active scope each distinct call runs once; concurrent callers of
    the same key (tasks or threads) share one computation. Outside any scope
    nothing is cached: the function is called and a warning logged once
    (``outside_scope="warn"``), called silently (``"call"``), or
    ``NoActiveScope`` is raised (``"raise"``). Also usable bare: ``@request_memo``.

    ``shared=`` puts a bounded process-wide cache (``cachetools.LRUCache``,
    ``TTLCache``, any mapping with a ``maxsize``) behind the request store.

    Args:
        fn: The function, when used bare (``@request_memo``).
        key: A function of the same arguments (``self`` included) returning a
            hashable key, for unhashable arguments; its result alone is the key.
        typed: Tell equal arguments of different types apart (``1``, ``1.0``).
        max_entries: Bound this function's entries within each store (least
            recently used go first); ``None``: only the store's bound applies.
        outside_scope: Outside any scope, ``"warn"``: call uncached and log one
            WARNING per function; ``"call"``: call silently; ``"raise"``.
        shared: A bounded process-wide cache, or a ``RedisCache``, behind the store.
        version: With ``RedisCache``, part of the keys: change it with the values' shape.

    Returns:
        A ``MemoizedFunction``: the function, typed as itself, plus
        ``cache_info()``, ``cache_clear()``, ``cache_delete(...)``; with ``shared=``,
        ``shared_info()`` too (the shared tier's counters in this process).
    """
    if unknown:
        raise TypeError(unknown_option("request_memo()", next(iter(unknown)), _OPTIONS))
    if key is not None and (not callable(key) or is_async_callable(key)):
        raise TypeError(
            f"request_memo(key=...) must be a plain (sync) function of the memoized "
            f"function's arguments returning a hashable key, not {type(key).__name__} {key!r}"
        )
    if not isinstance(typed, bool):
        raise TypeError(f"request_memo(typed=...) must be True or False, not {typed!r}")
    if typed and key is not None:
        raise TypeError(
            "request_memo(typed=True, key=...): the key function alone decides the key, so "
            "typed=True would be ignored. Drop typed=True, or include the argument types in "
            "what key= returns (e.g. key=lambda x: (type(x), x))."
        )
    max_entries = check_max_entries(max_entries, "request_memo(max_entries=...)")
    if outside_scope not in OUTSIDE_SCOPE:
        raise ValueError(
            f"request_memo(outside_scope=...) must be 'warn' (call uncached, log once), "
            f"'call' (call uncached) or 'raise' (raise NoActiveScope), not {outside_scope!r}"
        )
    shared, version = check_shared(shared, version)

    def decorate(target: Any) -> Any:
        refuse_memo_target(target)
        if isinstance(target, classmethod):
            return classmethod(decorate(target.__func__))
        if isinstance(target, staticmethod):
            return staticmethod(decorate(target.__func__))
        if not callable(target):
            raise TypeError(f"@request_memo decorates a function or method, not {target!r}")
        refuse_generator(target, "@request_memo")
        spec = _MemoSpec(target, key, typed, max_entries, outside_scope, shared, version)
        wrapper = functools.update_wrapper(make_wrapper(spec), target)
        wrapper.cache_info = spec.cache_info  # type: ignore[attr-defined]
        wrapper.cache_clear = spec.cache_clear  # type: ignore[attr-defined]
        wrapper.cache_delete = spec.cache_delete  # type: ignore[attr-defined]
        if spec.shared is not None:
            wrapper.shared_info = spec.shared.info  # type: ignore[attr-defined]
        return wrapper

    if fn is None:
        return decorate
    refuse_memo_target(fn)
    if not callable(fn) and not isinstance(fn, (classmethod, staticmethod)):
        raise TypeError(
            f"@request_memo takes a function, or options as keywords "
            f"(@request_memo(max_entries=100)), not {fn!r}"
        )
    return decorate(fn)


OUTSIDE_FIX = (
    "Register perrequest's middleware (ASGI: perrequest.asgi.RequestScopeMiddleware; "
    "WSGI: perrequest.wsgi.RequestScopeMiddleware; Flask: perrequest.flask.PerRequest(app); "
    "Django: perrequest.django.RequestScopeMiddleware; Celery: "
    "perrequest.celery.install(app)), or wrap worker code in `with "
    f"perrequest.request_scope():`. {REGISTERED_HINT}"
)


def refuse_or_warn(decorator: str, name: str, outside_scope: str, what: str, fix: str) -> None:
    """A call outside any scope (memos and loaders): raise ``NoActiveScope`` or log one
    WARNING per name, as ``outside_scope`` (or the test suite's override) says."""
    mode = outside_override if outside_scope == "warn" and outside_override else outside_scope
    if mode == "call":
        return
    if mode == "raise":
        why = "outside_scope='raise'"
        if mode != outside_scope:  # a memo left at "warn", in a strict test run
            why = "the tests' perrequest_outside_scope = raise"
        raise NoActiveScope(
            f"@{decorator} {name} was called outside a request scope ({why}). {no_scope_hint()}"
        )
    if name in warned_outside:
        return
    with _warned_lock:
        if name in warned_outside or len(warned_outside) >= _WARNED_MAX:
            return
        warned_outside.add(name)
    logger.warning(
        "perrequest: %s was called outside a request scope, so nothing was %s (logged "
        "once per function). %s To call it uncached on purpose, use "
        "@%s(outside_scope='call').",
        name,
        what,
        no_scope_hint(fix),
        decorator,
    )
