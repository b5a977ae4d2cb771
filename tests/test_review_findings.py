"""Findings of a review of the signal-by-traceback change (6aed794 and after, 6 December,
night): each test failed before its fix. The first ones passed before that change too: a
handler's shape was matched too loosely (any local holding the frame below and a small
int: ``traceback.print_stack(limit=5)``), taking real failures for signals. Soft time
limits are told by type now (``_signals.is_time_limit``): such failures are trivially
not one; the tests pin that they stay the code's."""

from __future__ import annotations

import sys
import traceback
from typing import Any

import cachetools
import pytest
from keys import Model

from perrequest import request_memo, request_scope


class _Broken:
    """A stream whose write fails (a closed log file, a full disk)."""

    def write(self, text: str) -> int:
        raise OSError("the log is gone")


class _Colliding:
    """A key whose ``__eq__`` logs the stack before comparing, to a log that fails:
    ``traceback.print_stack(limit=5)`` holds its caller's frame (``f``) and an int in
    the signal numbers' range (``limit``) — the shape the traceback test took for a
    signal handler's frame (no soft time limit by type)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return 1  # every key collides

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        traceback.print_stack(limit=5, file=_Broken())  # type: ignore[arg-type]
        return False


def test_a_real_failure_in_a_shared_keys_eq_is_a_miss_not_a_signal() -> None:
    """A colliding key's ``__eq__`` raising in the shared cache's lookup is a miss
    (``_Guarded._lookup``). Its traceback passes through a frame holding its caller's
    frame and a small int (``traceback.print_stack(limit=5)``), which the traceback test
    took for a signal handler's: the OSError reached the caller of the memo function
    (in the main thread, where Celery's and gunicorn's sync workers run requests)."""

    @request_memo(shared=cachetools.LRUCache(100))
    def load(key: _Colliding) -> int:
        return key.n

    with request_scope():
        assert load(_Colliding(1)) == 1
    with request_scope():
        assert load(_Colliding(2)) == 2  # OSError: the log is gone


def _explain(frame: Any, depth: int = 2) -> None:
    """A helper handed its caller's frame and a small int (a depth, a stacklevel)."""
    raise TypeError(f"unhashable now (in {frame.f_code.co_name}, depth {depth})")


class _Row:
    """A key whose hash raises once saved (through ``_explain``)."""

    def __init__(self) -> None:
        self.saved = False

    def __hash__(self) -> int:
        if self.saved:
            _explain(sys._getframe())
        return 7

    def __eq__(self, other: object) -> bool:
        return self is other


@pytest.mark.parametrize("first", [True, False], ids=["first_miss", "generated_miss"])
def test_a_failed_computation_whose_key_hash_raises_unregisters(first: bool) -> None:
    """A computation that makes its key's hash raise, then fails: ``_flight.failed``'s
    pop raises the key's TypeError, taken for a signal handler's (its traceback has
    ``_explain``'s frame: the caller's frame and an int), so it is raised instead of
    taking the record by identity: the record stays registered in ``_flights`` for the
    rest of the request, and the caller gets the key's TypeError instead of the
    function's own RuntimeError."""

    @request_memo
    def save(row: _Row, n: int) -> None:
        row.saved = True
        raise RuntimeError("the save failed")

    with request_scope() as store:
        if not first:
            with pytest.raises(RuntimeError):
                save(_Row(), 0)  # the function's first miss: the generated path after
        with pytest.raises(RuntimeError, match="the save failed"):
            save(_Row(), 1)
        assert list(store._flights.values()) == []


def test_an_eviction_does_not_raise_another_calls_key_error_in_an_unrelated_call() -> None:
    """An eviction whose key's hash raises now (its object changed since it was stored)
    takes the entry by identity (``Entries._take``). The TypeError's traceback passes
    through ``_explain``'s frame (its caller's frame and a small int), taken for a signal
    handler's: the evicted key's TypeError was raised to ``f(2)``, a call of another key."""

    @request_memo
    def f(x: object) -> str:
        return repr(x)[:10]

    with request_scope(max_entries=2):
        f(0)
        row = _Row()
        f(row)
        row.saved = True
        assert f(1) == "1"
        assert f(2) == "2"  # TypeError: unhashable now (in __hash__, depth 2)


class _Model:
    """A model keyed by its primary key; its hash raises once saved (through ``_explain``)."""

    def __init__(self, pk: int) -> None:
        self.pk, self.saved = pk, False

    def __hash__(self) -> int:
        if self.saved:
            _explain(sys._getframe())
        return hash(self.pk)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Model) and other.pk == self.pk


