"""A Celery app for tests/test_attack_workers.py, run by real ``celery worker`` processes
(prefork, solo, threads) against a real redis-server (broker and result backend).

The broker URL comes from ``ATTACK_REDIS_URL``. Each task reports what it saw as its
result: the state left by the task before it on the same process and thread (read by a
``task_prerun`` receiver connected before ``install``'s, so it runs before perrequest
opens the task's scope), its own store, and what its memos computed.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import threading
import time
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery
from celery.signals import task_postrun, task_prerun

import perrequest
from perrequest import MemoStore, bind_scope, current_store, in_request_scope, request_memo
from perrequest.celery import ScopedTask, install
from perrequest.testing import live_scopes

URL = os.environ.get("ATTACK_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("workers_attack_apps", broker=URL, backend=URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_acks_late=False,
    result_expires=600,
)

# Per thread: what was active when the task started, before install() opened its scope.
_seen = threading.local()


@task_prerun.connect(weak=False)
def _before_perrequest(sender: Any = None, **_: Any) -> None:
    # Connected before install(): Celery calls receivers in the order they connected.
    _seen.before = (in_request_scope(), live_scopes())
    _seen.tracing = getattr(sender, "name", "").endswith(".interrupted_late")


install(app, max_entries=10_000)


@task_postrun.connect(weak=False)
def _after_perrequest(**_: Any) -> None:
    # Connected after install(): perrequest's postrun has run (or was cut short) by now.
    _seen.tracing = False


def _soft_limit(signum: int, frame: Any) -> None:
    """What billiard's soft time limit does in the child (SIGUSR1 there), but only while
    the tracer runs interrupted_late: anywhere from prerun to perrequest's postrun."""
    if getattr(_seen, "tracing", False):
        raise SoftTimeLimitExceeded()


@app.task
def interrupted_late(seconds: float) -> str:
    """Arms a soft-limit-like interrupt that strikes ``seconds`` later: in the body, as the
    result is stored, or as the task_postrun receivers run."""
    signal.signal(signal.SIGALRM, _soft_limit)
    perrequest.set("tag", "interrupted")
    lookup(f"interrupted-{random.random()}")
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return "done"


_lock = threading.Lock()
computed: dict[str, int] = {}


@request_memo
def lookup(key: str) -> list[object]:
    """Its value names the task that computed it."""
    with _lock:
        computed[key] = computed.get(key, 0) + 1
    return [perrequest.get("tag"), key, os.getpid()]


def _report(tag: str) -> dict[str, Any]:
    before = getattr(_seen, "before", None)
    _seen.before = None
    leftover_tag = perrequest.get("tag")
    perrequest.set("tag", tag)
    values = [lookup(key) for key in ("a", "b", "a", "b")]
    return {
        "tag": tag,
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "before": before,  # (in a scope, live scopes) as the task started
        "leftover_tag": leftover_tag,  # must be None: a fresh store
        "foreign": sum(1 for owner, *_ in values if owner != tag),
        "entries": len(current_store()),
        "live_in_task": live_scopes(),
    }


@app.task
def probe(tag: str) -> dict[str, Any]:
    return _report(tag)


@app.task(base=ScopedTask)
def scoped_probe(tag: str) -> dict[str, Any]:
    return _report(tag)


@app.task(bind=True, max_retries=3)
def retrying(self: Any, tag: str) -> dict[str, Any]:
    report = _report(f"{tag}-{self.request.retries}")
    if self.request.retries < 2:
        raise self.retry(countdown=0)
    return report


@app.task(bind=True, autoretry_for=(ValueError,), max_retries=3, default_retry_delay=0)
def autoretrying(self: Any, tag: str) -> dict[str, Any]:
    report = _report(f"{tag}-{self.request.retries}")
    if self.request.retries < 2:
        raise ValueError("again")
    return report


@app.task
def leaky(tag: str, size: int) -> int:
    """Memoizes a big value under a key no other task uses; returns the process's RSS."""
    big_lookup(tag, size)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@request_memo
def big_lookup(tag: str, size: int) -> bytes:
    return os.urandom(size)


@request_memo(key=lambda key, seconds: key)  # how long it takes is not part of the key
def slow(key: str, seconds: float) -> str:
    time.sleep(seconds)
    return f"computed {key}"


