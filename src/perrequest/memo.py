"""``@request_memo``: memoize a function within the active request scope.

Each decorated function has a private ``_MemoSpec``, and its entries live in
a dict of their own inside the store, keyed by the spec: two functions never
share entries and no user key can equal a memo key.

The hit path is the whole point of the library, so it is as short as the
options allow. For an ordinary function (no ``*args``/``**kwargs``, no
``key=``/``typed=``) the wrapper is generated with the function's own
signature, as ``dataclasses`` generates ``__init__``: Python binds the
arguments, so ``f(1, b=2)`` and ``f(1, 2)`` are one entry, and a one-argument
call is keyed by the argument itself. Everything that is not a hit (misses,
single-flight, errors, the outside-scope rule) lives in ``_MemoSpec``.
"""

from __future__ import annotations

import functools
import inspect
import keyword
import math
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from decimal import Decimal
from functools import partial
from types import CoroutineType
from typing import Any, Literal, NamedTuple, TypeVar, overload

from ._flight import MISSING
from ._lifecycle import _current, _is_async_callable
from ._shared import SharedTier, check_shared
from .errors import NoActiveScope, ScopeClosed, UnhashableArguments
from .scope import _NO_SCOPE_HINT, _active_store, _refuse_generator
from .store import MemoStore, _Owner, check_max_entries

__all__ = ["CacheInfo", "SharedCacheInfo", "request_memo"]

F = TypeVar("F", bound=Callable[..., Any])

_OUTSIDE_SCOPE_CHOICES = ("call", "raise")

# Marks the key of a call with keyword arguments in the generic wrappers, so
# that f(a, b) and f(a, b=...) can never produce equal keys.
_KWARGS: Any = object()

# Names the generated wrapper uses itself: a parameter by one of these names keeps
# the generic wrapper.
_RESERVED = frozenset({"KeyError", "TypeError"})
_NO_ENTRIES: dict[Hashable, Any] = {}
_UNKEYED: Any = object()  # call() was not given a key: it builds one


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
    shared_maxsize: float
    shared_currsize: int


def _is_method(fn: Callable[..., Any]) -> bool:
    """A function defined in a class body whose first parameter is ``self`` or ``cls``.

    Such a first argument is keyed by identity: equal instances never share
    entries, and unhashable instances (a plain ``@dataclass``) work.
    """
    qualname = getattr(fn, "__qualname__", "")
    parts = qualname.split(".")
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
    """A type tag for ``typed=True``, deep enough that equal-but-different values differ.

    ``1``, ``1.0`` and ``True`` are equal, and so are ``0.0`` and ``-0.0``, ``0j``
    and ``-0j``, ``Decimal("0")`` and ``Decimal("-0")``, and ``(1,)`` and ``(True,)``,
    also inside a namedtuple: tag the types inside tuples and frozensets too, and
    the sign of zeros, so a typed memo never returns another call's result.
    """
    kind = type(value)
    if isinstance(value, tuple):
        return (kind, tuple(map(_typed, value)))
    if isinstance(value, frozenset):
        # Unordered: pair each element with its tag, or {1, 2.0} would match {1.0, 2}.
        return (kind, frozenset((v, _typed(v)) for v in value))
    if isinstance(value, float):
        return (kind, math.copysign(1.0, value))
    if isinstance(value, complex):
        return (kind, math.copysign(1.0, value.real), math.copysign(1.0, value.imag))
    if isinstance(value, Decimal):
        return (kind, value.is_signed())
    return kind


def _exact_parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """The parameters to generate an exact-signature wrapper from, or None if it can't be.

    Only a plain Python function qualifies (a callable object, or a decorator's
    ``*args, **kwargs`` wrapper, keeps the generic wrapper), without ``*args``
    or ``**kwargs``, and with hashable defaults, which become part of the key.
    """
    if not inspect.isfunction(fn) or "__signature__" in fn.__dict__:
        return None  # a __signature__ may say other than what the code accepts
    try:
        params = list(inspect.signature(fn, follow_wrapped=False).parameters.values())
    except (TypeError, ValueError):
        return None
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            return None
        if param.name.startswith("__pr_") or param.name in _RESERVED:
            return None
        if param.default is not param.empty:
            try:
                hash(param.default)
            except TypeError:
                return None
    return params


