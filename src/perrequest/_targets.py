"""What the decorators refuse to decorate, at decoration time (never on the call path),
each refusal saying what to write instead."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

from ._checks import _call_of, is_method, takes


def refuse_generator(fn: object, decorator: str) -> None:
    """Generator bodies run after the call returns, outside any scope the call set up."""
    for target, kind in ((fn, ""), (_call_of(fn), "a callable object whose __call__ is ")):
        if inspect.isgeneratorfunction(target):
            kind += "a generator function"
        elif inspect.isasyncgenfunction(target):
            kind += "an async generator function"
        else:
            continue
        raise TypeError(
            f"{decorator} cannot take {kind} ({getattr(fn, '__qualname__', fn)}): its body "
            "runs after the call returns, outside the scope. Use it on a function that "
            "returns a list, or on the function that consumes the generator."
        )


def refuse_batch_function(fn: Callable[..., Any]) -> None:
    """A batch function is called with one argument, the list of keys, once per function:
    a generator, a method, or a function that needs other arguments (or none) would fail
    on its first load, inside a request, rather than here."""
    refuse_generator(fn, "@request_batch")
    name = getattr(fn, "__qualname__", fn)
    if is_method(fn):
        raise TypeError(
            f"@request_batch cannot decorate the method {name}: a loader is one per "
            "function, not per instance. Decorate a module-level function (or a "
            "@staticmethod) of the keys alone."
        )
    if takes(fn, ([],), {}) is False:  # None: no signature to read (a builtin), trusted
        raise TypeError(
            f"@request_batch decorates a function called with one argument, the list of "
            f"keys, but {name}{inspect.signature(fn)} cannot be called so "
            "(fn(keys)): make the keys its one required parameter; give the others "
            "defaults, or bind them first (request_batch(functools.partial(fn, db=db)))."
        )


def refuse_batch_target(target: object) -> None:
    """A loader is one per function: a class method (like a method) would need one per class,
    and a non-callable is no batch function."""
    if isinstance(target, classmethod):
        raise TypeError(
            f"@request_batch cannot decorate the class method "
            f"{getattr(target.__func__, '__qualname__', target)}: a loader is one per "
            "function, not per class. Decorate a module-level function (or a @staticmethod) "
            "of the keys alone."
        )
    if not callable(target):
        raise TypeError(f"@request_batch decorates a function of a list of keys, not {target!r}")


def refuse_class(target: object, decorator: str) -> None:
    """A decorated class would become a function (``isinstance`` and subclassing fail), and
    only its ``__init__`` would run in the scope, not the methods that do the work."""
    if isinstance(target, type):
        raise TypeError(
            f"{decorator} decorates a function, not the class {target.__qualname__}: the name "
            "would hold a function (isinstance() and subclasses fail) and only __init__ would "
            "run in the scope. Decorate the method that does the work, or open "
            "'with request_scope():' around it."
        )


def refuse_task(fn: object, decorator: str) -> None:
    """A Celery task, decorated from above: the name would hold a plain function (no
    ``.delay()``), and the worker would run the task Celery registered, undecorated."""
    local, task = sys.modules.get("celery.local"), sys.modules.get("celery.app.task")
    # By type: a PromiseProxy (app.task before the app is finalized) is not evaluated.
    if (local and isinstance(fn, local.Proxy)) or (task and isinstance(fn, task.Task)):
        fix = "scoped: perrequest.celery.install(app), or base=ScopedTask"
        raise TypeError(  # not naming it: a lazy task's repr would evaluate it
            f"{decorator} cannot go above @app.task (on a Celery task): the name would hold a "
            "plain function, without .delay(), and the worker would run the task Celery "
            f"registered without it. Put it below @app.task (@app.task, then {decorator}, "
            f"then def); for every task {fix}; for one direct call in a scope of its own, "
            "with request_scope(): task(...)."
        )


def refuse_memo_target(target: object) -> None:
    """What ``@request_memo`` cannot go over: a property or ``cached_property`` (which is
    not called per call; put it above instead), and a process-lifetime cache
    (``functools.lru_cache``, ``functools.cache``), which would keep every value for the
    life of the process, across requests: the leak per-request memoization avoids."""
    refuse_task(target, "@request_memo")  # first: a check by isinstance evaluates a proxy
    if (  # what django's method_decorator hands a decorator, made anew on every call
        type(target) is functools.partial
        and not target.args
        and not target.keywords
        and inspect.ismethod(target.func)
        and "__wrapped__" in vars(target)  # functools.wraps(method)(partial(...)): Django's
    ):
        raise TypeError(
            f"@request_memo got functools.partial({target.func!r}), which is what Django's "
            "method_decorator passes, anew on every call: each call would get a new memo and "
            "nothing would be cached. Put @request_memo on the method itself (a memoized "
            "method is keyed by self), below any @method_decorator."
        )
    if isinstance(target, property):
        name = getattr(target.fget, "__name__", "x")
        raise TypeError(
            f"@request_memo cannot decorate a property ({name}): put @property above it, so "
            f"that the getter is memoized: @property, then @request_memo, then def {name}(self)"
        )
    kind = type(target)
    if kind is functools.singledispatchmethod or kind is functools.partialmethod:
        raise TypeError(
            f"@request_memo cannot go over functools.{kind.__name__}, which is not called: it "
            f"makes a method as the attribute is looked up. Memoize the function it wraps: "
            + (
                "@functools.singledispatchmethod above @request_memo"
                if kind is functools.singledispatchmethod
                else "functools.partialmethod(request_memo(fn), ...)"
            )
        )
    if issubclass(kind, functools.cached_property) or kind.__name__ == "cached_property":
        fn = getattr(target, "real_func", None) or getattr(target, "func", None)  # Django's
        name = getattr(fn, "__name__", "x")
        raise TypeError(
            f"@request_memo cannot decorate a {kind.__module__}.cached_property ({name}), "
            "which keeps its value on the instance for the instance's life, not per request: "
            "replace it with @property above @request_memo: @property, then @request_memo, "
            f"then def {name}(self)"
        )
    wrapped: object = target
    for _ in range(100):  # through functools.wraps chains (__wrapped__)
        # Statically: a Mock (a stand-in for a fetcher, in tests) answers every hasattr.
        if _has(wrapped, "cache_parameters") and _has(wrapped, "cache_info"):
            name = getattr(target, "__qualname__", target)
            raise TypeError(
                f"@request_memo cannot go over functools.lru_cache or functools.cache "
                f"({name}): that cache keeps every value for the life of the process, "
                "across requests, the leak per-request memoization avoids. Remove "
                "@functools.lru_cache (or @functools.cache) and keep @request_memo; for a "
                "bounded cache shared between requests, use "
                "@request_memo(shared=cachetools.LRUCache(maxsize=...))."
            )
        try:
            wrapped = getattr(wrapped, "__wrapped__", None)
        except Exception:  # a __wrapped__ of its own that raises: nothing more to look at
            return
        if wrapped is None:
            return


def _has(obj: object, name: str) -> bool:
    return inspect.getattr_static(obj, name, None) is not None
