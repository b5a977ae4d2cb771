"""perrequest.celery on a real in-process Celery worker (memory broker, threads pool).

One worker serves the whole module, because starting and stopping one takes
seconds. Its app has both kinds of tasks: plain ones, scoped by ``install``,
and ``ScopedTask`` ones, which bring their own scope.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

import perrequest
from perrequest import ScopeStats, current_store, in_request_scope, request_memo, request_scope
from perrequest.celery import ScopedTask, install
from perrequest.testing import assert_no_live_scopes, live_scopes

pytestmark = pytest.mark.timeout(60)

JOBS = 16
KEYS = (1, 2, 3, 1, 2, 3, 1)

_lock = threading.Lock()
computed: Counter[str] = Counter()  # job id -> real lookups it made
closed_installed: list[ScopeStats] = []
closed_scoped: list[ScopeStats] = []
running = 0
peak_running = 0


def _reset() -> None:
    global running, peak_running
    computed.clear()
    closed_installed.clear()
    closed_scoped.clear()
    running = peak_running = 0


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


@request_memo
def lookup(key: int) -> list[object]:
    """A slow lookup whose value names the job that computed it."""
    job = perrequest.get("job")
    with _lock:
        computed[job] += 1
    time.sleep(0.005)
    return [job, key]


def _run_job(job: str) -> dict[str, Any]:
    global running, peak_running
    with _lock:
        running += 1
        peak_running = max(peak_running, running)
    try:
        perrequest.set("job", job)
        values = [lookup(key) for key in KEYS]
        return {
            "foreign": sum(1 for owner, _ in values if owner != job),
            "entries": len(current_store()),
            "max_entries": current_store().max_entries,
        }
    finally:
        with _lock:
            running -= 1


app = Celery("test_celery", broker="memory://", backend="cache+memory://")
app.conf.broker_transport_options = {"polling_interval": 0.01}
install(app, max_entries=500, on_close=closed_installed.append)


@app.task
def installed_job(job: str) -> dict[str, Any]:
    return _run_job(job)


@app.task(base=ScopedTask, perrequest_max_entries=50, perrequest_on_close=closed_scoped.append)
def scoped_job(job: str) -> dict[str, Any]:
    return _run_job(job)


@app.task
def installed_failing(job: str) -> None:
    perrequest.set("job", job)
    lookup(1)
    raise RuntimeError(f"job {job} failed")


@app.task(base=ScopedTask, perrequest_on_close=closed_scoped.append)
def scoped_failing(job: str) -> None:
    perrequest.set("job", job)
    lookup(1)
    raise RuntimeError(f"job {job} failed")


@app.task
def outer_job(job: str) -> dict[str, Any]:
    perrequest.set("job", job)
    outer_store = current_store()
    inner = installed_job.apply((f"{job}-inner",)).get()
    return {
        "inner_entries": inner["entries"],
        "restored": current_store() is outer_store and perrequest.get("job") == job,
    }


@pytest.fixture(scope="module")
def worker() -> Iterator[object]:
    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False) as w:
        yield w


@pytest.fixture(autouse=True)
def _no_scope_left() -> Iterator[None]:
    _reset()
    yield
    # Under install() the scope closes at task_postrun, just after the result is stored.
    _wait_until(lambda: live_scopes() == 0)
    assert_no_live_scopes()
    assert not in_request_scope()


@pytest.mark.parametrize("task", [installed_job, scoped_job], ids=["install", "ScopedTask"])
def test_each_task_computes_once_and_sees_only_its_own_entries(worker: object, task: Any) -> None:
    results = [task.delay(f"job{i}") for i in range(JOBS)]
    outcomes = [result.get(timeout=20, interval=0.01) for result in results]
    assert all(outcome["foreign"] == 0 for outcome in outcomes)
    assert all(outcome["entries"] == 4 for outcome in outcomes)  # 3 lookups + "job"
    assert computed == {f"job{i}": 3 for i in range(JOBS)}
    assert peak_running > 1, "the threads pool never ran two tasks at once"


@pytest.mark.parametrize(
    ("task", "closed", "max_entries"),
    [(installed_job, closed_installed, 500), (scoped_job, closed_scoped, 50)],
    ids=["install", "ScopedTask"],
)
def test_on_close_once_per_task_and_nothing_survives(
    worker: object, task: Any, closed: list[ScopeStats], max_entries: int
) -> None:
    first = task.delay("same").get(timeout=20, interval=0.01)
    second = task.delay("same").get(timeout=20, interval=0.01)
    assert first["max_entries"] == second["max_entries"] == max_entries
    assert computed["same"] == 6, "the second task reused the first one's entries"
    assert _wait_until(lambda: len(closed) == 2)
    assert [(s.misses, s.hits, s.entries) for s in closed] == [(3, 4, 4)] * 2
    assert _wait_until(lambda: live_scopes() == 0)


@pytest.mark.parametrize(
    ("task", "closed"),
    [(installed_failing, closed_installed), (scoped_failing, closed_scoped)],
    ids=["install", "ScopedTask"],
)
def test_a_failing_task_closes_its_scope(
    worker: object, task: Any, closed: list[ScopeStats]
) -> None:
    result = task.delay("bad")
    with pytest.raises(RuntimeError, match="job bad failed"):
        result.get(timeout=20, interval=0.01)
    assert _wait_until(lambda: len(closed) == 1)
    assert closed[0].misses == 1
    assert _wait_until(lambda: live_scopes() == 0)


@pytest.mark.parametrize("task", [installed_job, scoped_job], ids=["install", "ScopedTask"])
def test_eager_apply_runs_in_its_own_scope(task: Any) -> None:
    with perrequest.request_scope() as caller_store:
        perrequest.set("job", "caller")
        outcomes = [task.apply((f"eager{i}",)).get() for i in range(3)]
        assert current_store() is caller_store and perrequest.get("job") == "caller"
    assert [o["entries"] for o in outcomes] == [4, 4, 4]
    assert computed == {"eager0": 3, "eager1": 3, "eager2": 3}
    assert len(closed_installed) + len(closed_scoped) == 3
    assert not in_request_scope()


@pytest.mark.parametrize("task", [installed_failing, scoped_failing], ids=["install", "ScopedTask"])
def test_eager_failure_closes_the_scope(task: Any) -> None:
    result = task.apply(("eager-bad",))
    assert isinstance(result.result, RuntimeError)
    assert len(closed_installed) + len(closed_scoped) == 1
    assert live_scopes() == 0 and not in_request_scope()


def test_nested_eager_apply_gets_its_own_scope_and_restores_the_outer_one() -> None:
    outcome = outer_job.apply(("outer",)).get()
    assert outcome == {"inner_entries": 4, "restored": True}
    assert len(closed_installed) == 2
    assert live_scopes() == 0


_abandoned: list[Generator[int, None, None]] = []


def _rows() -> Generator[int, None, None]:
    with request_scope():
        yield 1
        yield 2


@app.task
def installed_sloppy() -> str:
    rows = _rows()
    next(rows)  # its scope is open, and active here, until the generator is closed
    _abandoned.append(rows)
    return "ok"


@app.task(base=ScopedTask)
def scoped_sloppy() -> str:
    return installed_sloppy.run()  # type: ignore[no-any-return]


@pytest.mark.parametrize("task", [installed_sloppy, scoped_sloppy], ids=["install", "ScopedTask"])
def test_a_task_that_leaves_a_scope_open_does_not_leave_the_thread_in_it(task: Any) -> None:
    """Before, the thread stayed inside the abandoned generator's scope after the task:
    whatever ran on it next (another app's task, code outside any task) memoized in a
    store as long-lived as the generator."""
    assert task.apply().get() == "ok"
    assert not in_request_scope()
    assert live_scopes() == 1  # the generator's, until it is closed
    _abandoned.pop().close()
    assert live_scopes() == 0
    with request_scope() as outer:  # a nested eager run gives the outer scope back
        assert task.apply().get() == "ok"
        assert current_store() is outer
        _abandoned.pop().close()


def test_direct_call_of_a_scoped_task_opens_a_scope() -> None:
    assert scoped_job("direct")["entries"] == 4
    assert len(closed_scoped) == 1 and not in_request_scope()


def test_scoped_task_as_the_app_task_class() -> None:
    other = Celery("test_celery_task_cls", broker="memory://", task_cls=ScopedTask)

    @other.task(lazy=False)
    def job(name: str) -> dict[str, Any]:
        return _run_job(name)

    assert isinstance(job, ScopedTask)
    assert job.apply(("cls",)).get()["entries"] == 4
    assert computed == {"cls": 3}


def test_on_close_given_as_an_option_is_not_bound_to_the_task() -> None:
    seen: list[ScopeStats] = []
    other = Celery("test_celery_on_close", broker="memory://")

    @other.task(lazy=False, base=ScopedTask, perrequest_on_close=seen.append)
    def job() -> None:
        perrequest.set("x", 1)

    class Subclassed(ScopedTask):
        def perrequest_on_close(stats: ScopeStats) -> None:  # made a staticmethod
            seen.append(stats)

    @other.task(lazy=False, base=Subclassed)
    def job2() -> None:
        pass

    job.apply()
    job2.apply()
    assert [type(s) for s in seen] == [ScopeStats, ScopeStats]
    assert seen[0].entries == 1


def test_scoped_task_options_are_checked_when_the_class_is_created() -> None:
    other = Celery("test_celery_options", broker="memory://")
    with pytest.raises(
        TypeError,
        match=re.escape(
            "unknown option perrequest_max_entrys=. Did you mean perrequest_max_entries=?"
        ),
    ):

        @other.task(lazy=False, base=ScopedTask, perrequest_max_entrys=5)
        def typo() -> None: ...

    with pytest.raises(ValueError, match="perrequest_max_entries"):

        class Zero(ScopedTask):
            perrequest_max_entries = 0

    with pytest.raises(TypeError, match="perrequest_max_entries"):

        class Text(ScopedTask):
            perrequest_max_entries = "100"

    with pytest.raises(TypeError, match="perrequest_on_close must be a callable"):

        class NotCallable(ScopedTask):
            perrequest_on_close = 42


def _body() -> None: ...


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("perequest_max_entries", "perrequest_max_entries"),
        ("perrequestmax_entries", "perrequest_max_entries"),
        ("per_request_on_close", "perrequest_on_close"),
    ],
)
def test_a_misspelt_option_prefix_is_refused(typo: str, meant: str) -> None:
    """A typo in the prefix itself was one more class attribute among Celery's: the
    task ran with the default bound, silently."""
    other = Celery("test_celery_prefix", broker="memory://")
    with pytest.raises(
        TypeError, match=re.escape(f"unknown option {typo}=. Did you mean {meant}=?")
    ):
        other.task(lazy=False, base=ScopedTask, name="typo", **{typo: 50})(_body)
    # Celery's own options, however close to a word of ours, are left alone.
    task = other.task(lazy=False, base=ScopedTask, name="ok", max_retries=3)(_body)
    assert task.max_retries == 3


@pytest.mark.parametrize(
    ("plain", "meant"),
    [
        ("max_entries", "perrequest_max_entries"),
        ("on_close", "perrequest_on_close"),
    ],
)
def test_an_option_without_its_prefix_is_refused(plain: str, meant: str) -> None:
    """Written as install() and the middlewares take it, the option was one more class
    attribute among Celery's: the task ran with the default bound, silently."""
    other = Celery("test_celery_unprefixed", broker="memory://")
    with pytest.raises(TypeError, match=re.escape(f"{plain}=. Did you mean {meant}=?")):
        other.task(lazy=False, base=ScopedTask, name="plain", **{plain: print})(_body)
    with pytest.raises(TypeError, match="with the prefix perrequest_"):

        class Subclassed(ScopedTask):
            max_entries = 50

    class Upload(ScopedTask):  # names of its own, for its own ends, are left alone
        max_size = 2**20

        def on_close(self) -> None: ...

    assert Upload.max_size == 2**20


def test_install_checks_its_options() -> None:
    other = Celery("test_celery_install", broker="memory://")
    with pytest.raises(ValueError, match="max_entries"):
        install(other, max_entries=0)
    with pytest.raises(TypeError, match="max_entries"):
        install(other, max_entries=1.5)
    with pytest.raises(TypeError, match="on_close"):
        install(other, on_close="log")
    with pytest.raises(TypeError, match="unknown option scope_types="):
        install(other, scope_types=("http",))
    with pytest.raises(TypeError, match="Celery app"):
        install(object())
    install(other, max_entries=None)
    with pytest.raises(RuntimeError, match="already installed"):
        install(other)


def test_install_leaves_other_apps_alone() -> None:
    other = Celery("test_celery_not_installed", broker="memory://")

    @other.task(lazy=False)
    def job() -> bool:
        return in_request_scope()

    assert job.apply().get() is False
    assert closed_installed == []


def test_the_core_never_imports_celery() -> None:
    code = "import sys, perrequest, perrequest.testing; print('celery' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("lazy", [True, False], ids=["app.task (a PromiseProxy)", "a Task"])
def test_a_decorator_above_app_task_is_refused_naming_the_order(lazy: bool) -> None:
    """``@request_scope()`` (or ``@request_memo``, ``@request_batch``) above ``@app.task``:
    decoration succeeded, the name held a plain function (``job.delay`` an AttributeError)
    and the worker ran the task Celery registered without a scope (a red-team, 6
    December). Refused now, saying to put it below."""
    from perrequest import request_batch

    app = Celery("order", broker="memory://", backend="cache+memory://")

    def job(x: int) -> int:
        return x

    def jobs(keys: list[int]) -> list[int]:
        return keys

    for i, (decorate, name) in enumerate(
        ((request_scope(), "@request_scope()"), (request_memo, "@request_memo"),
         (request_batch, "@request_batch"))
    ):  # fmt: skip
        task = app.task(job if name != "@request_batch" else jobs, lazy=lazy, name=f"order.{i}")
        with pytest.raises(TypeError, match=re.escape(f"{name} cannot go above @app.task")):
            decorate(task)
    below = app.task(request_scope()(job), name="order.below")  # the right order works
    assert below.apply(args=(3,)).get() == 3


def test_a_lazy_task_is_refused_without_being_evaluated() -> None:
    """The refusal must not evaluate a lazy task (its repr would): with an app made with
    ``autofinalize=False``, as workers often are, Celery's "Contract breach: app not
    finalized" came out instead of the refusal (a review)."""
    app = Celery("unfinalized", broker="memory://", autofinalize=False)

    def lazy_job(x: int) -> int:
        return x

    lazy = app.task(lazy_job, name="unfinalized.lazy_job")  # a PromiseProxy
    for decorate in (request_memo, request_scope()):
        with pytest.raises(TypeError, match=r"cannot go above @app.task \(on a Celery task\)"):
            decorate(lazy)
    assert not app.finalized


def test_a_soft_time_limit_in_on_close_still_gives_the_thread_back() -> None:
    """ScopedTask: a soft time limit's exception raised while the run's on_close pushes its
    stats goes on to the task (_listeners); the thread must still get back what it had
    (``_restore``) when the body left a scope of its own open, or everything after the
    task ran inside that scope (a review)."""
    import signal

    from celery.exceptions import SoftTimeLimitExceeded

    from perrequest._active import close_scope

    def soft_time_limit(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded("soft time limit")

    def report(stats: ScopeStats) -> None:
        signal.raise_signal(signal.SIGUSR1)

    app = Celery("soft", broker="memory://", backend="cache+memory://")
    left: list[Any] = []

    @app.task(base=ScopedTask, perrequest_on_close=report, name="soft.leaves_a_scope")
    def leaves_a_scope() -> int:
        left.append(request_scope().__enter__())  # a body that never exits its scope
        return 1

    previous = signal.signal(signal.SIGUSR1, soft_time_limit)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            leaves_a_scope()
        assert not in_request_scope(), "the thread kept the scope the body left open"
    finally:
        signal.signal(signal.SIGUSR1, previous)
        for store in left:
            close_scope(store)
        perrequest._active._current.set(None)


def test_an_eager_replace_by_a_scoped_task_keeps_the_replaced_tasks_scope() -> None:
    """Eager ``self.replace()`` runs the replacement under the replaced task's id. A
    ScopedTask replacement opens no install() job, but its task_postrun closed the
    replaced task's: that task went on outside any scope, or, applied inside a request's
    scope, read and wrote the request's store (a probe, 7 December)."""
    closed: list[ScopeStats] = []
    other = Celery("test_celery_replace", broker="memory://")
    other.conf.task_always_eager = True
    install(other, on_close=closed.append)
    seen: dict[str, Any] = {}

    @other.task(base=ScopedTask)
    def replacement() -> str:
        return "replaced"

    @other.task(bind=True)
    def replaced(self: Any) -> Any:
        perrequest.set("mine", "the task's")
        value = self.replace(replacement.s())
        seen["after"] = perrequest.get("mine")
        seen["closed so far"] = len(closed)
        perrequest.set("written after", True)
        return value

    assert replaced.apply().get() == "replaced"
    assert seen == {"after": "the task's", "closed so far": 0} and len(closed) == 1
    with request_scope() as request_store:
        perrequest.set("mine", "the request's")
        replaced.apply().get()
    assert seen["after"] == "the task's" and "written after" not in request_store
    assert len(closed) == 2 and live_scopes() == 0


def test_receivers_of_task_success_failure_and_retry_see_the_tasks_store() -> None:
    """workers.md says which of a user's own signal receivers see the task's store."""
    from celery.signals import task_failure, task_retry, task_success

    other = Celery("test_celery_signals", broker="memory://")
    other.conf.task_always_eager = True
    install(other)
    seen: dict[str, Any] = {}

    def receiver(name: str) -> Callable[..., None]:
        def receive(sender: Any = None, **_: Any) -> None:
            if sender is not None and sender.app is other:
                seen[name] = perrequest.get("k")

        return receive

    receivers = {name: receiver(name) for name in ("success", "failure", "retry")}
    task_success.connect(receivers["success"])
    task_failure.connect(receivers["failure"])
    task_retry.connect(receivers["retry"])

    @other.task
    def failing() -> None:
        perrequest.set("k", "failing")
        raise ValueError("fails")

    @other.task(bind=True, max_retries=1)
    def retried(self: Any) -> int:
        perrequest.set("k", f"try {self.request.retries}")
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return 2

    try:
        failing.apply()
        retried.apply()
    finally:
        task_success.disconnect(receivers["success"])
        task_failure.disconnect(receivers["failure"])
        task_retry.disconnect(receivers["retry"])
    assert seen == {"failure": "failing", "retry": "try 0", "success": "try 1"}
    assert live_scopes() == 0
