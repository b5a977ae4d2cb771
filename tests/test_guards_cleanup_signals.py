"""A signal whose handler raises (Ctrl-C; Celery's soft time limit) as the cleanup of a
failed computation, or of a sync batch fetch, begins: before it unregisters the key. The
key stayed registered to a thread that had moved on, and a thread waiting for it blocked
for good (a task, until the computing task ended). Each cleanup is run once more when it
is interrupted, before the signal goes on, and the waiters get the computation's outcome;
these tests fail without that."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from keys import Model
from rq.timeouts import JobTimeoutException
from signals import Interrupt, RaiseAfter, RaiseAtCall, Signalled, interrupted_by

import perrequest
from perrequest import MemoStore, bind_scope, request_batch, request_memo, request_scope
from perrequest._waits import restart
from perrequest.testing import live_scopes

WAIT = 5.0  # seconds: the fix answers the waiter at once; without it, it never answers


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the second caller never came to wait"
        time.sleep(0.005)


def _someone_waits(store: MemoStore) -> bool:
    return any(getattr(r, "future", None) is not None for r in list(store._flights.values()))


def _release(store: MemoStore) -> None:
    """Unblock a stranded waiter (the bug): the test fails, the run goes on."""
    with store._lock:
        for where, record in list(store._flights.items()):
            del store._flights[where]
            restart(record)
            future = getattr(record, "future", None)
            if future is not None and not future.done():
                future.set_result({})


class _Waiter(threading.Thread):
    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call, self.outcome = bind_scope(call), None

    def run(self) -> None:
        try:
            self.outcome = ("value", self.call())
        except Exception as exc:
            self.outcome = ("error", exc)

    def outcome_in(self, store: MemoStore) -> Any:
        """What it got, failing the test if it waits still (unblocked first)."""
        self.join(WAIT)
        stranded = self.is_alive()
        if stranded:
            _release(store)
            self.join(WAIT)
        assert not stranded, "the waiting thread was stranded"
        return self.outcome


def _thread_waits_for_a_failure(signal: type[BaseException], call_in: str) -> None:
    at = RaiseAtCall(signal, "failed")  # as failed begins: before its pop
    main = threading.current_thread()
    waiter: list[_Waiter] = []

    def compute(x: int) -> int:
        if x == 0:
            return 0
        assert threading.current_thread() is main, "the waiter computes: it got no outcome"
        waiter.append(_Waiter(lambda: call(x)))
        waiter[0].start()
        _until(lambda: _someone_waits(store))
        at.armed = True
        sys.setprofile(at)
        raise ValueError("the computation fails")

    memo = request_memo(compute)

    def call(x: int) -> int:
        if call_in == "memo":
            return memo(x)
        return perrequest.get_or_set(("key", x), lambda: compute(x))  # type: ignore[no-any-return]

    with request_scope() as store:
        call(0)  # past the function's first miss, which takes the slow path
        with interrupted_by(signal, at):
            call(1)
        kind, error = waiter[0].outcome_in(store)
        assert kind == "error" and str(error) == "the computation fails"  # its outcome
        assert not store._flights


@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_as_a_failed_memo_cleans_up_strands_no_waiting_thread(
    signal: type[BaseException],
) -> None:
    """The generated miss of ``@request_memo`` (``_wrappers``)."""
    _thread_waits_for_a_failure(signal, "memo")


@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_as_a_failed_get_or_set_cleans_up_strands_no_waiting_thread(
    signal: type[BaseException],
) -> None:
    """``_flight.run`` (``get_or_set``, shared tiers, ``*args`` wrappers' slow path)."""
    _thread_waits_for_a_failure(signal, "get_or_set")


@pytest.mark.parametrize("path", ["generated", "run_async"])
@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_as_a_failed_async_memo_cleans_up_strands_no_waiting_task(
    signal: type[BaseException], path: str
) -> None:
    """The generated async miss, and ``_flight.run_async`` (a function's first miss in a
    store): the computing task lives on, so its waiters waited for it (they look again
    when it ends)."""
    at = RaiseAtCall(signal, "failed")
    tasks: list[asyncio.Task[Any]] = []

    @request_memo
    async def compute(x: int) -> int:
        if x == 0:
            return 0
        assert asyncio.current_task() is first, "the waiter computes: it got no outcome"
        tasks.append(asyncio.create_task(compute(x)))
        while not _someone_waits(store):
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)  # the waiter in its wait
        at.armed = True
        sys.setprofile(at)
        raise ValueError("the computation fails")

    async def main() -> None:
        nonlocal first, store
        first = asyncio.current_task()
        async with request_scope() as store:
            if path == "generated":
                await compute(0)  # past the function's first miss, which takes run_async
            with interrupted_by(signal, at):
                await compute(1)
            try:  # this task lives on: without the fix the waiter waits for it
                got = await asyncio.wait_for(asyncio.shield(tasks[0]), WAIT)
            except ValueError as exc:
                got = exc
            except TimeoutError:
                _release(store)
                await tasks[0]
                pytest.fail("the waiting task was stranded while the computing one lived")
            assert isinstance(got, ValueError) and str(got) == "the computation fails"
            assert not store._flights

    first: Any = None
    store: Any = None
    asyncio.run(main())


