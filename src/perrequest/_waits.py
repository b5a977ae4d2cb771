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
from collections.abc import Hashable
from concurrent.futures import Future
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


class Waited:
    """A computation that somebody waits for: threads on ``future``; tasks on a future of
    their own loop each, in ``tasks`` while they wait, woken by ``future``'s one callback
    (``wrap_future`` per task: a callback per task that gave up, while it hangs), which
    reads its result for them into ``outcome`` (see ``_hand``)."""

    __slots__ = ("future", "outcome", "owner", "tasks")

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.future: Future[Any] = Future()
        self.future.set_running_or_notify_cancel()  # a waiter's cancel() cannot cancel it
        # No lock: a set's add, discard and copy are atomic (a collection's finalizer may
        # end a computation, and so wake, in a thread in the middle of waiting). The set,
        # not the record, in the callback: no cycle to keep the value until a collection.
        self.tasks: set[asyncio.Future[None]] = set()
        self.outcome: list[Any] = []
        self.future.add_done_callback(functools.partial(_wake, self.tasks, self.outcome))


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


# What a waiter gets when it should look again (and compute the key itself if need be): the
# computing caller was interrupted, or ended without resolving the future.
RESTART: Any = object()


def result(future: Future[Any], flights: dict[Hashable, Any], key: Hashable, record: Any) -> Any:
    """``future``'s result, looked at every second: RESTART once seen twice unresolved with
    its ``record`` gone from ``flights`` (a batch's fetch: ended), as a computation that
    ended in a ``RecursionError`` at the limit may have had no frame left to resolve it.
    Waits on a lock of its own for ``_hand``, never on ``future``'s (``_hand`` says why)."""
    woken = threading.Lock()
    woken.acquire()
    outcome: list[Any] = []
    future.add_done_callback(functools.partial(_hand, woken, outcome))  # at once if done
    seen_gone = False
    while not woken.acquire(timeout=1.0):
        ended = flights.get(key) is not record or getattr(record, "ended", False)
        ended = ended or gone(record.owner)
        if ended and seen_gone:
            return RESTART
        seen_gone = ended
    return outcome[0] if outcome else RESTART  # (a signal in ``_hand``: look again)


def _hand(woken: threading.Lock, outcome: list[Any], done: Future[Any]) -> None:
    """Hand a waiting thread ``done``'s result, read here, in the thread that set it. A signal
    handler's exception (Celery's soft time limit) can leave a ``Future``'s lock released
    under ``Condition.wait``, which then fails "cannot release un-acquired lock", or held
    for good by ``set_result``'s thread (CPython: a ``with`` whose ``__enter__`` is Python
    code, cpython#148874), which is this one, where taking it again does not block."""
    try:
        outcome.append(done.result())
    finally:
        woken.release()


async def result_async(flights: dict[Hashable, Any], key: Hashable, record: Waited) -> Any:
    """``result`` for a task (of any loop), on a future of its own (each second's timeout
    cancels a shield of it), and ``record.outcome`` (``_hand`` says why). Not
    ``asyncio.wait``: cancelled in it, its frame (in the error's traceback) holds the
    future, and so the value."""
    mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    tasks, outcome = record.tasks, record.outcome
    tasks.add(mine)  # then look: woken, or done already
    try:
        seen_gone = False
        while not outcome:
            try:
                async with asyncio.timeout(1.0):
                    await asyncio.shield(mine)
            except TimeoutError:
                pass
            if outcome:
                break
            ended = flights.get(key) is not record or gone(record.owner)
            if ended and seen_gone:
                return RESTART
            seen_gone = ended
        return outcome[0]
    finally:
        tasks.discard(mine)
        # A cancellation's traceback holds this frame: no value left in it (a GC cycle).
        record = mine = tasks = outcome = None  # type: ignore[assignment]


def _wake(tasks: set[asyncio.Future[None]], outcome: list[Any], done: Future[Any]) -> None:
    """The computation ended: its result into ``outcome`` (``_hand`` says why here), then
    wake the tasks waiting for it, each on its loop."""
    outcome.append(done.result())
    for mine in list(tasks):
        with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits there
            mine.get_loop().call_soon_threadsafe(_settle, mine)


def _settle(mine: asyncio.Future[None]) -> None:
    if not mine.done():
        mine.set_result(None)
