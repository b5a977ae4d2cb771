"""The memo wrappers, generated (as ``dataclasses`` generates ``__init__``).

With the memoized function's own signature, Python binds the arguments and a
one-argument call is keyed by the argument itself: a hit about 30% cheaper than the
``*args, **kwargs`` form's (2,491 against 3,615 instructions), and ``f(1, b=2)`` and
``f(1, 2)`` are one entry. Other functions (``*args``, ``key=``, ``typed=``, callable objects) get
a ``*args, **kwargs`` wrapper keyed by call shape. The common miss is generated too
(``_flight.run`` written out: one coroutine per async miss, not two; and the common
case of ``Entries._fill``, a call less: a miss about 7% cheaper). The source is
``_templates``'s. ``tests/test_properties.py`` checks that both kinds behave alike.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import textwrap
import weakref
from collections.abc import Callable
from typing import Any

from . import _flight, _templates
from ._active import _current, is_resolved
from ._checks import KWARGS, call_key
from ._records import interrupted
from ._results import LAZY, refuse_memoized_result
from ._waits import task_me, thread_me


def _slow(
    spec: Any, store: Any, where: Any, args: Any, kwargs: Any, anchor: Any, look: bool = False
) -> Any:
    """A miss the wrapper did not register (another caller computes the key, a first
    miss, a closed scope, unhashable arguments, trio, a shared tier); or what ``here()``
    changes (a scope's cell, whose store is made; a scope closed in another context, which
    is unwound): then looked in again. For an async function, an awaitable."""
    if not is_resolved(store):
        return spec.wrapper()(*args, **kwargs)
    counter = spec.prepare(store, where[1], args, kwargs)
    if counter is None:
        return spec.outside(args, kwargs, where[1])
    if look:
        # The lookup of a hashable key raised TypeError or AttributeError: the key's
        # __eq__ did. Looking again raises that before the function runs, as
        # functools.lru_cache does.
        value = store._lookup(where)
        if value is not _flight.MISSING:
            counter.hits += 1
            return _ready(value) if spec.is_async else value
    return spec.runner()(store, where, spec.fn, args, kwargs, counter, anchor)


async def _ready(value: Any) -> Any:
    return value


# The names the generated code uses that are the same for every wrapper (builtins too,
# as a parameter may be called ``type``).
_FIXED = {
    "__pr_get": _current.get, "__pr_id": id, "__pr_slow": _slow, "__pr_end": _flight.end,
    "__pr_failed": _flight.failed, "__pr_now": _flight._now, "__pr_lazy": LAZY,
    "__pr_refuse": refuse_memoized_result, "__pr_thread": thread_me, "__pr_task": task_me,
    "__pr_unknown": _flight._UNKNOWN, "__pr_abandon": _flight.abandon,
    "__pr_interrupted": interrupted, "__pr_type": type, "__pr_KeyError": KeyError,
    "__pr_TypeError": TypeError, "__pr_AttributeError": AttributeError,
    "__pr_BaseException": BaseException, "__pr_RuntimeError": RuntimeError,
    "__pr_call_key": call_key, "__pr_KWARGS": KWARGS, "__pr_tuple": tuple, "__pr_dict": dict,
    "__pr_len": len, "__pr_asyncio": asyncio, "__pr_first": _flight._first, "__pr_hash": hash,
}  # fmt: skip


def parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """The parameters to generate the wrapper from, or None (``*args, **kwargs``): a plain
    function's, without ``*args``/``**kwargs``, whose defaults (part of the key) hash."""
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
    spec: Any, params: list[inspect.Parameter] | None
) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """The wrapper, and ``keyof``: the same signature, returning ``(key, anchor)``; without
    ``params``, a ``*args, **kwargs`` wrapper keyed by call shape, and no ``keyof``."""
    parts = _generic(spec) if params is None else _signature(spec, params)
    defaults = parts.pop("defaults")
    parts["await_"] = "await " if spec.is_async else ""
    parts["name"] = "__pr_wrapper"  # the function's own name is given to its code below
    source = _templates.source(spec, parts)
    # What the code uses are its globals, in a namespace of its own: a closure's cells
    # would be copied into the frame and released again on every call, a hit included.
    namespace = {
        **_FIXED, "__pr_spec": spec, "__pr_fn": spec.fn, "__pr_outside": spec.outside,
        "__pr_d": defaults, "__pr_name": spec.name,
    }  # fmt: skip
    # One file name for all: CPython keeps what it makes for each new one (a memo named
    # anew per request grew the process by 88 bytes a request); tracebacks show the name.
    filename = "<request_memo>"
    exec(_compiled(source, filename), namespace)
    # Taken out, so that a namespace and its function form no reference cycle.
    wrapper = namespace.pop("__pr_wrapper")
    # A code object of its own: shared, each function's globals would undo the others'
    # specialised instructions (a hit of 20 memos of one name and signature, 10% slower).
    # Named here, not in the source: 3.12+ interns a compiled source's names for good (a
    # function named anew per tenant grew the process by 110 bytes a name).
    named = _named_after(spec.fn)  # what tracebacks and profilers show
    wrapper.__code__ = wrapper.__code__.replace(co_name=named.__name__, co_qualname=named.__name__)
    # update_wrapper takes the function's names; a partial or a callable object has none:
    # its function's or class's, not __pr_wrapper (in a repr, a Flask endpoint's name).
    wrapper.__name__, wrapper.__qualname__ = named.__name__, named.__qualname__
    if params is None:
        return wrapper, None
    keyof: dict[str, Any] = {"__pr_id": id, "__pr_d": defaults}
    exec(_compiled(_templates.keyof_source(parts), filename), keyof)
    keyof_fn = keyof.pop("__pr_keyof")
    keyof_fn.__qualname__ = spec.fn.__qualname__  # what its binding errors name
    return wrapper, keyof_fn


