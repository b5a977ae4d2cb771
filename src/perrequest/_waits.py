"""Who waits for whose single-flight computation (threads by id, tasks), so that a caller
never waits for one that waits for it: two threads fetching each other's keys would
otherwise wait forever; and how a waiter waits (``Waited``, ``result``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any


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
    False). No loop under the lock: 3.13 kept it at a signal at its back edge (cpython#130279)."""
    with _waits_lock:
        if _waits_for(owner, me):
            return False
        target = owner if type(owner) is int else weakref.ref(owner)
        waits = _waits_of(me)
        waits[me] = (target, weakref.ref(future), waits.get(me))  # a wait in a wait: nested
        return True


def _waits_for(who: object, me: object) -> bool:
    """Whether ``who`` waits for ``me`` through whom it waits for (a done future's: over)."""
    for _ in range(len(_waits) + len(_task_waits) + 1):
        if who == me:
            return True
        entry = _waits_of(who).get(who)
        if entry is None:
            return False
        while entry[2] is not None and ((done := entry[1]()) is None or done.done()):
            entry = entry[2]
        who, done = entry[0] if type(entry[0]) is int else entry[0](), entry[1]()
        if who is None or done is None or done.done():
            return False
    return False


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


class Outcome:
    """A computation's outcome, set once, that threads and tasks (of any loop) wait for.

    Not ``concurrent.futures.Future``: every method of one takes a ``Condition`` whose
    ``__enter__`` is Python code, and a signal handler's exception raised there (Celery's
    soft time limit, in a thread starting to wait or ending a computation) leaves its lock
    held for good (CPython: a ``with`` statement, cpython#148874). Whoever touched that
    future next blocked: the computing thread in ``set_result`` with the store's lock held,
    and so the request, or every request of a shared tier. Here: C locks and atomic dict and
    set operations only, no lock of its own. Threads wait on a lock each, tasks on a future
    of their own loop each, in ``_waiting`` while they wait."""

    __slots__ = ("__weakref__", "_box", "_waiting")

    def __init__(self) -> None:
        self._box: dict[int, tuple[Any]] = {}
        # No lock: a set's add, discard and copy are atomic (a collection's finalizer may
        # end a computation, and so wake, in a thread in the middle of waiting).
        self._waiting: set[Callable[[], object]] = set()

    def done(self) -> bool:
        return bool(self._box)

    def result(self) -> Any:
        return self._box[0][0]

    def set_result(self, value: Any) -> None:
        """Set once (a later call changes nothing), then wake whoever waits. Interrupted
        between the two, the waiters see it at their next look, within a second."""
        mine = (value,)
        if self._box.setdefault(0, mine) is not mine:
            return
        for wake in list(self._waiting):
            wake()


class Waited:
    """A computation that somebody waits for: its owner, and the ``Outcome`` it will set."""

    __slots__ = ("future", "owner")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.future = Outcome()


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
    if type(record) is Waited:
        record.future.set_result(RESTART)


# What a waiter gets when it should look again (and compute the key itself if need be): the
# computing caller was interrupted, or ended without resolving the future.
RESTART: Any = object()


def result(future: Outcome, flights: dict[Hashable, Any], key: Hashable, record: Any) -> Any:
    """``future``'s result, looked at every second: RESTART once seen twice unresolved with
    its ``record`` gone from ``flights`` (a batch's fetch: ended), as a computation that
    ended in a ``RecursionError`` at the limit may have had no frame left to resolve it."""
    woken = threading.Lock()
    woken.acquire()  # released by set_result only, once
    waiting, wake = future._waiting, woken.release
    waiting.add(wake)  # then look: woken, or done already
    try:
        seen_gone = False
        while not (future.done() or woken.acquire(timeout=1.0) or future.done()):
            ended = flights.get(key) is not record or getattr(record, "ended", False)
            ended = ended or gone(record.owner)
            if ended and seen_gone:
                return RESTART
            seen_gone = ended
        return future.result()
    finally:
        waiting.discard(wake)


async def result_async(
    future: Outcome, flights: dict[Hashable, Any], key: Hashable, record: Waited
) -> Any:
    """``result`` for a task (of any loop), on a future of its own (each second's timeout
    cancels a shield of it). Not ``asyncio.wait``: cancelled in it, its frame (in the
    error's traceback) holds the future, and so the value."""
    mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting, wake = future._waiting, functools.partial(_wake, mine)
    waiting.add(wake)  # then look: woken, or done already
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
        waiting.discard(wake)
        # A cancellation's traceback holds this frame: no value left in it (a GC cycle).
        future = record = mine = waiting = wake = None  # type: ignore[assignment]


def _wake(mine: asyncio.Future[None]) -> None:
    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits there
        mine.get_loop().call_soon_threadsafe(_settle, mine)


def _settle(mine: asyncio.Future[None]) -> None:
    if not mine.done():
        mine.set_result(None)
