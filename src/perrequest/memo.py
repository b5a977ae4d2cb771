"""``@request_memo``: memoize a function within the active request scope.

Each decorated function has a private ``_MemoSpec``, and its entries live in
a dict of their own in the store, keyed by the spec: two functions never share
entries and no user key can equal a memo key. A hit is the wrapper's own
work (``_fastpath`` for a plain function, the closures below otherwise);
everything else (misses, single-flight, errors, the outside-scope rule) is
the spec's.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, MutableMapping
from decimal import Decimal
from typing import Any, Literal, NamedTuple, TypeVar, overload

from . import _fastpath, _flight
from ._shared import SharedTier, check_shared
from .errors import NoActiveScope, ScopeClosed, UnhashableArguments
from .scope import NO_SCOPE_HINT, _current, active_store, is_async_callable, refuse_generator
from .store import Counter, MemoKey, MemoStore, check_max_entries

__all__ = ["CacheInfo", "SharedCacheInfo", "request_memo"]

F = TypeVar("F", bound=Callable[..., Any])

logger = logging.getLogger("perrequest")

_OUTSIDE_SCOPE = ("warn", "call", "raise")
_OPTIONS = ("key", "typed", "max_entries", "outside_scope", "shared")
# Marks the key of a call with keyword arguments in the plain closures, so
# that f(a, b) and f(a, b=...) never produce equal keys.
_KWARGS: Any = object()
# Names warned about outside a scope, once each; bounded, like everything here.
_warned: set[str] = set()
_WARNED_MAX = 10_000
_warned_lock = threading.RLock()


class CacheInfo(NamedTuple):
    """One function's counters in the active store, as ``functools`` reports them."""

    hits: int
    misses: int
    maxsize: int | None
    currsize: int


class SharedCacheInfo(NamedTuple):
    """``CacheInfo`` plus the shared tier's process-wide counters, for ``shared=`` memos."""

    hits: int
    misses: int
    maxsize: int | None
    currsize: int
    shared_hits: int
    shared_misses: int
    shared_maxsize: int
    shared_currsize: int


def _is_method(fn: Callable[..., Any]) -> bool:
    """A function defined in a class body whose first parameter is ``self`` or ``cls``:
    keyed by identity, so equal instances never share entries and unhashable ones work."""
    parts = getattr(fn, "__qualname__", "").split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return (
        bool(params)
        and params[0].name in ("self", "cls", "mcs")
        and params[0].kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
    )


