"""Who waits for whose single-flight computation (threads by id, tasks), so that a caller
never waits for one that waits for it (two threads fetching each other's keys would
otherwise wait forever); and the records in flight, filed again, taken out, dropped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from ._signals import raised_by_a_signal_handler


def thread_me() -> int:
    """A thread's ``me`` in single-flight, through a frame of its own: a ``RecursionError``
    comes before registering, not before unregistering (``_flight.failed``). Looked up per
    call: bound before gevent's patching (``--preload``), greenlets would share an id."""
    return threading.get_ident()


def task_me() -> object:
    """``thread_me`` for tasks: the current asyncio task, through a frame of its own
    (3.12+ counts the frames of awaited coroutines as calls); None under trio. (On 3.11
    it costs a ``getpid()`` system call; docs/performance.md says why it is not cached.)"""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no asyncio loop running here
        return None


# Who waits for whom: threads by id (a thread's wait always ends: ``done_waiting``), tasks
# weakly, both ways (a task left pending on a loop closed under it never ends its wait: its
# entry goes with it, not for the life of the process, holding its request).
_waits: dict[object, object] = {}
_task_waits: weakref.WeakKeyDictionary[object, object] = weakref.WeakKeyDictionary()
_waits_lock = threading.RLock()  # reentrant: a collection inside may run a waiter
FLIGHTS = 64  # computations in flight in one cache before ``drop_dead`` looks


def _waits_of(who: object) -> Any:
    return _waits if type(who) is int else _task_waits


# In a process made by fork: the threads of its parents (all but the one that forked),
# which records copied with the memory may name as computing a key. They do not run
# here, so they never finish: a caller that finds one computes the key itself.
_gone: frozenset[object] = frozenset()
_at_fork: frozenset[object] = frozenset()


def gone(owner: Any) -> bool:
    """True when ``owner``, computing a key, may never end: a task done (its record left by
    a lost lookup) or left pending on a stopped event loop, or a thread of a parent of
    this process that does not exist here (one started here may reuse its id)."""
    if type(owner) is not int:  # a task registers as its loop runs: only a stop stops it
        return owner is not None and (owner.done() or not owner.get_loop().is_running())
    return bool(_gone) and owner in _gone and all(t.ident != owner for t in threading.enumerate())


def _before_fork() -> None:
    global _at_fork
    _at_fork = frozenset(thread.ident for thread in threading.enumerate())


def _after_fork_in_child() -> None:
    """The parent's waits are not this process's; nor is the lock (a thread there held it?)."""
    global _gone, _waits_lock
    _gone = _gone | (_at_fork - {threading.get_ident()})
    _waits.clear()
    _task_waits.clear()
    _waits_lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def may_wait(me: object, owner: object, future: Any) -> bool:
    """Record that ``me`` waits for ``owner``'s ``future``, unless that closes a cycle (then
    False). A wait whose future is done is over, though its waiter has not run to say so."""
    with _waits_lock:
        who: object = owner
        for _ in range(len(_waits) + len(_task_waits) + 1):
            if who == me:
                return False
            entry = _waits_of(who).get(who)
            if entry is None:
                break
            while entry[2] is not None and _over(entry):  # a nested wait ended: the outer
                entry = entry[2]  # one is about to go on (its thread has not said so yet)
            who, done = entry[0] if type(entry[0]) is int else entry[0](), entry[1]()
            if who is None or done is None or done.done():
                break
        target = owner if type(owner) is int else weakref.ref(owner)
        waits = _waits_of(me)
        waits[me] = (target, weakref.ref(future), waits.get(me))  # a wait in a wait: nested
        return True


def _over(entry: Any) -> bool:
    return (done := entry[1]()) is None or done.done()


def done_waiting(me: object, future: Any) -> None:
    """``me`` waits no more for ``future``: its entry goes, the entry of a wait it was nested
    in (a finalizer run by a collection in a waiting thread) is back; one ``may_wait``
    made no entry for (the future was done) leaves the entry alone."""
    # No lock: only ``me`` writes its own entry (others read it), and a collection in
    # may_wait may run a finalizer that waits, holding _waits_lock, for ``me`` to finish.
    waits = _waits_of(me)
    entry = waits.get(me)
    if entry is not None and entry[1]() is future:
        if entry[2] is None:
            waits.pop(me, None)
        else:
            waits[me] = entry[2]


class Waited:
    """A computation that somebody waits for: threads on ``future``; tasks on a future of
    their own loop each, in ``tasks`` while they wait, woken by ``future``'s one callback
    (``wrap_future`` per task: a callback per task that gave up, while it hangs)."""

    __slots__ = ("future", "owner", "tasks")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.future: Future[Any] = Future()
        self.future.set_running_or_notify_cancel()  # a waiter's cancel() cannot cancel it
        # No lock: a set's add, discard and copy are atomic (a collection's finalizer may
        # end a computation, and so wake, in a thread in the middle of waiting). The set,
        # not the record, in the callback: no cycle to keep the value until a collection.
        self.tasks: set[asyncio.Future[None]] = set()
        self.future.add_done_callback(functools.partial(_wake, self.tasks))


