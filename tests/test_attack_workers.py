"""Attacks on the worker integrations: real Celery workers (prefork, solo, threads) on a
real redis-server, and ``request_scope()`` in scripts, consumers and forked processes.

The Celery app is ``tests/workers_attack_apps.py``; each of its tasks reports what it
saw (what the task before it left on its thread, its own store, its memos' values).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from types import ModuleType
from typing import Any

import pytest
from servers import in_forked_child, run_process

import perrequest
from perrequest import ScopeStats, in_request_scope, request_memo, request_scope
from perrequest.testing import assert_no_live_scopes, live_scopes

pytestmark = pytest.mark.timeout(120)

fork_only = pytest.mark.skipif(sys.platform == "win32", reason="fork")


@pytest.fixture(autouse=True)
def _no_scope_left() -> Iterator[None]:
    yield
    assert_no_live_scopes()
    assert not in_request_scope()


# -- a process forked in a request -------------------------------------------------------


@request_memo(outside_scope="call")
def _user_seen(key: int) -> Any:
    return perrequest.get("user")


def _pool_job(key: int) -> tuple[int, bool, Any, Any]:
    return os.getpid(), in_request_scope(), perrequest.get("user"), _user_seen(key)


@fork_only
def test_a_process_pool_started_in_a_request_does_not_run_later_jobs_in_it() -> None:
    """A fork start method pool starts its processes at the first submit, in the
    submitting thread: each child's main thread inherited that request's store, and ran
    every later job, of every later request, in it (bob's job saw alice's user and her
    memo entries), for the life of the pool."""
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=1, mp_context=fork) as pool:
        with request_scope():
            perrequest.set("user", "alice")
            alices = pool.submit(_pool_job, 1).result(timeout=30)
        with request_scope():
            perrequest.set("user", "bob")
            bobs = pool.submit(_pool_job, 1).result(timeout=30)
        later = pool.submit(_pool_job, 1).result(timeout=30)
    assert alices[0] == bobs[0] == later[0]  # one child ran them all
    assert alices[1:] == bobs[1:] == later[1:] == (False, None, None)

    with request_scope():
        perrequest.set("user", "carol")
        pool2 = fork.Pool(1)
    try:
        assert pool2.apply(_pool_job, (2,))[1:] == (False, None, None)
    finally:
        pool2.close()
        pool2.join()


@fork_only
def test_a_child_forked_in_nested_scopes_leaves_them_quietly() -> None:
    """The child of a plain fork carries on in the request's code: it is outside every
    scope of its parent (each one closed there), leaves the blocks without calling their
    on_close (the parent's scopes report, once), and can open scopes of its own."""
    closed: list[str] = []
    read, write = os.pipe()
    with request_scope(on_close=lambda s: closed.append("outer")):
        perrequest.set("user", "outer")
        with request_scope(on_close=lambda s: closed.append("inner")):
            perrequest.set("user", "inner")
            pid = os.fork()
            if pid == 0:  # the child
                seen = [in_request_scope(), perrequest.get("user"), live_scopes()]
        if pid == 0:
            seen.append(in_request_scope())
    if pid == 0:
        code = 1
        try:
            with request_scope():
                perrequest.set("user", "child")
                own = perrequest.get("user")
            ok = seen == [False, None, 0, False] and own == "child" and not closed
            ok = ok and not in_request_scope() and live_scopes() == 0
            os.write(write, f"{ok} {seen} {own} {closed}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    report = os.read(read, 1000).decode()
    os.close(read)
    assert status == 0 and report.startswith("True"), report
    assert closed == ["inner", "outer"]


@fork_only
def test_a_child_forked_while_another_thread_is_in_a_scope_counts_no_open_scope() -> None:
    """That thread's scope is the parent's, and the thread is not in the child: its count
    stayed in the child's live_scopes() for good (an audit found it), so that
    assert_no_live_scopes() always failed there."""
    entered, leave = threading.Event(), threading.Event()

    def other_thread() -> None:
        with request_scope():
            entered.set()
            leave.wait(10)

    def counts() -> str:
        with request_scope():
            inside = live_scopes()
        return f"{live_scopes()} {inside}"

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        assert entered.wait(10) and live_scopes() == 1
        report = in_forked_child(counts)
    finally:
        leave.set()
        thread.join(10)
    assert report == "0 1", report
    assert live_scopes() == 0


@fork_only
def test_a_forked_child_warns_once_about_a_memo_its_parent_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ "One WARNING per function per process": a child is a process of its own (gunicorn
    --preload's workers, after a call at import in the master). Before: the warned names
    were copied with the memory, and no worker ever said its calls ran outside a scope."""

    @request_memo
    def lookup(n: int) -> int:
        return n

    def child() -> str:
        handler = _Collect()
        logging.getLogger("perrequest").addHandler(handler)
        lookup(1), lookup(2)
        return str(len(handler.messages))

    with caplog.at_level(logging.WARNING, logger="perrequest"):
        lookup(1), lookup(2)
        assert in_forked_child(child) == "1"
    assert len([r for r in caplog.records if "outside a request scope" in r.getMessage()]) == 1


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# -- real Celery workers ------------------------------------------------------------------


@pytest.fixture
def apps(redis_server: Any) -> ModuleType:
    """The app module, its broker and backend on this session's redis-server (emptied)."""
    os.environ["ATTACK_REDIS_URL"] = redis_server.url  # read when the module is imported
    module = importlib.import_module("workers_attack_apps")
    assert redis_server.url == module.URL
    return module


@contextlib.contextmanager
def celery_worker(apps: ModuleType, pool: str, *options: str) -> Iterator[None]:
    """``celery worker`` in a process of its own; stopped warm, killed if it hangs."""
    argv = [sys.executable, "-m", "celery", "-A", "workers_attack_apps", "worker", "-l", "warning"]
    argv += [f"--pool={pool}", "--without-heartbeat", "--without-gossip", "--without-mingle"]
    env = {"ATTACK_REDIS_URL": apps.URL}
    with run_process([*argv, *options], env=env, stop_timeout=20) as (_, log):
        try:
            # The first task waits for the worker to start.
            assert apps.state.delay().get(timeout=60)["pid"] != os.getpid()
            yield
        except BaseException:
            print(log.read_text(errors="replace")[-4000:])
            raise


def _alone(report: dict[str, Any], tag: str) -> bool:
    """The task started outside any scope, in a fresh store, and saw only its own values."""
    before = report["before"]
    return (
        report["tag"] == tag
        and before is not None
        and before[0] is False
        and report["leftover_tag"] is None
        and report["foreign"] == 0
        and report["entries"] == 3
    )


POOLS = {"prefork": ["-c", "2"], "solo": [], "threads": ["-c", "4"]}


@pytest.mark.slow  # real Celery workers
@pytest.mark.parametrize("pool", POOLS)
def test_every_task_of_a_real_worker_starts_alone(apps: ModuleType, pool: str) -> None:
    """Plain and ScopedTask tasks, retries (self.retry, autoretry_for), a chain, a group,
    a chord, and a task running others synchronously (apply(), a direct call): each run
    starts outside any scope, in a store of its own, and leaves none open."""
    from celery import chain, chord, group

    with celery_worker(apps, pool, *POOLS[pool]):
        plain = [apps.probe.delay(f"p{i}") for i in range(24)]
        scoped = [apps.scoped_probe.delay(f"s{i}") for i in range(12)]
        assert all(_alone(r.get(timeout=60), f"p{i}") for i, r in enumerate(plain))
        assert all(_alone(r.get(timeout=60), f"s{i}") for i, r in enumerate(scoped))
        assert _alone(apps.retrying.delay("r").get(timeout=60), "r-2")
        assert _alone(apps.autoretrying.delay("a").get(timeout=60), "a-2")
        # add and total raise unless they start alone.
        assert chain(apps.add.s(1, 2), apps.add.s(3)).delay().get(timeout=60) == 6
        assert group(apps.add.s(i, i) for i in range(4)).delay().get(timeout=60) == [0, 2, 4, 6]
        summed = chord((apps.add.s(i, i) for i in range(4)), apps.total.s()).delay()
        assert summed.get(timeout=60) == 12
        calls = apps.calls_others.delay("c").get(timeout=60)
        assert calls["after_apply"] and calls["after_direct"]
        # apply() in a task: a scope of its own, inside the caller's; a ScopedTask called
        # directly: no prerun, a scope all the same. Both start empty.
        for nested in (calls["applied"], calls["direct"]):
            assert nested["leftover_tag"] is None and nested["foreign"] == 0
            assert nested["entries"] == 3 and (nested["live_in_task"] == 2 or pool == "threads")
        if pool != "threads":  # one task at a time per process: nothing left between tasks
            states = [apps.state.delay().get(timeout=60) for _ in range(6)]
            assert all(s["before"] == [False, 0] and s["live_in_task"] == 1 for s in states)


@pytest.mark.slow  # real Celery workers
def test_prefork_time_limits_strand_no_waiter_and_leave_no_scope(apps: ModuleType) -> None:
    """The soft time limit strikes in a memo computation while a helper thread of the task
    waits for the same key (the helper gets the task's SoftTimeLimitExceeded, as any
    waiter gets the computation's exception, and the key is computed again after), or
    while the task's thread waits for a helper's computation (it leaves; the helper
    finishes). A hard time limit kills the process. No scope is left either way."""
    from celery.exceptions import TimeLimitExceeded

    with celery_worker(apps, "prefork", "-c", "1"):
        computing = apps.soft_limited_computing.delay("x").get(timeout=60)
        assert computing == {
            "main": "soft limit in the computation",
            "helper": "raised SoftTimeLimitExceeded",
            "again": "computed k",
            "live": 1,
        }
        waiting = apps.soft_limited_waiting.delay("x").get(timeout=60)
        assert waiting == {
            "main": "soft limit while waiting",
            "helper": "computed k",
            "live": 1,
            "in_scope": True,
        }
        after_soft = apps.state.delay().get(timeout=60)
        assert after_soft["before"] == [False, 0] and after_soft["live_in_task"] == 1
        with pytest.raises(TimeLimitExceeded):
            apps.hard_limited.delay("x").get(timeout=60)
        after_hard = apps.state.delay().get(timeout=60)
        assert after_hard["before"] == [False, 0] and after_hard["pid"] != after_soft["pid"]


@pytest.mark.slow  # real Celery workers
@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_worker_memory_stays_flat_over_thousands_of_tasks(apps: ModuleType, pool: str) -> None:
    """1,600 tasks, each memoizing 50 kB under a key no other task uses (80 MB in all):
    the worker's RSS after the last 400 is within a few MB of after the first 400."""
    options = ["-c", "1", "--max-tasks-per-child=100000"] if pool == "prefork" else []
    with celery_worker(apps, pool, *options):
        rss = []
        for batch in range(4):
            results = [apps.leaky.delay(f"L{batch}-{i}", 50_000) for i in range(400)]
            rss.append(max(r.get(timeout=120) for r in results))
    assert rss[-1] - rss[0] < 8 * 2**20, [f"{r / 2**20:.1f} MB" for r in rss]


@pytest.mark.slow  # real Celery workers
def test_a_run_cut_short_as_its_scope_closes_leaves_nothing_for_the_next(
    apps: ModuleType,
) -> None:
    """An exception raised by a signal handler (the soft time limit's) while Celery sends
    task_prerun or task_postrun: Celery logs a receiver's exception and goes on, so the
    run's scope was never closed. It stayed active in the worker's thread, below every
    later task's scope, holding its entries, for the life of the process (and install()'s
    stack of open runs kept it too)."""
    rng = random.Random(1)
    with celery_worker(apps, "prefork", "-c", "1"):
        for _ in range(3):
            results = [apps.interrupted_late.delay(rng.uniform(0, 0.002)) for _ in range(100)]
            for result in results:
                with contextlib.suppress(Exception):
                    result.get(timeout=60)
            # The next run, a plain task or a ScopedTask (whose scope is its own, not
            # install()'s): only its own store open. What an interrupted run left is
            # closed as the next one starts. (live_scopes() may count one more: an
            # interrupt between a store's closing and its counting is not undone.)
            after = apps.state.delay().get(timeout=60)
            assert after["jobs"] == after["open_stores"] == 1, after
        pairs = [
            (apps.interrupted_late.delay(rng.uniform(0, 0.002)), apps.scoped_state.delay())
            for _ in range(100)
        ]
        for interrupted, checked in pairs:
            with contextlib.suppress(Exception):
                interrupted.get(timeout=60)
            after = checked.get(timeout=60)
            assert after["jobs"] == 0 and after["open_stores"] == 1, after


# -- ScopedTask on a body that runs after the call ----------------------------------------


async def _async_body() -> bool:
    return in_request_scope()


def _generator_body() -> Iterator[bool]:
    yield in_request_scope()


@pytest.mark.parametrize(
    ("body", "kind"),
    [(_async_body, "an async def function"), (_generator_body, "a generator function")],
)
def test_scoped_task_refuses_a_body_that_would_run_outside_its_scope(body: Any, kind: str) -> None:
    """Celery does not await an ``async def`` task: ``ScopedTask`` returned the coroutine
    (``await my_task()`` from async code, or a worker storing it), whose body then ran
    after the scope had closed, outside it. A generator's body alike. Refused when the
    task is created, as ``@request_scope()`` refuses them."""
    from celery import Celery

    from perrequest.celery import ScopedTask

    other = Celery("test_attack_workers_async", broker="memory://")
    with pytest.raises(TypeError, match=f"ScopedTask cannot take {kind}"):
        # shared=False: a shared task is made again in every app finalized later.
        other.task(lazy=False, shared=False, base=ScopedTask, name="refused")(body)

    with pytest.raises(TypeError, match=f"ScopedTask cannot take {kind}"):
        type("Subclassed", (ScopedTask,), {"run": body})


# -- request_scope() in consumers and scripts ---------------------------------------------


async def test_an_asyncio_consumer_with_timeouts_and_cancellation_leaves_no_scope() -> None:
    """``async with request_scope()`` per job in a queue consumer: jobs that time out in
    the middle of a shared computation, tasks that outlive their job, and consumers
    cancelled in the middle of a job. Every job saw only its own values, and every
    scope closed."""
    closed: list[ScopeStats] = []
    late: list[tuple[int, bool, Any]] = []

    @request_memo
    async def fetch(key: int) -> tuple[Any, int]:
        await asyncio.sleep(0.03)
        return perrequest.get("job"), key

    async def outlive(job: int, ended: asyncio.Event) -> None:
        await ended.wait()  # its job's scope has closed
        late.append((job, in_request_scope(), perrequest.get("job")))

    results: dict[int, Any] = {}
    leftovers: list[asyncio.Task[None]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def consumer() -> None:
        while True:
            job = await queue.get()
            ended = asyncio.Event()
            try:
                async with request_scope(on_close=closed.append):
                    perrequest.set("job", job)
                    leftovers.append(asyncio.create_task(outlive(job, ended)))
                    async with asyncio.timeout(0.01 if job % 3 == 0 else 5):
                        results[job] = await asyncio.gather(fetch(1), fetch(1), fetch(2))
            except TimeoutError:
                results[job] = "timeout"
            finally:
                ended.set()  # the scope has closed, whichever way the job ended
                queue.task_done()

    consumers = [asyncio.create_task(consumer()) for _ in range(4)]
    for job in range(24):
        queue.put_nowait(job)
    await asyncio.wait_for(queue.join(), 20)
    for job in range(24, 28):  # cancelled in the middle of these
        queue.put_nowait(job)
    await asyncio.sleep(0.01)
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, *leftovers, return_exceptions=True)
    for job in range(24):
        if job % 3 == 0:
            assert results[job] == "timeout"
        else:
            assert [owner for owner, _ in results[job]] == [job] * 3
    assert len(late) == 28 and all(entry[1:] == (False, None) for entry in late)
    assert len(closed) == 28 and live_scopes() == 0 and not in_request_scope()


async def test_one_scope_object_entered_by_two_tasks_at_once() -> None:
    """A scope object is single-use: the second task to enter it gets RuntimeError, the
    first keeps its scope, and a decorated function opens one per call."""
    scope = request_scope()
    stores: list[Any] = []

    async def enter() -> None:
        async with scope as store:
            stores.append(store)
            await asyncio.sleep(0.02)

    outcomes = await asyncio.gather(enter(), enter(), return_exceptions=True)
    assert outcomes[0] is None and isinstance(outcomes[1], RuntimeError)
    assert "single-use" in str(outcomes[1]) and len(stores) == 1
    with pytest.raises(RuntimeError, match="single-use"), scope:
        pass

    @request_scope()
    async def job() -> Any:
        await asyncio.sleep(0)
        return perrequest.current_store()

    first, second = await asyncio.gather(job(), job())
    assert first is not second and first.closed and second.closed


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_close_the_scope(exc: type[BaseException]) -> None:
    closed: list[ScopeStats] = []
    with pytest.raises(exc), request_scope(on_close=closed.append):
        perrequest.set("k", 1)
        raise exc()

    async def body() -> None:
        async with request_scope(on_close=closed.append):
            perrequest.set("k", 1)
            raise exc()

    with pytest.raises(exc):
        asyncio.run(body())
    assert [s.entries for s in closed] == [1, 1]
    assert live_scopes() == 0 and not in_request_scope()


def test_ctrl_c_in_asyncio_run_closes_the_scope() -> None:
    """SIGINT while a job awaits: asyncio.run cancels the main task, the scope closes,
    then KeyboardInterrupt comes out."""
    closed: list[ScopeStats] = []

    async def job() -> None:
        async with request_scope(on_close=closed.append):
            perrequest.set("k", 1)
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            await asyncio.sleep(5)

    # asyncio.run handles SIGINT only over Python's default handler: an earlier test in
    # this worker process (an in-process server, a Celery worker) may have left another.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(job())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(closed) == 1 and live_scopes() == 0 and not in_request_scope()


def test_a_memo_in_a_task_of_an_app_without_install_names_the_celery_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Celery app whose install() was forgotten: every task's memos call through, and
    the one WARNING named middlewares and request_scope(), not the one-line fix."""
    from celery import Celery

    other = Celery("test_attack_workers_forgotten", broker="memory://")

    @request_memo
    def price(sku: str) -> int:
        return len(sku)

    @other.task(lazy=False)
    def job() -> int:
        return price("apple") + price("apple")

    with caplog.at_level("WARNING", logger="perrequest"):
        assert job.apply().get() == 10
    (record,) = [r for r in caplog.records if "outside a request scope" in r.getMessage()]
    assert "Celery: perrequest.celery.install(app)" in record.getMessage()


@pytest.mark.slow  # real Celery workers
def test_a_soft_limit_striking_as_a_full_store_evicts_reaches_the_task(
    apps: ModuleType,
) -> None:
    """Tasks loop on a full store (every write evicts) until their soft time limit: each
    sees it, and its clean-up in the same store works. Before, the limit's exception,
    landing as an eviction's pop returned, was taken for a key whose hash raises and
    dropped (3 to 5% of such tasks ran on to their own bound), and an interrupt between an
    eviction's two pops made the clean-up's writes raise a bare KeyError (an audit)."""
    with celery_worker(apps, "prefork", "-c", "2"):
        results = [apps.soft_limit_on_a_full_store.delay() for _ in range(60)]
        outcomes = [result.get(timeout=60) for result in results]
    assert outcomes == ["limit seen"] * 60, sorted(set(outcomes))