def _generic(spec: Any) -> dict[str, Any]:
    """The texts of a ``*args, **kwargs`` wrapper: ``call_key``'s key, written out when
    it is the arguments alone."""
    key = "__pr_call_key(__pr_spec, __pr_args, __pr_kwargs)"
    if not (spec.key_fn or spec.typed or spec.is_method):
        key = (
            "((__pr_KWARGS, __pr_args, __pr_tuple(__pr_kwargs.items())) "
            "if __pr_kwargs else __pr_args), None"
        )
    signature = "*__pr_args, **__pr_kwargs"
    return {
        "key": f"__pr_key, __pr_anchor = {key}",
        "signature": signature,
        "arguments": signature,
        "args": "__pr_args",
        "kwargs": "__pr_kwargs",
        "anchor": "__pr_anchor",
        "defaults": (),
    }


def _signature(spec: Any, params: list[inspect.Parameter]) -> dict[str, Any]:
    """The texts of a wrapper with the function's own parameters."""
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
    arguments = [*positional, *(f"{n}={n}" for n in names if n not in positional)]
    return {
        "key": f"__pr_key = {key}",
        "signature": ", ".join(signature),
        "arguments": ", ".join(arguments),
        "args": f"({''.join(n + ', ' for n in positional)})",
        "kwargs": "{" + ", ".join(keywords) + "}",
        "anchor": names[0] if spec.is_method else "None",
        "defaults": tuple(defaults),
    }


@functools.lru_cache(maxsize=256)
def _compiled(source: str, filename: str) -> Any:
    """Compiling (and dedenting) is most of a decoration's cost: a helper decorated anew
    per message (the same source each time) is compiled once. Code objects are immutable."""
    return compile(textwrap.dedent(source), filename, "exec")


def _named_after(fn: Any) -> Any:
    """What has the names to show: the function, a partial's function, a callable's class."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    named = fn if type(getattr(fn, "__name__", None)) is str else type(fn)
    return named if type(getattr(named, "__qualname__", None)) is str else type(named)


def make_wrapper(spec: Any) -> Callable[..., Any]:
    params = None if spec.key_fn is not None or spec.typed else parameters(spec.fn)
    wrapper, spec.keyof = generate(spec, params)
    spec.wrapper = weakref.ref(wrapper)  # not a cycle: a dropped wrapper is freed at once
    return wrapper