@app.task(soft_time_limit=1)
def soft_limited_computing(tag: str) -> dict[str, Any]:
    """The task's thread computes a slow key when the soft limit strikes; a helper thread
    of the task, bound to its scope, waits for the same key."""
    got: dict[str, Any] = {}

    def helper() -> None:
        time.sleep(0.2)  # the task's thread is computing by then: this one waits
        try:
            got["helper"] = slow("k", 0.2)
        except BaseException as exc:  # reported
            got["helper"] = f"raised {type(exc).__name__}"

    thread = threading.Thread(target=bind_scope(helper))
    thread.start()
    outcome = "none"
    try:
        slow("k", 30)
    except SoftTimeLimitExceeded:
        outcome = "soft limit in the computation"
    thread.join(10)
    return {
        "main": outcome,
        "helper": got.get("helper", "still waiting" if thread.is_alive() else "nothing"),
        "again": slow("k", 0),  # the key is computed again, not stuck
        "live": live_scopes(),
    }


@app.task(soft_time_limit=1)
def soft_limited_waiting(tag: str) -> dict[str, Any]:
    """A helper thread computes a slow key; the task's thread waits for it when the soft
    limit strikes."""
    got: dict[str, Any] = {}
    started = threading.Event()

    @request_memo
    def slow_started(key: str) -> str:
        started.set()
        time.sleep(2)
        return f"computed {key}"

    def helper() -> None:
        got["helper"] = slow_started("k")

    thread = threading.Thread(target=bind_scope(helper))
    thread.start()
    assert started.wait(5)
    try:
        got["main"] = slow_started("k")
    except SoftTimeLimitExceeded:
        got["main"] = "soft limit while waiting"
    thread.join(10)
    return {**got, "live": live_scopes(), "in_scope": in_request_scope()}


@app.task(time_limit=1)
def hard_limited(tag: str) -> None:
    perrequest.set("tag", tag)
    time.sleep(30)


@app.task
def state() -> dict[str, Any]:
    """What the process holds between tasks, seen from inside one."""
    before = getattr(_seen, "before", None)
    _seen.before = None
    from perrequest.celery import _open_jobs  # what install() holds on this thread

    jobs = len(_open_jobs.get())
    gc.collect()
    stores = sum(1 for o in gc.get_objects() if type(o) is MemoStore and not o.closed)
    return {
        "pid": os.getpid(),
        "before": before,
        "live_in_task": live_scopes(),
        "jobs": jobs,
        "open_stores": stores,  # the task's own, and any left open by an earlier run
    }


@app.task(base=ScopedTask)
def scoped_state() -> dict[str, Any]:
    """``state`` from a ScopedTask: install() opens no scope for it (jobs: 0)."""
    return state.run()  # type: ignore[no-any-return]


@app.task(bind=True)
def calls_others(self: Any, tag: str) -> dict[str, Any]:
    """A task that runs other tasks synchronously: apply(), a direct call, .run()."""
    perrequest.set("tag", tag)
    mine = current_store()
    applied = probe.apply((f"{tag}-applied",)).get(disable_sync_subtasks=False)
    after_apply = current_store() is mine and perrequest.get("tag") == tag
    direct = scoped_probe(f"{tag}-direct")  # ScopedTask: a scope of its own
    after_direct = current_store() is mine and perrequest.get("tag") == tag
    return {
        "applied": applied,
        "after_apply": after_apply,
        "direct": direct,
        "after_direct": after_direct,
    }


def _check(tag: str) -> None:
    """Raise if the task did not start with a fresh store of its own."""
    report = _report(tag)
    bad = report["before"] is None or report["before"][0] or report["leftover_tag"] is not None
    if bad or report["foreign"] or report["entries"] != 3:
        raise AssertionError(f"task {tag} did not start alone: {report}")


@app.task
def add(x: int, y: int) -> int:
    _check(f"add-{x}-{y}")
    return x + y


@app.task
def total(values: list[int]) -> int:
    _check("total")
    return sum(values)


@request_memo
def _echo(n: int) -> int:
    return n


def _fill_until(deadline: float) -> None:
    """Memos and writes on a full store (each write evicts). A function of its own: on
    CPython 3.13 an exception a signal handler raises at a ``while`` loop's back edge
    escapes the ``try`` (and ``with``) the loop ends (python/cpython#130279); out of a
    call, it reaches the caller's."""
    i = 0
    while time.monotonic() < deadline:
        i += 1
        _echo(i % 20)
        perrequest.set(("x", i % 70), i)


@app.task(soft_time_limit=0.2)
def soft_limit_on_a_full_store() -> str:
    """Memos and writes on a full store (each write evicts) until the soft limit strikes,
    2 s at most; then, as Celery advises, some clean-up in the same store."""
    with perrequest.request_scope(max_entries=50):
        try:
            _fill_until(time.monotonic() + 2)
        except SoftTimeLimitExceeded:
            try:
                for j in range(100):
                    perrequest.set(("x", j % 70), j)
            except Exception as exc:
                return f"clean-up failed: {exc!r}"
            return "limit seen"
        return "limit never seen"
