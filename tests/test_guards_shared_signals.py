"""The shared tier under signals whose handlers raise (Ctrl-C; Celery's soft time limit, an
``Exception``), where CPython runs them: a caller in another request waits for the same
key. Found by a sweep raising at every such point (6 December, evening); each test fails
without its fix."""

from __future__ import annotations

import sys
import threading
from typing import Any

import cachetools
import pytest
from signals import RaiseAfter, RaiseAtCall, Signalled, interrupted_by

from perrequest import _shared, request_memo, request_scope
from perrequest._waits import Waited

WAIT = 5.0


def _other_request_waits(compute: Any, x: int) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def other() -> None:
        try:
            with request_scope():
                out["got"] = ("value", compute(x))
        except BaseException as exc:  # what the other request got
            out["got"] = ("error", exc)

    return threading.Thread(target=other, daemon=True), out


@pytest.mark.parametrize(
    ("at", "fails"),
    [
        (RaiseAtCall(Signalled, "finish", "run"), False),  # the tier's single-flight stores
        (RaiseAtCall(Signalled, "__init__", "computed"), True),  # Raised: the error's copy
        # Inside the copy: it was taken for an error that cannot be copied (the caller got
        # its function's error, not the signal; the waiter a SharedComputationError).
        (RaiseAfter(Signalled, "vars", "error", "_safe_copy"), True),
    ],
    ids=["as-the-value-is-stored", "as-the-error-is-copied", "inside-the-copy"],
)
def test_a_signal_in_the_computing_request_never_reaches_the_waiting_one(
    at: Any, fails: bool
) -> None:
    """A signal handler's ``Exception`` in the computing request went through the tier's
    single-flight to the waiter in another request as the very object (its traceback
    holding the computing request's frames). It is the computing request's alone: the
    waiter computes the key itself (and gets its own value, or its own error)."""
    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(100)
    main = threading.current_thread()

    @request_memo(shared=cache)
    def compute(x: int) -> int:
        if threading.current_thread() is main:
            other.start()
            flights = _shared._guarded[id(cache)]._flights
            for _ in range(1000):
                if any(type(r) is Waited for r in list(flights.values())):
                    break
                threading.Event().wait(0.005)
            at.armed = True
            sys.setprofile(at)
        if fails:
            raise ValueError(f"{threading.current_thread().name} fails")
        return x * 10

    other, out = _other_request_waits(compute, 1)
    with request_scope(), interrupted_by(Signalled):
        compute(1)
    assert not at.armed, "the signal never came: the test tests nothing"
    other.join(WAIT)
    assert not other.is_alive()
    kind, got = out["got"]
    if fails:
        assert kind == "error" and type(got) is ValueError, got
        assert str(got) == f"{other.name} fails"  # its own, computed in its request
    else:
        assert (kind, got) == ("value", 10)


@pytest.mark.parametrize("method", ["__getitem__", "__setitem__"])
def test_a_signal_in_the_shared_caches_own_code_reaches_the_caller(method: str) -> None:
    """``_shared._Guarded._lookup`` and ``_fill`` take what the shared cache raises for a
    miss or a refusal (a colliding key's ``__eq__``; a ``getsizeof`` that raises): a signal
    handler's ``Exception`` inside cachetools' code was taken so and dropped (a refusal also
    logged an error, once per function, and hid the cache's real faults after it)."""
    at = RaiseAtCall(Signalled, method, "_lookup" if method == "__getitem__" else "_fill")
    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(100)

    @request_memo(shared=cache)
    def compute(x: int) -> int:
        return x * 10

    with request_scope():
        compute(0)  # past the first miss
    with request_scope():
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            compute(1)
    with request_scope():
        assert compute(1) == 10
    assert compute.shared_info().currsize in (1, 2)