@pytest.mark.parametrize("signal", [Interrupt, Signalled])
@pytest.mark.parametrize("point", ["as-it-begins", "as-it-answers"])
def test_a_signal_as_a_sync_batch_fetch_ends_strands_no_waiting_thread(
    signal: type[BaseException], point: str
) -> None:
    """``_batching._end``: the fetch never marked ended, its key left registered (a
    signal as the end began: the waiter blocked for good); and, the fetch marked ended
    before its waiters were answered, a signal as that answer began skipped the second
    end: the waiting thread had no answer until its second one-second look (then it
    asked again)."""
    at: Any = (
        RaiseAfter(signal, "len", "_end")  # _end's first C call: before anything
        if point == "as-it-begins"
        else RaiseAtCall(signal, "set_result", "_end")
    )
    main = threading.current_thread()
    waiter: list[_Waiter] = []
    calls: list[list[int]] = []

    @request_batch
    def rows(keys: list[int]) -> list[int]:
        calls.append(keys)
        if threading.current_thread() is main:
            waiter[0].start()
            _until(lambda: _someone_waits(store))
            at.armed = True
            sys.setprofile(at)
        return [k * 10 for k in keys]

    with request_scope() as store:
        # Bound here: bound inside the batch function, it would fetch the key itself.
        waiter.append(_Waiter(lambda: rows.load(2)))
        with interrupted_by(signal, at):
            rows.load(2)
        waiter[0].join(1.5)  # answered at once; its looks come a second apart
        at_once = not waiter[0].is_alive()
        assert waiter[0].outcome_in(store) == ("value", 20)
        assert at_once, "the waiter had no answer until its second look"
        assert calls == [[2]]
        assert not store._flights
        assert rows.load(2) == 20


@pytest.mark.parametrize("call_in", ["memo", "get_or_set"])
def test_a_signal_handlers_exception_as_a_miss_registers_leaves_no_record(call_in: str) -> None:
    """``_flight.interrupted``: an ``Exception`` out of the registering ``setdefault`` was
    taken for the key's own (its ``__hash__``), which registers nothing; one a signal
    handler raised as ``setdefault`` returned left the key registered to a call that was
    gone, and the next thread to miss it waited for good."""
    at = RaiseAfter(Signalled, "setdefault", "compute" if call_in == "memo" else "run")

    @request_memo
    def compute(x: int) -> int:
        return x * 10

    def call(x: int) -> int:
        if call_in == "memo":
            return compute(x)
        return perrequest.get_or_set(("key", x), lambda: x * 10)  # type: ignore[no-any-return]

    with request_scope() as store:
        call(0)  # past the function's first miss, which takes the slow path
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            call(1)
        assert not store._flights, "the key stayed registered"
        other = _Waiter(lambda: call(1))
        other.start()
        assert other.outcome_in(store) == ("value", 10), "the next thread to miss it"