def outcome_of(cache: Any, exc: BaseException, otherwise: Any) -> Any:
    """What the waiters of a computation that raised ``exc`` get: that ``Exception``; from a
    shared tier (``_values_only``: its function's errors reach them as values, a copy each)
    RESTART: what it raises is a signal handler's or its own, for no other request to see.
    ``otherwise`` for a ``BaseException``."""
    if not isinstance(exc, Exception):
        return otherwise
    return RESTART if getattr(cache, "_values_only", False) else (False, exc)


def restart(record: object) -> None:
    """A computation's waiters look again (it stores nothing for them, or ended without
    an outcome); nothing for a record nobody waits for, or one already resolved."""
    if type(record) is Waited and not record.future.done():
        record.future.set_result(RESTART)


def take_out(flights: dict[Hashable, Any], stale: Callable[[Any, Any], bool]) -> list[Any]:
    """Take the records that ``stale(filed, record)`` names out of ``flights`` by identity,
    where a lookup by key cannot find them: their key's hash changed since it was filed (a
    computation that changes its argument, as a save assigning the primary key its hash
    uses does) or its ``__eq__`` raises. The others are filed again (``popitem`` hashes
    nothing); the waiters of one that cannot be (``_file``) start again and join it.
    Returns those taken out. Lock held. A signal handler's exception goes on once the rest
    are filed again (the waiters of those taken out start again: the caller gets none)."""
    records = []
    while flights:
        records.append(flights.popitem())
    taken = []
    try:
        while records:
            filed, record = records[-1]  # in the order they were filed
            if stale(filed, record):  # runs no code of the key
                taken.append(record)
            elif not _file(flights, filed, record):
                restart(record)
            records.pop()
    except BaseException:
        for record in taken:
            restart(record)
        for filed, record in reversed(records):  # the one it was at may be filed: kept
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
        if raised_by_a_signal_handler(exc):  # a soft time limit: the task's
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
        with _waits_lock:
            _taken.setdefault(owner, []).append((weakref.ref(cache), key, cache._deletes))
    cache._flights[key] = me
    return True


def resumed(cache: Any, key: Hashable, me: object) -> bool:
    """Whether ``me``'s computation of ``key``, taken over, may store its value: no delete
    came since (it was not invalidated, only its loop paused). Lock held."""
    with _waits_lock:
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
    more than ``FLIGHTS`` and twice as many as are left are in flight (O(1) a miss)."""

    def dead(_: object, record: Any) -> bool:  # a stopped loop may run again: its task too
        owner = record.owner if type(record) is Waited else record
        if type(owner) is int or not isinstance(owner, asyncio.Task):
            return type(owner) is int and gone(owner)
        return owner.done() or owner.get_loop().is_closed() or (closing and gone(owner))

    with cache._lock:
        flights = cache._flights
        if any(dead(None, record) for record in list(flights.values())):
            for record in take_out(flights, dead):
                restart(record)
        cache._flights_cap = max(FLIGHTS, 2 * len(flights))


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


# What a waiter gets when it should look again (and compute the key itself if need be): the
# computing caller was interrupted, or ended without resolving the future.
RESTART: Any = object()


def result(future: Future[Any], flights: dict[Hashable, Any], key: Hashable, record: Any) -> Any:
    """``future``'s result, looked at every second: RESTART once seen twice unresolved with
    its ``record`` gone from ``flights`` (a batch's fetch: ended), as a computation that
    ended in a ``RecursionError`` at the limit may have had no frame left to resolve it."""
    seen_gone = False
    while True:
        try:
            return future.result(timeout=1.0)
        except TimeoutError:
            ended = flights.get(key) is not record or getattr(record, "ended", False)
            ended = ended or gone(record.owner)
            if ended and seen_gone:
                return RESTART
            seen_gone = ended


async def result_async(
    future: Future[Any], flights: dict[Hashable, Any], key: Hashable, record: Waited
) -> Any:
    """``result`` for a task (of any loop), on a future of its own (each second's timeout
    cancels a shield of it). Not ``asyncio.wait``: cancelled in it, its frame (in the
    error's traceback) holds the future, and so the value."""
    mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    tasks = record.tasks
    tasks.add(mine)  # then look: woken, or done already
    try:
        seen_gone = False
        while not future.done():
            try:
                async with asyncio.timeout(1.0):
                    await asyncio.shield(mine)
            except TimeoutError:
                pass
            if future.done():
                break
            ended = flights.get(key) is not record or gone(record.owner)
            if ended and seen_gone:
                return RESTART
            seen_gone = ended
        return future.result()
    finally:
        tasks.discard(mine)
        # A cancellation's traceback holds this frame: no value left in it (a GC cycle).
        future = record = mine = tasks = None  # type: ignore[assignment]


def _wake(tasks: set[asyncio.Future[None]], _: object) -> None:
    """The computation ended: wake the tasks waiting for it, each on its loop."""
    for mine in list(tasks):
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits there
            mine.get_loop().call_soon_threadsafe(_settle, mine)


def _settle(mine: asyncio.Future[None]) -> None:
    if not mine.done():
        mine.set_result(None)
