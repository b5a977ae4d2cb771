"""The source the memo wrappers are generated from (``_wrappers.generate``).

A hit looks the key up in the function's own dict; a miss registers as computing the key
and stores the value in the wrapper's own frame (``_COMPUTE``: ``_flight.run`` written
out, and the common case of ``Entries._fill``), unless somebody else computes it, it is
the function's first miss in the store, the arguments do not hash, or a shared tier
computes: then ``_wrappers._slow``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
from typing import Any

# Indented one level, as the miss templates below are; dedented before compiling.
_TEMPLATE = """\
    {kind}def {name}({signature}):
        {key}
        __pr_store = __pr_get()
        if __pr_store is None:  # first: a hit jumps over one return, no EXTENDED_ARG
            return {await_}__pr_outside({args}, {kwargs}, __pr_key)
        if True:  # _BODY: dedented by source()
            try:
{lookup}            except __pr_KeyError:  # a miss, or this function's first
                __pr_odd = False
            except (__pr_TypeError, __pr_AttributeError):  # no store yet; closed;
                __pr_odd = True  # unhashable; or the key's __eq__ raised: _slow tells which
{hit}            # Outside the except blocks, so that no error raised from here on
            # carries the miss's KeyError as its context.
{miss}"""

_BODY = "        if True:  # _BODY: dedented by source()\n"

# A sync lookup: a miss raises KeyError (some 1,900 instructions of a miss's 12,000), a
# hit is 130 cheaper than through ``dict.get``: 6% of ``f(1)``'s hit, the thinnest target.
_SUBSCRIPT = """\
                __pr_entry = __pr_store._subs[__pr_spec][__pr_key]
                __pr_store._order.move_to_end(__pr_entry[2])
{touch}"""
_SUBSCRIPT_HIT = """\
            else:
                __pr_entry[1].hits += 1
                return __pr_entry[0]
"""

# An async lookup, through ``dict.get``: a miss raises no KeyError, 2,000 instructions
# less; a hit (no target as thin as the sync one's) 130 more.
_GET = """\
                __pr_entry = __pr_store._subs[__pr_spec].get(__pr_key)
                if __pr_entry is not None:
                    __pr_store._order.move_to_end(__pr_entry[2])
{touch}                    __pr_entry[1].hits += 1
                    return __pr_entry[0]
                __pr_odd = False
"""

# The wrapper's twin for cache_delete: the same signature, returning ``(key, anchor)``.
# Compiled apart, in a namespace without the spec: the spec holds it.
_KEYOF = """\
def __pr_keyof({signature}):
    {key}
    return __pr_key, {anchor}
"""

# A miss through the shared tier (``spec.runner()``), all ``_slow``'s.
_RUN = """\
            return {await_}__pr_slow(
                __pr_spec, __pr_store, (__pr_spec, __pr_key), {args}, {kwargs}, {anchor},
                __pr_odd,
            )
"""

# A request-store miss: ``_flight.run`` written out, computed in the wrapper's own
# frame when nobody else computes the key (for an async function, one coroutine
# instead of two).
_COMPUTE = """\
            __pr_where = (__pr_spec, __pr_key)
{me}            try:
                __pr_counter = __pr_store._counters[__pr_name]
            except (__pr_AttributeError, __pr_KeyError, __pr_TypeError):
                __pr_counter = None  # first miss; no store yet
            try:  # register as computing the key, unless somebody else is
                __pr_mine = (
                    __pr_counter is not None
                    and not __pr_odd{known}
                    and __pr_store._flights.setdefault(__pr_where, __pr_me) is __pr_me
                )
            except __pr_TypeError:
                try:  # unhashable, found no sooner (cache_clear() dropped the function's
                    __pr_hash(__pr_key)  # dict, where looking would have hashed it): _slow
                except __pr_TypeError:  # names the argument
                    __pr_mine = False
                else:  # the key's __hash__ or a colliding key's __eq__ just now: raised
                    raise
            except __pr_BaseException as __pr_exc:  # an interrupt as setdefault returns; the
                __pr_interrupted(__pr_store, __pr_where, __pr_me, __pr_exc)  # key's __hash__
                __pr_me = None  # or a colliding key's __eq__ now: raised before the function
                raise  # runs, as on the slow path
            if not __pr_mine:  # what remains is ``_slow``'s
                __pr_me = None
                return {await_}__pr_slow(
                    __pr_spec, __pr_store, __pr_where, {args}, {kwargs}, {anchor}, __pr_odd,
                )
            __pr_start = 0.0  # registered: every way out resolves it (see _flight.run)
            try:
                __pr_counter.misses += 1
                if __pr_counter.timed:
                    __pr_start = __pr_now()
                __pr_value = {await_}__pr_fn({arguments})
{refuse}                if __pr_start:
                    __pr_counter.compute_s += __pr_now() - __pr_start
                    __pr_start = 0.0
            except __pr_BaseException as __pr_exc:
                try:
                    __pr_failed(
                        __pr_store, __pr_where, __pr_me, __pr_counter, __pr_start, __pr_exc
                    )
                except __pr_BaseException:  # a signal as it began: once more (_flight.run)
                    __pr_failed(__pr_store, __pr_where, __pr_me, __pr_counter, 0.0, __pr_exc)
                    __pr_me = None
                    raise
                __pr_me = None
                raise
            __pr_lock = __pr_store._lock  # _flight.finish, written out
            __pr_record = __pr_unknown
            try:
                __pr_lock.acquire()
                __pr_record = __pr_store._flights.pop(__pr_where, None)
                if __pr_record is __pr_me:  # nobody waited: the common miss
                    # Entries._fill written out for a new key in a plain dict with room.
                    __pr_sub = __pr_store._subs
                    __pr_sub = None if __pr_sub is None else __pr_sub.get(__pr_spec)
                    if (
                        __pr_type(__pr_sub) is __pr_dict
                        and __pr_len(__pr_store._order) < __pr_store._bound
                    ):
                        __pr_eid = __pr_store._next_id = __pr_store._next_id + 1
                        __pr_entry = (__pr_value, __pr_counter, __pr_eid, {anchor})
                        __pr_kept = __pr_sub.setdefault(__pr_key, __pr_entry)
                        if __pr_kept is __pr_entry:
                            if __pr_store._next_id == __pr_eid:
                                __pr_store._order[__pr_eid] = __pr_where
                            else:  # the key's own code wrote here meanwhile
                                __pr_store._resync(__pr_spec, __pr_sub)
                            return __pr_value
                    # Stored since it looked (a recursion, a race), or a bound to keep: what
                    # _flight.run does (_first): a value stored meanwhile stays, read, and is
                    # what it returns; one value per key.
                    return __pr_first(__pr_store, __pr_where, __pr_value, __pr_counter, {anchor})
                return __pr_end(
                    __pr_store, __pr_where, __pr_me, __pr_record, __pr_value, __pr_counter, {anchor}
                )
            except __pr_BaseException as __pr_exc:
                __pr_abandon(
                    __pr_store, __pr_where, __pr_me, __pr_record, __pr_value, __pr_exc
                )
                raise
            finally:
                try:
                    __pr_lock.release()
                except __pr_RuntimeError:  # acquire() was interrupted: not held
                    pass
