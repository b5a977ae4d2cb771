"""The records of computations in flight (``_flight``'s ``cache._flights``), found by
identity where a key's hash cannot be trusted: filed again when a key's hash moved
(``take_out``), unregistered when their computation never ends (``drop_dead``), taken over
from a task whose loop stopped (``take_over``), or from a caller interrupted as it
registered (``interrupted``)."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from . import _waits
from ._signals import is_time_limit
from ._waits import Waited, done_waiting, restart

FLIGHTS = 64  # computations in flight in one cache before ``drop_dead`` looks


def take_out(flights: dict[Hashable, Any], stale: Callable[[Any, Any], bool]) -> list[Any]:
    """Take the records that ``stale(filed, record)`` names out of ``flights`` by identity,
    where a lookup by key cannot find them: their key's hash changed since it was filed (a
    computation that changes its argument, as a save assigning the primary key its hash
    uses does) or its ``__eq__`` raises. The others are filed again (``clear`` hashes
    nothing); the waiters of one that cannot be (``_file``) start again and join it.
    Returns those taken out. Lock held. A signal handler's exception goes on once the rest
    are filed again (the waiters of those taken out start again: the caller gets none)."""
    records = list(flights.items())  # in the order they were filed
    taken, at = [], 0
    try:
        flights.clear()  # not a popitem() at a time: a signal as one returned lost its record
        while at < len(records):
            filed, record = records[at]
            if stale(filed, record):  # runs no code of the key
                taken.append(record)
            elif not _file(flights, filed, record):
                restart(record)
            at += 1
    except BaseException:
        filed_now = {(id(k), id(v)) for k, v in list(flights.items())}
        if all((id(k), id(v)) in filed_now for k, v in records):
            raise  # before the clear (a trace function's): nothing taken, nothing left out
        for record in taken:
            restart(record)
        for filed, record in records[at:]:  # the one it was at may be filed: kept
            if stale(filed, record) or not _file(flights, filed, record):
                restart(record)
        raise
    return taken


def _file(flights: dict[Hashable, Any], filed: Hashable, record: Any) -> bool:
    """False if the key's ``__hash__`` or ``__eq__`` raises now, or a caller registered it
    meanwhile (registering takes no lock: that caller computes too)."""
    try:
        return flights.setdefault(filed, record) is record
    except Exception as exc:
        if is_time_limit(exc):  # a soft time limit: the task's
            raise
        return False


def interrupted(
    cache: Any, key: Hashable, me: object, exc: BaseException, record: Any = None
) -> None:
    """A miss (``_flight.run``) interrupted as registering ``me`` returned (``record`` None:
    not got; a signal's ``Exception`` too) or as a wait began: its waiters compute (by
    identity: per call). Other ``Exception``s are the computation's, handed to a waiter."""
    if isinstance(exc, Exception) and record is not None:
        return
    with cache._lock:
        try:
            record = cache._flights.get(key)
        except Exception:  # the key's __hash__/__eq__: it registered nothing
            return
        if type(record) is Waited:  # interrupted as its wait began: that wait is over
            done_waiting(me, record.future)
        if record is me or (type(record) is Waited and record.owner is me):
            del cache._flights[key]
            restart(record)


# The tasks whose keys a caller took over as their loops stopped, with their store's count of
# deletes then: resumed, one stores its value only if no delete came since (``resumed``).
# Weakly: a task never resumed goes with its loop.
_taken: weakref.WeakKeyDictionary[Any, list[tuple[Any, Hashable, int]]] = (
    weakref.WeakKeyDictionary()
)


def take_over(cache: Any, key: Hashable, owner: object, me: object) -> bool:
    """``me`` computes ``key`` instead of ``owner`` (None, or gone: its loop stopped, its
    process the parent), whose waiters look again. Lock held."""
    restart(cache._flights.pop(key, None))
    if isinstance(owner, asyncio.Task):
        with _waits._waits_lock:
            _taken.setdefault(owner, []).append((weakref.ref(cache), key, cache._deletes))
    cache._flights[key] = me
    return True


def resumed(cache: Any, key: Hashable, me: object) -> bool:
    """Whether ``me``'s computation of ``key``, taken over, may store its value: no delete
    came since (it was not invalidated, only its loop paused). Lock held."""
    with _waits._waits_lock:
        taken = _taken.get(me) if isinstance(me, asyncio.Task) else None
        for at, entry in enumerate(taken or ()):
            with contextlib.suppress(Exception):  # a key's __eq__ raising: not this one
                if entry[0]() is cache and (entry[1] is key or entry[1] == key):
                    del taken[at]  # type: ignore[union-attr]
                    return bool(entry[2] == cache._deletes)
    return False


def drop_dead(cache: Any, closing: bool = False) -> None:
    """Unregister the computations that never end (tasks of closed loops, one per message of
    a long scope; at ``closing``, of stopped ones too): a cache would hold them, and their
    arguments, for as long as it is held. Their waiters look again. Looked for again once
    more than ``FLIGHTS`` and twice as many as are left are in flight (O(1) a miss). One
    whose key's hash moved stays (its waiters are told to look again) but at ``closing``:
    only ``take_out`` finds it, and a live cache (a shared tier) must never be emptied."""

    def dead(_: object, record: Any) -> bool:  # a stopped loop may run again: its task too
        owner = record.owner if type(record) is Waited else record
        if type(owner) is int or not isinstance(owner, asyncio.Task):
            return type(owner) is int and _waits.gone(owner)
        return owner.done() or owner.get_loop().is_closed() or (closing and _waits.gone(owner))

    with cache._lock:
        flights, moved = cache._flights, False
        for filed, record in list(flights.items()):
            if dead(filed, record) and not _drop(flights, filed, record):
                restart(record)  # its key's hash moved: its waiters take over (by the key now)
                moved = True
        if moved and closing:  # a closed store keeps no key: only take_out finds these, and
            for record in take_out(flights, dead):  # empties the dict as it does (callers
                restart(record)  # register without the lock: one may compute a key twice)
        cache._flights_cap = max(FLIGHTS, 2 * len(flights))


def _drop(flights: dict[Hashable, Any], filed: Hashable, record: Any) -> bool:
    """Unregister ``record`` in place, found by its key's hash now and by identity (callers
    register without the lock: emptying the dict, as ``take_out`` does, would let one find
    a live computation's key free and compute it too). False if not found so."""
    try:
        probe = Probe(filed)
        if flights.get(probe) is record:
            del flights[probe]
            restart(record)
            return True
    except Exception as exc:  # its __hash__ (or a colliding key's __eq__) raises now
        if is_time_limit(exc):
            raise
    return False


class Probe:
    """``key`` looked up by its hash now and by identity: a dict holding it finds it only
    if it is filed under that hash (a plain lookup matches a key by identity first,
    whatever its hash; a store's eviction, ``_entries._refile``)."""

    __slots__ = ("hash", "key")

    def __init__(self, key: Hashable) -> None:
        self.key, self.hash = key, hash(key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return other is self.key
