"""Run by tests/test_signals_in_waits.py: signals whose handlers raise, timed at random
microseconds, while the main thread waits for another thread's computation of a key, or
computes a key other threads wait for. Exit 1 as soon as a thread is stranded, or a caller
gets what it should not; 0 after the time budget.

usage: signal_waits.py SECONDS sync|batch|shared Exception|BaseException|Soft
(shared: a ``shared=`` memo, the other thread in a request of its own, so that a lock left
held would strand every request of the process.)
"""

from __future__ import annotations

import contextvars
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import cachetools
from billiard.exceptions import SoftTimeLimitExceeded

from perrequest import request_batch, request_memo, request_scope


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt."""


class Failure(Exception):
    """Any other signal handler's Exception."""


BUDGET, MODE = float(sys.argv[1]), sys.argv[2]
SIGNAL: type[BaseException] = {
    "Exception": Failure,
    "BaseException": Interrupt,
    "Soft": SoftTimeLimitExceeded,
}[sys.argv[3]]
MAIN = threading.main_thread().ident
# Where the signal may land, only C locks (an Event's Condition can be left held by one).
started, go, gate = threading.Event(), threading.Lock(), threading.Lock()


def _raise(signum: int, frame: object) -> None:
    raise SIGNAL()


def _computing() -> None:
    if threading.get_ident() != MAIN:  # the main thread waits for this one
        started.set()
        assert go.acquire(timeout=5)
        go.release()
    else:  # other threads come to wait for this one
        time.sleep(0.0005)


@request_memo
def plain(x: int) -> int:
    _computing()
    return x


@request_batch
def batch(keys: list[int]) -> list[int]:
    _computing()
    return list(keys)


@request_memo(shared=cachetools.LRUCache(maxsize=64))
def shared(x: int) -> int:
    _computing()
    return x


def call(x: int) -> Any:
    if MODE == "sync":
        return plain(x)
    if MODE == "batch":
        return batch.load(x)
    if MODE == "shared":
        if threading.get_ident() != MAIN:
            with request_scope():
                return shared(x)
        return shared(x)
    raise SystemExit(f"unknown mode {MODE}")


def stranded(thread: threading.Thread, what: str) -> None:
    thread.join(4)
    if thread.is_alive():
        print(f"{what}: stranded", flush=True)
        os._exit(1)


def main_waits(n: int, rng: random.Random) -> None:
    """The main thread waits for another thread's computation; the signal comes as it
    starts to wait, waits, or is woken."""
    started.clear()
    go.acquire()
    with request_scope():
        context = contextvars.copy_context()
        got: list[Any] = []
        other = threading.Thread(target=lambda: got.append(context.run(call, n)), daemon=True)
        other.start()
        assert started.wait(5)
        try:
            signal.setitimer(signal.ITIMER_REAL, rng.randint(1, 150) * 1e-6)
            try:
                assert call(n) == n
                time.sleep(0.0003)  # a late signal lands here, not outside the scope
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SIGNAL:
            pass
        go.release()
        stranded(other, f"round {n}: the computing thread")
        if got != [n]:
            print(f"round {n}: the computing thread got {got}", flush=True)
            os._exit(1)
        check = threading.Thread(target=context.run, args=(call, n), daemon=True)
        check.start()  # the key, and the store, still answer
        stranded(check, f"round {n}: a later call")


def main_computes(n: int, rng: random.Random) -> None:
    """The main thread computes a key two threads wait for; the signal comes as it runs,
    ends, stores and resolves the computation."""
    with request_scope():
        got: list[Any] = []

        def wait(context: contextvars.Context) -> None:
            assert gate.acquire(timeout=5)
            gate.release()
            time.sleep(0.0002)  # the main thread's computation is under way
            try:
                got.append(context.run(call, n))
            except SIGNAL:  # the computation's Exception, in the same request
                got.append("signal")

        gate.acquire()
        waiters = [
            threading.Thread(target=wait, args=(contextvars.copy_context(),), daemon=True)
            for _ in range(2)
        ]
        for waiter in waiters:
            waiter.start()
        try:
            signal.setitimer(signal.ITIMER_REAL, rng.randint(1, 1500) * 1e-6)
            try:
                gate.release()
                assert call(n) == n
                time.sleep(0.002)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SIGNAL:
            pass
        if gate.locked():  # the signal came before it was let go
            gate.release()
        for waiter in waiters:
            stranded(waiter, f"round {n}: a waiting thread")
        if any(value not in (n, "signal") for value in got):
            print(f"round {n}: the waiters got {got}", flush=True)
            os._exit(1)


if __name__ == "__main__":
    signal.signal(signal.SIGALRM, _raise)
    rng, start, n = random.Random(), time.monotonic(), 0
    while time.monotonic() - start < BUDGET:
        n += 1
        (main_waits if n % 2 else main_computes)(n, rng)
    print(f"no thread stranded in {n} rounds", flush=True)