class _MemoSpec:
    """Everything about one decorated function that is not on the hit path."""

    __slots__ = (
        "__weakref__",
        "exact",
        "fn",
        "is_async",
        "is_method",
        "key_fn",
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
        shared: MutableMapping[Hashable, Any] | None = None,
    ) -> None:
        self.fn = fn
        self.key_fn = key_fn
        self.typed = typed
        self.max_entries = max_entries
        self.outside_scope = outside_scope
        self.is_method = _is_method(fn)
        self.is_async = _is_async_callable(fn)
        self.exact = None if key_fn is not None or typed else _exact_parameters(fn)
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", None) or repr(fn)
        self.name = f"{module}.{qualname}" if module else qualname
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

    # -- keys ---------------------------------------------------------------

    def make_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Hashable, Any]:
        """The key within this function's entries, and the object the entry keeps
        alive (``self``, so that its ``id`` is not reused within the scope)."""
        method = self.is_method and bool(args)
        anchor = args[0] if method else None
        key: Any
        if self.key_fn is not None:
            key = self.key_fn(*args, **kwargs)
            try:
                hash(key)
            except TypeError as exc:
                raise UnhashableArguments(
                    f"the key= function of @request_memo {self.name} returned an unhashable "
                    f"{type(key).__name__} ({exc}). Make it return a hashable value, "
                    "such as a tuple of strings and numbers."
                ) from None
            return key, anchor
        if self.exact is not None:
            # The generated wrapper passes every parameter: the positional ones
            # in args, the keyword-only ones in kwargs, in signature order.
            values = args + tuple(kwargs.values()) if kwargs else args
            if method:
                key = (id(anchor), *values[1:])
            elif len(values) == 1:
                key = values[0]
            else:
                key = values
        else:
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
                key = (id(anchor), key)
        try:
            hash(key)
        except TypeError as exc:
            raise self._unhashable(args, kwargs, exc) from None
        return key, anchor

    def _unhashable(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], error: TypeError
    ) -> UnhashableArguments:
        named: list[tuple[str, Any]] = []
        try:
            bound = inspect.signature(self.fn).bind(*args, **kwargs)
        except (TypeError, ValueError):
            named = [(f"#{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
        else:
            for name, param in bound.signature.parameters.items():
                if name not in bound.arguments:
                    continue
                value = bound.arguments[name]
                if param.kind is inspect.Parameter.VAR_POSITIONAL:
                    named += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
                elif param.kind is inspect.Parameter.VAR_KEYWORD:
                    named += list(value.items())
                else:
                    named.append((name, value))
            if self.is_method:
                named = named[1:]
        for name, value in named:
            try:
                hash(value)
            except TypeError:
                return UnhashableArguments(
                    f"@request_memo {self.name}: argument {name!r} is unhashable "
                    f"({type(value).__name__}), so it cannot be part of a cache key. Pass "
                    "a hashable value (a tuple instead of a list, a frozenset instead of a "
                    "set), or give the decorator key=, a function of the same arguments "
                    "that returns a hashable key."
                )
        return UnhashableArguments(
            f"@request_memo {self.name}: the arguments cannot be hashed ({error}). Give the "
            "decorator key=, a function of the same arguments that returns a hashable key."
        )

    # -- calls that are not hits ----------------------------------------------

    def _outside(self) -> None:
        if self.outside_scope == "raise":
            raise NoActiveScope(
                f"@request_memo(outside_scope='raise') {self.name} was called outside a "
                f"request scope. {_NO_SCOPE_HINT}"
            )

    def _owner_in(self, store: MemoStore | None) -> _Owner | None:
        """This function's entries in ``store``, or None outside a scope."""
        if store is None or store._closed:
            return None
        owners = store._owners
        owner = None if owners is None else owners.get(self)
        if owner is not None:
            return owner
        try:
            return store._owner(self, self.max_entries)
        except ScopeClosed:  # closed by another thread just now
            return None

    # Few frames between a memoized function and its own recursive calls: a miss
    # adds four (the wrapper, call, the single-flight, _run), not a dozen.

    def call(
        self,
        store: MemoStore | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: Any = _UNKEYED,
        anchor: Any = None,
    ) -> Any:
        """A call that is not a hit: outside a scope, a miss, or a wait for a miss."""
        owner = self._owner_in(store)
        if owner is None:
            self._outside()
            return self.fn(*args, **kwargs)
        assert store is not None and store._flights is not None
        if key is _UNKEYED:
            key, anchor = self.make_key(args, kwargs)
        compute: Callable[[], Any] = partial(self._run, args, kwargs)
        shared = self.shared
        if shared is not None:
            shared_key = (self, key)
            value = self._shared_hit(store, shared, shared_key, owner, key, anchor)
            if value is not MISSING:
                return value
            compute = partial(shared.get, shared_key, compute)
        return store._flights.run(
            (owner, key),
            partial(store._lookup, owner.data, key),
            partial(self._fill, store, owner, key, anchor),
            compute,
            owner,
        )

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Call a sync function for its entry; a coroutine would be cached unawaited."""
        value = self.fn(*args, **kwargs)
        if isinstance(value, CoroutineType):
            value.close()
            raise TypeError(
                f"@request_memo {self.name} returned a coroutine, which would be cached and "
                "could be awaited only once. Decorate the async def itself (or make the "
                "wrapper around it async), so that the awaited result is cached."
            )
        return value

    @staticmethod
    def _fill(store: MemoStore, owner: _Owner, key: Hashable, anchor: Any, value: Any) -> None:
        store._insert(owner.data, key, value, owner, anchor)

    async def call_async(
        self,
        store: MemoStore | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: Any = _UNKEYED,
        anchor: Any = None,
    ) -> Any:
        """The async twin of ``call``."""
        owner = self._owner_in(store)
        if owner is None:
            self._outside()
            return await self.fn(*args, **kwargs)
        assert store is not None and store._flights is not None
        if key is _UNKEYED:
            key, anchor = self.make_key(args, kwargs)
        compute: Callable[[], Awaitable[Any]] = partial(self.fn, *args, **kwargs)
        shared = self.shared
        if shared is not None:
            shared_key = (self, key)
            value = self._shared_hit(store, shared, shared_key, owner, key, anchor)
            if value is not MISSING:
                return value
            compute = partial(shared.get_async, shared_key, compute)
        return await store._flights.run_async(
            (owner, key),
            partial(store._lookup, owner.data, key),
            partial(self._fill, store, owner, key, anchor),
            compute,
            owner,
        )

    @staticmethod
    def _shared_hit(
        store: MemoStore,
        shared: SharedTier,
        shared_key: Hashable,
        owner: _Owner,
        key: Hashable,
        anchor: Any,
    ) -> Any:
        """A request-store miss served by the shared cache, copied into the request store.

        From then on the request reads its own copy, so the value stays the same
        for the rest of the request even if the shared entry expires meanwhile.
        """
        value = shared.peek(shared_key)
        if value is MISSING:
            return value
        lock = store._lock  # there: the owner exists, so something was written
        if lock is not None:
            with lock:
                owner.misses += 1
                store._insert(owner.data, key, value, owner, anchor)  # a no-op once closed
        return value

    # -- the functools-style extras ------------------------------------------

    def cache_info(self) -> CacheInfo | SharedCacheInfo:
        """This function's hits, misses and entries in the active store; zeros outside
        a scope (DESIGN.md), the shared tier's counters included."""
        store = _active_store()
        owner = None if store is None else (store._owners or {}).get(self)
        hits, misses, currsize = (
            (0, 0, 0) if owner is None else (owner.hits, owner.misses, len(owner.data))
        )
        shared = self.shared
        if shared is None:
            return CacheInfo(hits, misses, self.max_entries, currsize)
        inside = store is not None
        return SharedCacheInfo(
            hits,
            misses,
            self.max_entries,
            currsize,
            shared.hits if inside else 0,
            shared.misses if inside else 0,
            shared.cache.maxsize,  # type: ignore[attr-defined]
            len(shared.cache) if inside else 0,
        )

    def cache_clear(self) -> None:
        """Drop this function's entries in the active store, and in its shared cache;
        outside a scope, do nothing."""
        store = _active_store()
        if store is None:
            return
        store._remove_owner_entries(self)
        if self.shared is not None:
            self.shared.clear(self)


# -- the wrappers -------------------------------------------------------------------------------

_EXACT_TEMPLATE = """\
def __pr_factory(__pr_get, __pr_spec, __pr_miss, __pr_id, __pr_d):
    {kind}def {name}({signature}):
        __pr_store = __pr_get()
        if __pr_store is not None:
            try:
                __pr_key = {key}
                __pr_entry = __pr_store._subs[__pr_spec][__pr_key]
                __pr_store._order.move_to_end(__pr_entry[1])
{touch_owner}            except KeyError:  # a miss: the key is good, hand it on
                __pr_keyed = True
            except TypeError:  # no entries yet, or unhashable: make_key will say which
                __pr_keyed = False
            else:
                __pr_entry[2].hits += 1
                return __pr_entry[0]
            if __pr_keyed:
                return {await_}__pr_miss(
                    __pr_store, ({positional}), {{{keyword}}}, __pr_key, {anchor}
                )
        return {await_}__pr_miss(__pr_store, ({positional}), {{{keyword}}})
    return {name}
"""


def _exact_wrapper(spec: _MemoSpec, params: list[inspect.Parameter]) -> Callable[..., Any]:
    """Generate the wrapper with the function's own signature (see the module docstring)."""
    is_async = spec.is_async
    defaults: list[Any] = []
    signature: list[str] = []
    positional: list[str] = []
    keyword: list[str] = []
    star_done = False
    for i, param in enumerate(params):
        if param.kind is param.KEYWORD_ONLY and not star_done:
            signature.append("*")
            star_done = True
        text = param.name
        if param.default is not param.empty:
            text += f"=__pr_d[{len(defaults)}]"
            defaults.append(param.default)
        signature.append(text)
        if param.kind is param.POSITIONAL_ONLY and (
            i + 1 == len(params) or params[i + 1].kind is not param.POSITIONAL_ONLY
        ):
            signature.append("/")
        if param.kind is param.KEYWORD_ONLY:
            keyword.append(f"{param.name!r}: {param.name}")
        else:
            positional.append(param.name)
    names = [p.name for p in params]
    if spec.is_method:
        key = f"(__pr_id({names[0]}), {''.join(n + ', ' for n in names[1:])})"
    elif len(names) == 1:
        key = names[0]
    else:
        key = f"({''.join(n + ', ' for n in names)})"
    touch_owner = ""
    if spec.max_entries is not None:
        touch_owner = "                __pr_entry[2].order.move_to_end(__pr_key)\n"
    source = _EXACT_TEMPLATE.format(
        kind="async " if is_async else "",
        await_="await " if is_async else "",
        name=_code_name(spec.fn),
        signature=", ".join(signature),
        key=key,
        anchor=names[0] if spec.is_method else "None",
        touch_owner=touch_owner,
        positional="".join(n + ", " for n in positional),
        keyword=", ".join(keyword),
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<request_memo {spec.name}>", "exec"), namespace)
    miss = spec.call_async if is_async else spec.call
    wrapper: Callable[..., Any] = namespace["__pr_factory"](
        _current.get, spec, miss, id, tuple(defaults)
    )
    return wrapper


def _code_name(fn: Callable[..., Any]) -> str:
    """The generated wrapper's own name: the function's, so tracebacks and profilers
    show ``price`` rather than a generated name."""
    name = getattr(fn, "__name__", "")
    ok = name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("__pr_")
    return name if ok else "__pr_wrapper"


def _make_wrapper(spec: _MemoSpec) -> Callable[..., Any]:
    """Build the closure whose hit path is as short as the options allow."""
    if spec.exact is not None:
        return _exact_wrapper(spec, spec.exact)
    get_store = _current.get
    call, call_async = spec.call, spec.call_async
    is_async = spec.is_async

    if spec.key_fn is not None or spec.typed or spec.max_entries is not None or spec.is_method:
        make_key = spec.make_key
        if is_async:

            async def generic_async(*args: Any, **kwargs: Any) -> Any:
                store = get_store()
                if store is None or store._closed:
                    return await call_async(store, args, kwargs)
                key, anchor = make_key(args, kwargs)
                subs = store._subs
                entry = None if subs is None else subs.get(spec, _NO_ENTRIES).get(key)
                if entry is None:
                    return await call_async(store, args, kwargs, key, anchor)
                store._touch(key, entry)
                entry[2].hits += 1
                return entry[0]

            return generic_async

        def generic_sync(*args: Any, **kwargs: Any) -> Any:
            store = get_store()
            if store is None or store._closed:
                return call(store, args, kwargs)
            key, anchor = make_key(args, kwargs)
            subs = store._subs
            entry = None if subs is None else subs.get(spec, _NO_ENTRIES).get(key)
            if entry is None:
                return call(store, args, kwargs, key, anchor)
            store._touch(key, entry)
            entry[2].hits += 1
            return entry[0]

        return generic_sync

    kwargs_marker = _KWARGS
    if is_async:

        async def plain_async(*args: Any, **kwargs: Any) -> Any:
            store = get_store()
            if store is not None:
                try:
                    entry = store._subs[spec][  # type: ignore[index]
                        (kwargs_marker, args, tuple(kwargs.items())) if kwargs else args
                    ]
                    store._order.move_to_end(entry[1])  # type: ignore[union-attr]
                except (KeyError, TypeError):
                    pass
                else:
                    entry[2].hits += 1  # type: ignore[union-attr]
                    return entry[0]
            return await call_async(store, args, kwargs)

        return plain_async

    def plain_sync(*args: Any, **kwargs: Any) -> Any:
        store = get_store()
        if store is not None:
            try:
                entry = store._subs[spec][  # type: ignore[index]
                    (kwargs_marker, args, tuple(kwargs.items())) if kwargs else args
                ]
                store._order.move_to_end(entry[1])  # type: ignore[union-attr]
            except (KeyError, TypeError):
                pass
            else:
                entry[2].hits += 1  # type: ignore[union-attr]
                return entry[0]
        return call(store, args, kwargs)

    return plain_sync


@overload
def request_memo(fn: F, /) -> F: ...


@overload
def request_memo(
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    max_entries: int | None = None,
    outside_scope: Literal["call", "raise"] = "call",
    shared: MutableMapping[Any, Any] | None = None,
) -> Callable[[F], F]: ...


def request_memo(
    fn: Any = None,
    /,
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    max_entries: int | None = None,
    outside_scope: Literal["call", "raise"] = "call",
    shared: MutableMapping[Any, Any] | None = None,
) -> Any:
    """Memoize a sync or async function, method, classmethod or staticmethod per request.

    Within the active scope each distinct call runs once; concurrent callers of
    the same key (tasks or threads) share one computation. Outside any scope
    nothing is cached: the function is called (``outside_scope="call"``) or
    ``NoActiveScope`` is raised (``"raise"``). Also usable bare: ``@request_memo``.

    ``shared=`` puts a bounded process-wide cache (``cachetools.LRUCache``,
    ``TTLCache``, any mapping with a ``maxsize``) behind the request store.
    """
    if key is not None and (not callable(key) or _is_async_callable(key)):
        raise TypeError(
            f"request_memo(key=...) must be a plain (sync) function of the memoized "
            f"function's arguments returning a hashable key, not {type(key).__name__} {key!r}"
        )
    if not isinstance(typed, bool):
        raise TypeError(f"request_memo(typed=...) must be True or False, not {typed!r}")
    max_entries = check_max_entries(max_entries, "request_memo(max_entries=...)")
    if outside_scope not in _OUTSIDE_SCOPE_CHOICES:
        raise ValueError(
            f"request_memo(outside_scope=...) must be 'call' (call the function uncached) "
            f"or 'raise' (raise NoActiveScope), not {outside_scope!r}"
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
        _refuse_generator(target, "@request_memo")
        spec = _MemoSpec(target, key, typed, max_entries, outside_scope, shared)
        wrapper = functools.update_wrapper(_make_wrapper(spec), target)
        wrapper.cache_info = spec.cache_info  # type: ignore[attr-defined]
        wrapper.cache_clear = spec.cache_clear  # type: ignore[attr-defined]
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