@pytest.mark.parametrize("signal", [Interrupt, Signalled])
def test_a_signal_as_a_caller_takes_over_a_failed_key_leaves_no_record(
    signal: type[BaseException],
) -> None:
    """``_flight.run``: a caller whose registering ``setdefault`` found another's record,
    which then failed and went, takes the key over in ``_next_step``. A signal handler's
    ``Exception`` as that step returned left the key registered to this call (it was taken
    for the computation's error, handed to a waiter), and the next thread to miss the key
    waited for good."""
    other_registered, other_failed = threading.Event(), threading.Event()
    step = {"at": 0}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "c_return" or getattr(arg, "__name__", "") not in ("setdefault", "__exit__"):
            return
        if step["at"] == 0 and frame.f_code.co_name == "run":
            step["at"] = 1  # found the other's record: it fails now
            other_failed.wait(WAIT)
        elif step["at"] == 1 and frame.f_code.co_name == "_next_step":
            step["at"] = 2
            raise signal  # as the step that took the key over lets its lock go

    def compute(x: int) -> int:
        if threading.current_thread().name == "other":
            other_registered.set()
            _until(lambda: step["at"] == 1)
            raise ValueError("the other's computation fails")
        return x * 10

    def other() -> None:
        with contextlib.suppress(ValueError):
            perrequest.get_or_set("k", lambda: compute(1))
        other_failed.set()

    with request_scope() as store:
        threading.Thread(target=bind_scope(other), name="other", daemon=True).start()
        assert other_registered.wait(WAIT)
        sys.setprofile(profile)
        with interrupted_by(signal):
            perrequest.get_or_set("k", lambda: compute(1))
        assert step["at"] == 2, "the signal never came: the test tests nothing"
        assert not store._flights, "the key stayed registered"
        after = _Waiter(lambda: perrequest.get_or_set("k", lambda: compute(1)))
        after.start()
        assert after.outcome_in(store) == ("value", 10), "the next thread to miss it"


def test_a_signal_as_a_batchs_values_are_gathered_reaches_the_caller() -> None:
    """``_batch_outcomes.put_all``: gathering a batch's values is in a ``try`` for keys
    whose hash raises now; an ``Exception`` a signal handler raised as that ``update``
    returned was taken for such a key and dropped."""
    at = RaiseAfter(Signalled, "update", "put_all")

    @request_batch
    def rows(keys: list[int]) -> list[int]:
        return [k * 10 for k in keys]

    with request_scope():
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            rows.load_many([1, 2])
        assert rows.load_many([1, 2]) == [10, 20]


def test_a_signal_in_a_keys_own_hash_as_a_batchs_values_are_gathered_reaches_the_caller() -> None:
    """``_batch_outcomes.put_all``: an ``Exception`` a signal handler raised inside a key's
    own ``__hash__`` as the values are gathered (told by type) goes on, not taken
    for a key whose hash raises (its value kept by identity, the signal dropped)."""
    at = RaiseAtCall(Signalled, "__hash__", "put_all")

    @request_batch
    def rows(keys: list[Model]) -> list[int]:
        return [k.pk * 10 for k in keys]  # type: ignore[operator]

    with request_scope():
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            rows.load_many([Model(1), Model(2)])
        assert rows.load_many([Model(1), Model(2)]) == [10, 20]


def _hash_by_pk(self: Model) -> int:  # Model's __hash__ by a name of its own (RaiseAtCall)
    if self.pk is None:
        raise TypeError("Model instances without primary key value are unhashable")
    return hash(self.pk)


class Named(Model):
    """A model whose ``__hash__`` a profile function tells from the other keys'."""

    __hash__ = _hash_by_pk


def test_a_signal_in_a_keys_own_hash_after_another_keys_hash_raised_reaches_the_caller() -> None:
    """``_batch_outcomes.put_all``: once a key's hash raised in the ``update`` (a model its
    batch function saved as a copy), each key is put by itself, a failure there taken for
    that key's; a signal handler's ``Exception`` inside the next key's own ``__hash__``
    (told by type) was taken so and dropped. It goes on."""
    at = RaiseAtCall(Signalled, "_hash_by_pk", "put_all")  # Named's, the second key's

    @request_batch
    def rows(keys: list[Model]) -> list[int]:
        values = [k.pk * 10 for k in keys]  # type: ignore[operator]
        keys[0].pk = None  # saved as a copy: its hash raises from now on
        return values

    with request_scope():
        at.armed = True
        sys.setprofile(at)
        with interrupted_by(Signalled, at):
            rows.load_many([Model(1), Named(2)])
        assert rows.load_many([Model(3), Named(2)]) == [30, 20]