def _typed(value: object) -> object:
    """A type tag for ``typed=True``, deep enough that equal-but-different values differ:
    ``1``/``1.0``/``True``, signed zeros, and the same inside tuples and frozensets."""
    kind = type(value)
    if isinstance(value, tuple):
        return (kind, tuple(map(_typed, value)))
    if isinstance(value, frozenset):
        return (kind, frozenset((v, _typed(v)) for v in value))
    if isinstance(value, float):
        return (kind, math.copysign(1.0, value))
    if isinstance(value, complex):
        return (kind, math.copysign(1.0, value.real), math.copysign(1.0, value.imag))
    if isinstance(value, Decimal):
        return (kind, value.is_signed())
    return kind


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
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        key_fn: Callable[..., Hashable] | None,
        typed: bool,
        max_entries: int | None,
        outside_scope: str,
        shared: MutableMapping[Hashable, Any] | None,
    ) -> None:
        self.fn = fn
        self.key_fn = key_fn
        self.typed = typed
        self.max_entries = max_entries
        self.outside_scope = outside_scope
        self.is_method = _is_method(fn)
        self.is_async = is_async_callable(fn)
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", None) or repr(fn)
        self.name = f"{module}.{qualname}" if module else qualname
        self.keyof: Callable[..., tuple[Hashable, Any]] = self.make_key_of_call
        self.shared: SharedTier | None = None
        if shared is not None:
            if self.is_method and key_fn is None:
                raise TypeError(
                    f"@request_memo(shared=...) on method {self.name} needs key=: instances are "
                    "keyed by identity within a request, which means nothing across requests. "
                    "Give key=, a function of (self, ...) returning a hashable key that "
                    "identifies the instance's data, e.g. key=lambda self, x: (self.id, x)."
                )
            self.shared = SharedTier(shared)

    def __repr__(self) -> str:
        return f"<request_memo {self.name}>"

    # -- keys ------------------------------------------------------------------------

    def make_key_of_call(self, *args: Any, **kwargs: Any) -> tuple[Hashable, Any]:
        return self.make_key(args, kwargs)

    def make_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Hashable, Any]:
        """The plain closures' key of a call, and the object its entry keeps alive (``self``,
        so that its ``id`` cannot be reused within the scope). Not checked for hashability."""
        key: Any
        if self.key_fn is not None:
            key = self.key_fn(*args, **kwargs)
            try:
                hash(key)
            except TypeError as exc:
                raise UnhashableArguments(
                    f"the key= function of @request_memo {self.name} returned an unhashable "
                    f"{type(key).__name__} ({exc}). Make it return a hashable value, such as "
                    "a tuple of strings and numbers."
                ) from None
            return key, None
        method = self.is_method and bool(args)
        rest = args[1:] if method else args
        if self.typed:
            key = (
                rest,
                tuple(kwargs.items()),
                tuple(map(_typed, rest)),
                tuple(map(_typed, kwargs.values())),
            )
        elif kwargs:
            key = (_KWARGS, rest, tuple(kwargs.items()))
        else:
            key = rest
        if method:
            return (id(args[0]), key), args[0]
        return key, None

    def checked(self, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise ``UnhashableArguments`` naming the parameter when ``key`` cannot be hashed."""
        try:
            hash(key)
        except TypeError as exc:
            raise self._unhashable(args, kwargs, exc) from None

    def _unhashable(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], error: TypeError
    ) -> UnhashableArguments:
        try:
            bound = inspect.signature(self.fn).bind(*args, **kwargs)
        except (TypeError, ValueError):
            named = [(f"#{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        else:
            named = []
            for name, value in bound.arguments.items():
                kind = bound.signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    named += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    named += list(value.items())
                else:
                    named.append((name, value))
            if self.is_method:
                named = named[1:]
        fix = (
            "Pass a hashable value (a tuple instead of a list, a frozenset instead of a set), "
            "or give the decorator key=, a function of the same arguments that returns a "
            "hashable key."
        )
        for name, value in named:
            try:
                hash(value)
            except TypeError:
                return UnhashableArguments(
                    f"@request_memo {self.name}: argument {name!r} is unhashable "
                    f"({type(value).__name__}), so it cannot be part of a cache key. {fix}"
                )
        return UnhashableArguments(
            f"@request_memo {self.name}: the arguments cannot be hashed ({error}). {fix}"
        )

    # -- calls that are not hits -------------------------------------------------------

    def outside(self, args: tuple[Any, ...], kwargs: dict[str, Any], key: Hashable) -> Any:
        """A call outside any scope: the key is still checked, nothing is cached."""
        self.checked(key, args, kwargs)
        if self.outside_scope != "call":
            self._refuse_or_warn()
        return self.fn(*args, **kwargs)

    async def outside_async(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], key: Hashable
    ) -> Any:
        self.checked(key, args, kwargs)
        if self.outside_scope != "call":
            self._refuse_or_warn()
        return await self.fn(*args, **kwargs)

    def _refuse_or_warn(self) -> None:
        if self.outside_scope == "raise":
            raise NoActiveScope(
                f"@request_memo(outside_scope='raise') {self.name} was called outside a "
                f"request scope. {NO_SCOPE_HINT}"
            )
        if self.name in _warned:
            return
        with _warned_lock:
            if self.name in _warned or len(_warned) >= _WARNED_MAX:
                return
            _warned.add(self.name)
        logger.warning(
            "perrequest: %s was called outside a request scope, so nothing was cached "
            "(logged once per function). Register RequestScopeMiddleware (Flask: "
            "PerRequest(app); Django: perrequest.django.RequestScopeMiddleware), wrap "
            "worker code in `with perrequest.request_scope():`, or hand the scope to a "
            "thread with perrequest.bind_scope(fn). To call it uncached on purpose, use "
            "@request_memo(outside_scope='call').",
            self.name,
        )

    def prepare(
        self, store: MemoStore, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Counter | None:
        """Before a miss: check the key, and find this function's counters; None if the
        scope has ended meanwhile (the call is then outside any scope)."""
        try:
            hash(key)
            return store._counters[self.name]
        except TypeError as exc:
            raise self._unhashable(args, kwargs, exc) from None
        except (AttributeError, KeyError):  # the store's or this function's first miss
            try:
                return store._counter(self.name)
            except ScopeClosed:
                return None

    def run_shared(
        self,
        store: MemoStore,
        where: tuple[_MemoSpec, Hashable],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        counter: Counter,
        anchor: Any,
    ) -> Any:
        """A miss of a ``shared=`` memo: the shared cache computes it, once across requests."""
        assert self.shared is not None
        return _flight.run(
            store, where, self.shared.get, (where, fn, args, kwargs), {}, counter, anchor
        )

    async def run_shared_async(
        self,
        store: MemoStore,
        where: tuple[_MemoSpec, Hashable],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        counter: Counter,
        anchor: Any,
    ) -> Any:
        assert self.shared is not None
        return await _flight.run_async(
            store, where, self.shared.get_async, (where, fn, args, kwargs), {}, counter, anchor
        )

    def runner(self) -> Callable[..., Any]:
        """What computes a miss: single-flight in the request store, through the shared
        cache for ``shared=`` memos."""
        if self.shared is not None:
            return self.run_shared_async if self.is_async else self.run_shared
        return _flight.run_async if self.is_async else _flight.run

    # -- the functools-style extras ----------------------------------------------------

    def cache_info(self) -> CacheInfo | SharedCacheInfo:
        """This function's hits, misses and entries in the active store (zeros outside a
        scope); with ``shared=``, the shared tier's process-wide counters too."""
        store = active_store()
        hits = misses = currsize = 0
        if store is not None and store._lock is not None:
            counter = store._counters.get(self.name)
            if counter is not None:
                hits, misses = counter.hits, counter.misses
            currsize = len((store._subs or {}).get(self, ()))
        shared = self.shared
        if shared is None:
            return CacheInfo(hits, misses, self.max_entries, currsize)
        if store is None:  # zeros outside a scope, the shared tier's too (DESIGN.md)
            return SharedCacheInfo(hits, misses, self.max_entries, 0, 0, 0, shared.maxsize, 0)
        return SharedCacheInfo(
            hits, misses, self.max_entries, currsize,
            shared.hits, shared.misses, shared.maxsize, len(shared.cache),
        )  # fmt: skip

    def cache_clear(self) -> None:
        """Drop this function's entries in the active store, and in its shared cache;
        outside a scope, do nothing."""
        store = active_store()
        if store is None:
            return
        store._remove_owner(self)
        if self.shared is not None:
            self.shared.clear(self)

    def cache_delete(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the entry these arguments would hit in the active store (and the shared
        cache); whether the request store had one. Outside a scope: False."""
        key, _ = self.keyof(*args, **kwargs)
        self.checked(key, args, kwargs)
        if self.shared is not None:
            self.shared.delete((self, key))
        store = active_store()
        if store is None:
            return False
        return store.pop(MemoKey(self, key), _flight.MISSING) is not _flight.MISSING


# -- the plain closures ----------------------------------------------------------------------


def _make_wrapper(spec: _MemoSpec) -> Callable[..., Any]:
    """The wrapper whose hit path is as short as the options allow."""
    run, outside = spec.runner(), spec.outside_async if spec.is_async else spec.outside
    params = None if spec.key_fn is not None or spec.typed else _fastpath.parameters(spec.fn)
    if params is not None:
        wrapper, spec.keyof = _fastpath.generate(spec, params, run, outside)
        return wrapper
    get_store, make_key, prepare, fn = _current.get, spec.make_key, spec.prepare, spec.fn
    simple, kwargs_mark = not (spec.key_fn or spec.typed or spec.is_method), _KWARGS

    def lookup(store: MemoStore, key: Hashable) -> Any:
        sub = store._subs[spec]  # type: ignore[index]
        entry = sub[key]
        store._order.move_to_end(entry[2])
        if type(sub) is OrderedDict:
            sub.move_to_end(key)
        entry[1].hits += 1
        return entry[0]

    def keyed(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Hashable, Any]:
        if simple:
            return ((kwargs_mark, args, tuple(kwargs.items())) if kwargs else args), None
        return make_key(args, kwargs)

    if spec.is_async:

        async def memo_async(*args: Any, **kwargs: Any) -> Any:
            key, anchor = keyed(args, kwargs)
            store = get_store()
            if store is not None:
                try:
                    return lookup(store, key)
                except (KeyError, TypeError):
                    pass  # a miss: handled below, so that its errors carry no KeyError context
                counter = prepare(store, key, args, kwargs)
                if counter is not None:
                    return await run(store, (spec, key), fn, args, kwargs, counter, anchor)
            return await outside(args, kwargs, key)

        return memo_async

    def memo(*args: Any, **kwargs: Any) -> Any:
        key, anchor = keyed(args, kwargs)
        store = get_store()
        if store is not None:
            try:
                return lookup(store, key)
            except (KeyError, TypeError):
                pass  # a miss: handled below, so that its errors carry no KeyError context
            counter = prepare(store, key, args, kwargs)
            if counter is not None:
                return run(store, (spec, key), fn, args, kwargs, counter, anchor)
        return outside(args, kwargs, key)

    return memo


# -- the decorator -------------------------------------------------------------------------


@overload
def request_memo(fn: F, /) -> F: ...


@overload
def request_memo(
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    max_entries: int | None = None,
    outside_scope: Literal["warn", "call", "raise"] = "warn",
    shared: MutableMapping[Any, Any] | None = None,
) -> Callable[[F], F]: ...


def request_memo(
    fn: Any = None,
    /,
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    max_entries: int | None = None,
    outside_scope: Literal["warn", "call", "raise"] = "warn",
    shared: MutableMapping[Any, Any] | None = None,
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
    """
    if unknown:
        raise TypeError(_unknown_option("request_memo()", next(iter(unknown)), _OPTIONS))
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
    if outside_scope not in _OUTSIDE_SCOPE:
        raise ValueError(
            f"request_memo(outside_scope=...) must be 'warn' (call uncached, log once), "
            f"'call' (call uncached) or 'raise' (raise NoActiveScope), not {outside_scope!r}"
        )
    if shared is not None:
        shared = check_shared(shared)

    def decorate(target: Any) -> Any:
        if isinstance(target, classmethod):
            return classmethod(decorate(target.__func__))
        if isinstance(target, staticmethod):
            return staticmethod(decorate(target.__func__))
        if not callable(target):
            raise TypeError(f"@request_memo decorates a function or method, not {target!r}")
        refuse_generator(target, "@request_memo")
        spec = _MemoSpec(target, key, typed, max_entries, outside_scope, shared)
        wrapper = functools.update_wrapper(_make_wrapper(spec), target)
        wrapper.cache_info = spec.cache_info  # type: ignore[attr-defined]
        wrapper.cache_clear = spec.cache_clear  # type: ignore[attr-defined]
        wrapper.cache_delete = spec.cache_delete  # type: ignore[attr-defined]
        return wrapper

    if fn is None:
        return decorate
    if isinstance(fn, (bool, int, str)) or (
        not callable(fn) and not isinstance(fn, (classmethod, staticmethod))
    ):
        raise TypeError(
            f"@request_memo takes a function, or options as keywords "
            f"(@request_memo(max_entries=100)), not {fn!r}"
        )
    return decorate(fn)


# What functools and cachetools users type.
_ALIASES = {"maxsize": "max_entries", "max_size": "max_entries"}


def _unknown_option(where: str, name: str, valid: tuple[str, ...]) -> str:
    """An unknown option's message, with the closest valid one ("did you mean")."""
    close = _ALIASES.get(name) or next(iter(difflib.get_close_matches(name, valid, n=1)), None)
    hint = f" Did you mean {close}=?" if close else ""
    return f"{where} got an unknown option {name}=.{hint} The options are {', '.join(valid)}."
