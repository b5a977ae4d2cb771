"""What the decorators refuse to decorate, at decoration time (never on the call path),
each refusal saying what to write instead."""

from __future__ import annotations

import inspect

from ._checks import _call_of


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