def test_a_signal_while_on_close_runs_reaches_the_task(caplog: pytest.LogCaptureFixture) -> None:
    """A real signal whose handler raises an ``Exception``, as Celery's soft time limit does
    (``SoftTimeLimitExceeded`` from a SIGUSR1 handler), landing while a scope's ``on_close``
    pushes its stats somewhere slow, was logged as on_close raising: the task never saw its
    soft limit and ran on until the hard one killed it (a real celery worker, 6 December).
    It goes on now, once the listeners after on_close have run; on_close's own failures
    are still logged, never raised."""
    import logging
    import os
    import signal

    def soft_time_limit(signum: int, frame: Any) -> None:
        raise Signalled("soft time limit")

    def report(stats: Any) -> None:  # a slow push of the stats: the signal lands here
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(1000):
            time.sleep(0.001)
        raise AssertionError("the handler never ran")

    ran: list[str] = []
    perrequest.add_scope_listener(ran.append)
    previous = signal.signal(signal.SIGUSR1, soft_time_limit)
    try:
        with caplog.at_level(logging.ERROR, logger="perrequest"):
            with pytest.raises(Signalled, match="soft time limit"), request_scope(on_close=report):
                pass
            assert len(ran) == 1 and not caplog.records  # the listener ran; nothing logged
            with request_scope(on_close=lambda stats: 1 / 0):  # its own failure: logged
                pass
            assert [r.getMessage() for r in caplog.records] == [
                f"perrequest: the scope's on_close {caplog.records[0].args[1]!r} raised"
            ]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        perrequest.remove_scope_listener(ran.append)


def test_another_signal_handlers_exception_in_a_listener_is_logged_as_its_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """_signals.is_time_limit: told by type, Celery's ``SoftTimeLimitExceeded`` (here
    ``Signalled``). Any other signal handler's ``Exception`` landing in a listener is taken
    for the listener's failure, as Python's ``logging`` and ``atexit`` take it: logged, not
    raised; the soft time limit, raised by the very same handler, still goes on."""
    import logging
    import signal

    raised: list[type[Exception]] = []

    def on_usr1(signum: int, frame: Any) -> None:
        raise raised.pop()("signalled")

    def report(stats: Any) -> None:  # the handler lands in on_close
        signal.raise_signal(signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        with caplog.at_level(logging.ERROR, logger="perrequest"):
            raised.append(RuntimeError)
            with request_scope(on_close=report):  # logged, not raised
                pass
            assert not raised and len(caplog.records) == 1
            assert "on_close" in caplog.records[0].getMessage()
            raised.append(Signalled)
            with pytest.raises(Signalled), request_scope(on_close=report):
                pass
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_time_limit_is_told_by_type_without_importing_its_runner() -> None:
    """_signals.is_time_limit: Celery's ``SoftTimeLimitExceeded`` (billiard's class) and
    RQ's ``JobTimeoutException``, looked up in ``sys.modules``, never imported (the core
    imports no framework: a runner never imported raises no time limit); any other
    ``Exception`` is not one, RQ's monitor's timeout (raised in the parent) included."""
    import subprocess
    from pathlib import Path

    code = (
        "import sys\n"
        "from perrequest._signals import is_time_limit as told\n"
        "assert not told(Exception()) and not told(TimeoutError())\n"
        "assert 'billiard' not in sys.modules\n"
        "from celery.exceptions import SoftTimeLimitExceeded\n"
        "assert told(SoftTimeLimitExceeded()) and not told(Exception())\n"
        "assert 'rq' not in sys.modules\n"
        "from rq.timeouts import HorseMonitorTimeoutException, JobTimeoutException\n"
        "assert told(JobTimeoutException()) and not told(HorseMonitorTimeoutException())\n"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(src), "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_an_rq_job_timeout_while_on_close_runs_reaches_the_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """_signals.is_time_limit: RQ's job timeout (its SIGALRM handler raises
    ``JobTimeoutException``, an ``Exception``) landing in an ``on_close`` is the job's, not
    the callback's failure: it goes on, as Celery's soft time limit does, and the scope is
    closed all the same."""
    import logging
    import signal

    from rq.timeouts import UnixSignalDeathPenalty

    def report(stats: Any) -> None:  # the job's timeout lands here
        signal.raise_signal(signal.SIGALRM)

    with (
        UnixSignalDeathPenalty(60, JobTimeoutException, job_id="j"),
        caplog.at_level(logging.ERROR, logger="perrequest"),
        pytest.raises(JobTimeoutException),
        request_scope(on_close=report) as store,
    ):
        pass
    assert store.closed and not caplog.records
    assert live_scopes() == 0