"""

_THREAD = """\
            __pr_me = __pr_thread()
"""

_TASK = """\
            __pr_me = __pr_task()  # None under trio: computed unshared, by _slow
"""

# _waits.task_me written out where asyncio.current_task is a Python function (CPython
# 3.11): it is then the frame of its own, one call less (looked up per call, as there).
_TASK_INLINE = """\
            try:
                __pr_me = __pr_asyncio.current_task()
            except __pr_RuntimeError:  # no asyncio loop running here: trio (as _TASK)
                __pr_me = None
"""

_REFUSE = """\
                try:  # a coroutine, a one-shot iterator (_results.is_lazy, written out)
                    __pr_lazy_value = __pr_type(__pr_value) in __pr_lazy
                except __pr_TypeError:  # a class whose metaclass cannot hash it: none
                    __pr_lazy_value = False
                if __pr_lazy_value:
                    __pr_refuse(__pr_fn, __pr_value)
"""


def source(spec: Any, parts: dict[str, Any]) -> str:
    """The wrapper's source, from ``parts`` (``_wrappers._generic`` or ``_signature``)."""
    shape = spec.is_async, spec.shared is not None, bool(spec.max_entries)
    return _source(*shape, tuple(parts.items()))


@functools.lru_cache(maxsize=256)
def _source(is_async: bool, shared: bool, bounded: bool, items: tuple[Any, ...]) -> str:
    """Built once per shape: a helper decorated anew per request or message (its
    ``_wrappers._compiled`` code is cached too) costs no string work after the first."""
    parts = dict(items)
    miss = (_RUN if shared else _COMPUTE).format(
        **parts,
        refuse=_REFUSE,
        me=_me(is_async),
        known="\n                    and __pr_me is not None" if is_async else "",
    )
    touch = "__pr_sub.move_to_end(__pr_key)\n" if bounded else ""
    lookup = (_GET if is_async else _SUBSCRIPT).format(
        touch=" " * (20 if is_async else 16) + touch if touch else ""
    )
    text = _TEMPLATE.format(
        **parts,
        kind="async " if is_async else "",
        lookup=lookup,
        hit="" if is_async else _SUBSCRIPT_HIT,
        miss=miss,
    )
    if touch:  # a bounded function's dict is touched too: kept in a local
        text = text.replace(
            "__pr_entry = __pr_store._subs[__pr_spec]",
            "__pr_sub = __pr_store._subs[__pr_spec]\n                __pr_entry = __pr_sub",
        )
    # Everything after the None check one level out (the templates are written inside it).
    head, rest = text.split(_BODY, 1)
    text = head + "".join(line[4:] for line in rest.splitlines(keepends=True))
    named = re.fullmatch(r"__pr_key = (\w+)", parts["key"])
    if named:  # the argument is the key: no local of its own (one store and load less)
        text = text.replace(f"        {parts['key']}\n", "", 1)
        text = re.sub(r"\b__pr_key\b", named[1], text)
    return text


def keyof_source(parts: dict[str, Any]) -> str:
    return _KEYOF.format(**parts)


def _me(is_async: bool) -> str:
    if not is_async:  # a thread's me is never None
        return _THREAD
    return _TASK_INLINE if inspect.isfunction(asyncio.current_task) else _TASK