def test_a_waiter_of_a_failed_computation_whose_key_hash_raises_does_not_hang() -> None:
    """The main thread computes ``save(_Model(1))``; another thread of the request waits
    for it (an equal key); the computation makes its argument's hash raise, then fails.
    ``_flight.failed`` takes the hash's TypeError for a signal handler's (``_explain``'s
    frame) and raises it instead of taking the record by identity: the ``Waited`` record
    stays in ``_flights``, findable by the waiter's own (equal, hashable) key, and the
    waiter waits for ever, past the end of the scope. Before: it got the RuntimeError."""
    import threading
    import time

    from perrequest import bind_scope
    from perrequest._waits import RESTART, Waited

    go = threading.Event()

    @request_memo
    def save(row: _Model) -> None:
        if row.pk == 1 and not go.is_set():
            go.wait(5)
            row.saved = True
        raise RuntimeError("the save failed")

    got: dict[str, str] = {}

    def call(name: str, row: _Model) -> None:
        try:
            save(row)
        except Exception as exc:
            got[name] = f"{type(exc).__name__}: {exc}"

    def later() -> None:
        time.sleep(0.2)
        call("waiter", _Model(1))

    with request_scope() as store:
        call("warm", _Model(0))  # the generated miss from here on
        waiter = threading.Thread(target=bind_scope(later), daemon=True)
        waiter.start()
        threading.Timer(0.6, go.set).start()
        call("main", _Model(1))  # the main thread computes (where Celery runs its tasks)
        waiter.join(4)
        hung = waiter.is_alive()
        left = list(store._flights.values())
        with store._lock:  # let the thread go
            store._flights.clear()
        for record in left:
            if type(record) is Waited and not record.future.done():
                record.future.set_result(RESTART)
        waiter.join(5)
    assert not hung, "the waiting thread still waits for a computation that has ended"
    assert left == []
    assert got.get("main") == "RuntimeError: the save failed"


def test_a_class_made_in_a_request_is_not_handed_to_another_requests_waiter() -> None:
    """A shared computation's error is copied for waiters in other requests, with no
    value that refers to its own request (``_Copy.value``). 4ef63bf passes a class among
    an error's values through as-is when its ``__qualname__`` has no ``<locals>``, taking
    it for a module-level class; but a class made at run time by ``type()`` (or a
    factory: ``namedtuple``, an ORM's dynamic model) has no ``<locals>`` in its name and
    may hold the request's data: the waiter's copy carried the request's own class, and
    with it the request's payload. Before: a ``SharedComputationError``."""
    from perrequest._shared_errors import Call, Raised

    class Payload:
        pass

    payload = Payload()
    row = type("Row", (), {"payload": payload})  # made per request
    assert "<locals>" not in row.__qualname__
    raised = Raised(Call(), ValueError("no such row", row))
    copy = raised.error_for(Call())  # what a waiter in another request gets
    assert all(
        getattr(value, "payload", None) is not payload for value in getattr(copy, "args", ())
    ), "the waiter's copy holds the computing request's data"


def test_a_signal_as_an_eviction_tells_its_keys_error_leaves_the_store_bounded() -> None:
    """``Entries._take``: an eviction whose key's hash raises (a deleted model) checks the
    error with ``is_time_limit`` (was ``raised_by_a_signal_handler``, about 90 us:
    a wide window; a type check now). A soft time limit arriving there leaves
    ``_take`` before ``_refile``: the entry stays in its function's dict with its place
    in the recency order already popped (``_drop``), so no eviction ever reaches it; the
    store holds more than ``max_entries`` for the rest of the request (``len(store)``
    counts the order: 2, ``store.values()`` gives 3). The same was possible before, at
    the old check (``all(...)`` over the dict, a generator: a shorter window)."""
    from signals import RaiseAtCall, Signalled, interrupted_by

    import perrequest

    at = RaiseAtCall(Signalled, "is_time_limit", "_take")
    deleted = Model(1)
    with request_scope(max_entries=2) as store:
        perrequest.set(deleted, "a")
        perrequest.set(2, 2)
        deleted.pk = None
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            perrequest.set(3, 3)  # evicts the deleted model's entry
        for n in range(4, 10):
            perrequest.set(n, n)
        values = list(store.values())
        assert len(values) <= 2, f"{len(values)} values kept, len(store) says {len(store)}"


def test_a_signal_in_another_keys_hash_as_an_eviction_refiles_reaches_the_caller() -> None:
    """``Entries._refile`` (an eviction whose key's hash raises: the function's dict is
    rebuilt, each other key looked up by its hash now through ``Probe``) catches
    ``Exception`` without telling a signal handler's: a soft time limit arriving in
    another key's ``__hash__`` there is dropped (that entry evicted as if its key were
    broken), and the task runs on past its limit. It goes on now, once the rebuild is
    done (the entry evicted all the same)."""
    from signals import RaiseAtCall, Signalled, interrupted_by

    import perrequest

    at = RaiseAtCall(Signalled, "__hash__", "__init__")  # Probe(filed): hash(filed)
    deleted = Model(1)
    with request_scope(max_entries=2) as store:
        perrequest.set(deleted, "a")
        perrequest.set(Model(2), 2)
        deleted.pk = None
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            perrequest.set(3, 3)  # evicts the deleted model's entry: _refile
        perrequest.set(4, 4)
        assert len(list(store.values())) <= 2 and perrequest.get(4) == 4
