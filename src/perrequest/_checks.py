"""Checks of what users pass in, each failure saying what was wrong and what to do; and
the memo keys of calls the generated wrappers (``_wrappers``) do not key themselves, by
their shape as ``functools.lru_cache`` does."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Hashable
from decimal import Decimal
from typing import Any, TypeVar, cast
from uuid import UUID

from .errors import UnhashableArguments

_Init = TypeVar("_Init", bound=Callable[..., None])


def explains_options(
    where: str, hint: str = "", misused: str = "", missing: str = ""
) -> Callable[[_Init], _Init]:
    """Refuse a misspelt keyword option naming the closest valid one (and ``hint``), an
    extra positional argument with ``misused``, a missing one (a middleware's app) with
    ``missing``, before Python's plain ``TypeError`` (also one for a required option); the
    signature is written once, in the ``__init__`` or function type checkers see."""

    def decorate(init: _Init) -> _Init:
        params = list(inspect.signature(init).parameters.values())
        accepted = {p.name for p in params}
        options = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        options = options or tuple(p.name for p in params)  # a function's, all options
        positional = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)  # self included

        @functools.wraps(init)
        def checked(*args: Any, **kwargs: Any) -> None:
            if len(args) > positional and misused:
                raise TypeError(misused.format(args[positional]))
            if len(args) < positional and missing and params[len(args)].name not in kwargs:
                raise TypeError(missing)
            for name in kwargs:
                if name not in accepted:
                    raise TypeError(unknown_option(where, name, options) + hint)
            init(*args, **kwargs)

        return cast("_Init", checked)

    return decorate


# ``misused`` for the middlewares and extensions: what Python would say is a bare count.
KEYWORD_ONLY = "{where} takes its options as keywords ({options}), not {{0!r}}"


def check_max_entries(value: object, what: str = "max_entries") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{what} must be a positive int or None, not {type(value).__name__} {value!r}"
        )
    if value <= 0:
        raise ValueError(f"{what} must be a positive int or None, not {value!r}")
    return int(value)  # a subclass's value: what deepcopy keeps (asgi.opened_outside)


def _call_of(fn: object) -> object:  # an object's __call__ says if it returns a coroutine
    while type(fn) is functools.partial:  # of an object (a subclass has a __call__ of its own)
        fn = fn.func
    return None if isinstance(fn, type) else getattr(type(fn), "__call__", None)  # noqa: B004


def unhashable_because(value: object) -> str | None:
    """None if ``value`` hashes; else its type, and the reason when the type gives one of
    its own (a Django model without a primary key: "save it first"); for a tuple, what
    it holds that does not hash ("tuple holding a list"): the advice, a tuple instead of
    a list, is about that. (A frozenset hashes its items' hashes stored when it was made.)"""
    try:
        hash(value)
    except TypeError as exc:
        reason = exc.args[0][:200] if exc.args and isinstance(exc.args[0], str) else ""
        if not reason or reason.startswith("unhashable type"):  # (no str(): it may raise)
            if isinstance(value, tuple):
                held = (unhashable_because(item) for item in value)
                if (inner := next((why for why in held if why is not None), None)) is not None:
                    return f"{type(value).__name__} holding a {inner}"
            return type(value).__name__
        return f"{type(value).__name__}: {reason}"
    return None


def is_async_callable(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(_call_of(fn))


def is_wsgi_app(app: object) -> bool:
    """A sync callable taking ``(environ, start_response)`` and no third argument: a WSGI
    app, which no ASGI server can call. False when its signature cannot be read."""
    return not is_async_callable(app) and binds(app, 2) and not binds(app, 3)


def binds(fn: object, count: int) -> bool:  # takes ``count`` positional arguments
    return bool(takes(fn, tuple(range(count)), {}))


def takes(fn: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool | None:
    """Whether ``fn`` takes these arguments; None when its signature cannot be read."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)  # type: ignore[arg-type]
    except TypeError:
        return False
    except ValueError:
        return None
    return True


IN_MIDDLEWARE = (  # what a WSGI or ASGI middleware says when given a view or get_response
    "it takes one argument, request, as a view, an endpoint or the get_response Django gives "
    "each class in settings.MIDDLEWARE does: wrap the application itself (in Django's "
    'MIDDLEWARE, list "perrequest.django.RequestScopeMiddleware" there instead)'
)


def takes_a_request(app: object) -> bool:  # its own parameters: a decorator's may differ
    try:
        signature = inspect.signature(app, follow_wrapped=False)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return list(signature.parameters) == ["request"]


def check_on_close(
    on_close: object, what: str = "on_close", *, optional: bool = True
) -> Callable[[Any], object] | None:
    """A sync callable taking ``ScopeStats`` (or None when ``optional``)."""
    if on_close is None and optional:
        return None
    if not callable(on_close):
        raise TypeError(
            f"{what} must be a callable taking ScopeStats{', or None' if optional else ''}, "
            f"not {type(on_close).__name__} {on_close!r}"
        )
    if is_async_callable(on_close):
        raise TypeError(
            f"{what} must be a plain (sync) function, not the async {on_close!r}: it runs "
            "as the scope closes, where nothing would await it. Record the stats in a sync "
            "function (hand them to a queue or a background task if the work is async)."
        )
    try:
        inspect.signature(on_close).bind(None)
    except TypeError:
        raise TypeError(
            f"{what} must take one argument, the ScopeStats of the scope that closed: "
            f"{on_close!r} cannot be called with one argument"
        ) from None
    except ValueError:  # no signature to check (some builtins): trust it
        pass
    return cast("Callable[[Any], object]", on_close)


_ALIASES = {"maxsize": "max_entries", "max_size": "max_entries"}  # functools', cachetools'


def unknown_option(where: str, name: str, valid: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(name.lower(), valid, n=1)  # MAX_ENTRIES too
    close = _ALIASES.get(name.lower()) or next(iter(match), None)
    hint = f" Did you mean {close}=?" if close else ""
    return f"{where} got an unknown option {name}=.{hint} The options are {', '.join(valid)}."


# Marks the key of a call with keyword arguments, so that f(a, b) and f(a, b=...)
# never produce equal keys.
KWARGS: Any = object()


def is_method(fn: Callable[..., Any]) -> bool:
    """A function defined in a class body whose first parameter is ``self`` or ``cls``:
    keyed by identity, so equal instances never share entries and unhashable ones work."""
    parts = getattr(fn, "__qualname__", "").split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return bool(params) and params[0].name in _SELF and params[0].kind in positional


def check_instance(name: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
    """A method's ``cache_delete`` given no instance would take the first argument for it,
    match nothing and say False: refused where that cannot be one (a class method's is a
    class; an instance, a plain ``int``, ``str``, ... never): docs/errors.md."""
    first_name = next(iter(inspect.signature(fn).parameters))
    first = args[0] if args else kwargs.get(first_name, _NONE)
    if first is _NONE:
        return
    is_class = first_name != "self"
    if (not isinstance(first, type)) if is_class else (type(first) in _NOT_INSTANCES):
        what, example = ("class", "Cls") if is_class else ("instance", "obj")
        raise TypeError(
            f"{name}.cache_delete() takes the {what} first, as a call of the function does: "
            f"{example}.{fn.__name__}.cache_delete({example}, ...), not {first!r}."
        )


METHOD_KEY = (  # key= replaces the instance's part of a method's key: keep one in it
    "(self included) that returns a hashable key; its result alone is the key, for every "
    "instance, so put in it what tells them apart: "
    "key=lambda self, ids: (self.tenant_id, tuple(ids))."
)
_NOT_INSTANCES = (int, str, bytes, float, bool, type(None), UUID)  # a tuple: no type hashed
_SELF = ("self", "cls", "mcs")  # what ``is_method`` recognises
_NONE: Any = object()


def typed_tag(value: object) -> object:
    """A type tag for ``typed=True``, deep enough that equal-but-different values differ:
    ``1``/``1.0``/``True``, signed zeros, and the same inside tuples and frozensets."""
    kind = type(value)
    if isinstance(value, tuple):
        return (kind, tuple(map(typed_tag, value)))
    if isinstance(value, frozenset):
        return (kind, frozenset((v, typed_tag(v)) for v in value))
    if isinstance(value, float):
        return (kind, math.copysign(1.0, value))
    if isinstance(value, complex):
        return (kind, math.copysign(1.0, value.real), math.copysign(1.0, value.imag))
    if isinstance(value, Decimal):
        return (kind, value.is_signed())
    return kind


def call_key(spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Hashable, Any]:
    """The key of a call, and the object its entry keeps alive (``self``, so that its
    ``id`` cannot be reused within the scope). Not checked for hashability."""
    key: Any
    if spec.key_fn is not None:
        try:
            key = spec.key_fn(*args, **kwargs)
        except TypeError as exc:
            if takes(spec.key_fn, args, kwargs) is False:  # else its body raised: its own
                raise TypeError(
                    f"the key= function of @request_memo {spec.name} cannot take this call's "
                    f"arguments ({exc}): it gets exactly the memoized function's arguments, "
                    "self or cls included for a method. Give it the same parameters, and "
                    "for a method return what tells instances apart too, as its result alone "
                    "is the key: key=lambda self, user_id: (self.tenant_id, user_id)."
                ) from None
            raise
        try:
            hash(key)
        except TypeError as exc:
            raise UnhashableArguments(
                f"the key= function of @request_memo {spec.name} returned an unhashable "
                f"{type(key).__name__} ({exc}). Make it return a hashable value, such as "
                "a tuple of strings and numbers."
            ) from None
        return key, None
    if spec.is_method and not args and kwargs:  # Cls.method(self=obj): keyed as Cls.method(obj)
        first = next(iter(inspect.signature(spec.fn).parameters.values()))
        if (name := first.name) in kwargs and first.kind is not first.POSITIONAL_ONLY:
            args, kwargs = (kwargs[name],), {k: v for k, v in kwargs.items() if k != name}
    method = spec.is_method and bool(args)
    rest = args[1:] if method else args
    if spec.typed:
        tags = tuple(map(typed_tag, rest)), tuple(map(typed_tag, kwargs.values()))
        key = (rest, tuple(kwargs.items()), *tags)
    elif kwargs:
        key = (KWARGS, rest, tuple(kwargs.items()))
    else:
        key = rest
    if method:
        return (id(args[0]), key), args[0]
    return key, None


def unhashable(
    spec: Any, args: tuple[Any, ...], kwargs: dict[str, Any], error: TypeError
) -> UnhashableArguments:
    """The error for a call whose key cannot be hashed, naming the parameter."""
    try:
        bound = inspect.signature(spec.fn).bind(*args, **kwargs)
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
        if spec.is_method:
            named = named[1:]
    fix = (
        "Pass a hashable value (a tuple instead of a list, a frozenset instead of a set), "
        "or give the decorator key=, a function of the same arguments "
        + (METHOD_KEY if spec.is_method else "that returns a hashable key.")
    )
    for at, (name, value) in enumerate(named):
        if (why := unhashable_because(value)) is not None:
            parts = getattr(spec.fn, "__qualname__", "").split(".")
            owner = ".".join(parts[:-1])  # a method whose instance is not named self:
            instance = at == 0 and not spec.is_method  # (a method's own is not in named)
            if instance and any(k.__qualname__ == owner for k in type(value).__mro__):
                fix = (  # keyed as an argument, not told for one
                    f"{name!r} is the first parameter of {'.'.join(parts)}, defined in a "
                    "class. If it is the instance, name it self (cls for a classmethod): "
                    f"a method is keyed by its instance's identity. Otherwise make "
                    f"{type(value).__name__} hashable (a frozen dataclass), or give the "
                    "decorator key=."
                )
            return UnhashableArguments(
                f"@request_memo {spec.name}: argument {name!r} is unhashable "
                f"({why}), so it cannot be part of a cache key. {fix}"
            )
    return UnhashableArguments(
        f"@request_memo {spec.name}: the arguments cannot be hashed ({error}). {fix}"
    )
