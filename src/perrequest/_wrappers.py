"""The hit paths: generated with the memoized function's own signature, or a closure.

A ``def wrapper(*args, **kwargs)`` closure must pack the arguments and build a
key tuple on every call; a wrapper generated with the function's signature
(as ``dataclasses`` generates ``__init__``) lets Python bind the arguments,
and keys a one-argument call by the argument itself. That makes a hit about
40% cheaper, which is what meets the performance targets (docs/performance.md).
It also makes ``f(1, b=2)`` and ``f(1, 2)`` one entry.

Only the hit is generated: every other path is ``_MemoSpec``'s, shared with
the plain closures below (``*args``/``**kwargs`` functions, ``key=``,
``typed=``, callables without a signature). ``tests/test_properties.py``
checks that the two kinds of wrapper behave alike.
"""

from __future__ import annotations

import inspect
import keyword
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from ._keys import KWARGS
from .scope import _current
from .store import MemoStore

_TEMPLATE = """\
def __pr_factory(
    __pr_get, __pr_spec, __pr_fn, __pr_prepare, __pr_run, __pr_outside, __pr_id, __pr_d
):
    {kind}def {name}({signature}):
        __pr_key = {key}
        __pr_store = __pr_get()
        if __pr_store is not None:
            try:
                __pr_sub = __pr_store._subs[__pr_spec]
                __pr_entry = __pr_sub[__pr_key]
                __pr_store._order.move_to_end(__pr_entry[2])
{touch}            except (KeyError, TypeError):  # a miss, no entries yet, or unhashable
                pass
            else:
                __pr_entry[1].hits += 1
                return __pr_entry[0]
            # Outside the except block, so that no error raised from here on
            # carries the miss's KeyError as its context.
            __pr_counter = __pr_prepare(__pr_store, __pr_key, ({positional}), {{{keyword}}})
            if __pr_counter is not None:
                return {await_}__pr_run(
                    __pr_store, (__pr_spec, __pr_key), __pr_fn, ({positional}), {{{keyword}}},
                    __pr_counter, {anchor},
                )
        return {await_}__pr_outside(({positional}), {{{keyword}}}, __pr_key)

    def __pr_keyof({signature}):
        return {key}, {anchor}

    return {name}, __pr_keyof
"""


def parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """The parameters to generate the wrapper from, or None if it cannot be.

    Only a plain Python function qualifies (a callable object, or a decorator's
    ``*args, **kwargs`` wrapper, keeps the plain closure), without ``*args`` or
    ``**kwargs``, and with hashable defaults, which become part of the key.
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
        if param.name.startswith("__pr_"):
            return None
        if param.default is not param.empty:
            try:
                hash(param.default)
            except TypeError:
                return None
    return params


def generate(
    spec: Any,
    params: list[inspect.Parameter],
    run: Callable[..., Any],
    outside: Callable[..., Any],
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The wrapper, and ``keyof``: the same signature, returning ``(key, anchor)``."""
    defaults: list[Any] = []
    signature: list[str] = []
    positional: list[str] = []
    keywords: list[str] = []
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
            keywords.append(f"{param.name!r}: {param.name}")
        else:
            positional.append(param.name)
    names = [p.name for p in params]
    if spec.is_method:
        key = f"(__pr_id({names[0]}), {''.join(n + ', ' for n in names[1:])})"
    elif len(names) == 1:
        key = names[0]
    else:
        key = f"({''.join(n + ', ' for n in names)})"
    touch = ""
    if spec.max_entries is not None:
        touch = "                __pr_sub.move_to_end(__pr_key)\n"
    source = _TEMPLATE.format(
        kind="async " if spec.is_async else "",
        await_="await " if spec.is_async else "",
        name=_code_name(spec.fn),
        signature=", ".join(signature),
        key=key,
        anchor=names[0] if spec.is_method else "None",
        touch=touch,
        positional="".join(n + ", " for n in positional),
        keyword=", ".join(keywords),
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<request_memo {spec.name}>", "exec"), namespace)
    factory = namespace["__pr_factory"]
    return factory(  # type: ignore[no-any-return]
        _current.get, spec, spec.fn, spec.prepare, run, outside, id, tuple(defaults)
    )


def _code_name(fn: Callable[..., Any]) -> str:
    """The function's own name, so that tracebacks and profilers show it."""
    name = getattr(fn, "__name__", "")
    ok = name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("__pr_")
    return name if ok else "__pr_wrapper"


def make_wrapper(spec: Any) -> Callable[..., Any]:
    """The wrapper whose hit path is as short as the options allow."""
    run, outside = spec.runner(), spec.outside_async if spec.is_async else spec.outside
    params = None if spec.key_fn is not None or spec.typed else parameters(spec.fn)
    if params is not None:
        wrapper, spec.keyof = generate(spec, params, run, outside)
        return wrapper
    get_store, make_key, prepare, fn = _current.get, spec.make_key, spec.prepare, spec.fn
    simple, kwargs_mark = not (spec.key_fn or spec.typed or spec.is_method), KWARGS

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
        return make_key(args, kwargs)  # type: ignore[no-any-return]

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
