"""Celery integration: one request scope per task run, so task memos die with the job.

``ScopedTask`` opens and closes the scope in one ``try/finally``. ``install(app)``
uses ``task_prerun``/``task_postrun``, which Celery sends from one function in
the task's thread (``postrun`` from a ``finally``); the open scopes are a stack
in a ``ContextVar``, so nested eager runs unwind in order (docs/workers.md).
"""

from __future__ import annotations

import difflib
import weakref
from contextvars import ContextVar
from typing import Any, Final, NamedTuple

try:
    from celery import Celery, Task
    from celery.signals import task_postrun, task_prerun
except ImportError as exc:  # name the extra to install
    from ._extras import missing_extra

    missing_extra(exc, __name__, "celery", "celery")

from ._active import OnClose, _current, check_options, close_scope, open_scope
from ._checks import (
    check_max_entries,
    check_on_close,
    explains_options,
    is_async_callable,
    unknown_option,
)
from ._targets import refuse_generator
from .store import DEFAULT_MAX_ENTRIES, MemoStore

__all__ = ["ScopedTask", "install"]

_OPTIONS: Final = ("perrequest_max_entries", "perrequest_on_close")
# Options written as other entry points take them: on a task class they would be one
# more attribute among Celery's, and the task would run with the default silently.
_UNPREFIXED: Final = {"max_entries": _OPTIONS[0], "on_close": _OPTIONS[1]}


# Celery ships no type hints, so Task is Any to mypy; subclassing it is the point.
class ScopedTask(Task):  # type: ignore[misc]
    """A Celery task base class whose every run gets a fresh request scope.

    Subclass it, or pass options through ``@app.task``, to change the options.

    Attributes:
        perrequest_max_entries: The bound of each run's store; ``None``:
            unbounded. Checked when the task class is created.
        perrequest_on_close: Called with each run's ``ScopeStats`` as its scope
            closes (a plain function works as an attribute).
    """

    perrequest_max_entries: int | None = DEFAULT_MAX_ENTRIES
    perrequest_on_close: OnClose | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_task_class(cls)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        before = _current.get()
        store = open_scope(self.perrequest_max_entries, self.perrequest_on_close)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            try:  # a soft time limit in its on_close goes on (_listeners): restored first
                close_scope(store)
            finally:
                _restore(before)


def _check_task_class(cls: type) -> None:
    """Refuse misspelt or bad options when the task class is created, not at the first run."""
    where = f"task class {cls.__qualname__}"
    for name, value in vars(cls).items():
        if name in _UNPREFIXED and not _defined_in(cls, value):
            raise TypeError(
                f"{where} got an unknown option {name}=. Did you mean {_UNPREFIXED[name]}=? "
                "A task class takes perrequest's options with the prefix perrequest_ "
                "(@app.task(base=ScopedTask, perrequest_max_entries=...) sets them as "
                "attributes of the class, among Celery's own)."
            )
        # A typo in the prefix (perequest_max_entries) would otherwise be one more
        # attribute among Celery's, and the task would run with the default silently.
        misspelt = difflib.get_close_matches(name, _OPTIONS, n=1, cutoff=0.8)
        if name not in _OPTIONS and (name.startswith("perrequest_") or misspelt):
            raise TypeError(unknown_option(where, name, _OPTIONS))
    run = vars(cls).get("run")
    run = run.__func__ if isinstance(run, staticmethod) else run
    if run is not None:  # its body must run inside __call__, where the scope is open
        refuse_generator(run, "ScopedTask")
        if is_async_callable(run):
            raise TypeError(
                f"ScopedTask cannot take an async def function ({run.__qualname__}): "
                "Celery does not await it, so its body would run after the task's scope "
                "ended. Make the task a plain function that runs the async code with "
                "asyncio.run(...): the scope reaches it."
            )
    if "perrequest_max_entries" in vars(cls):
        check_max_entries(vars(cls)["perrequest_max_entries"], f"{where}: perrequest_max_entries")
    if "perrequest_on_close" in vars(cls):
        raw = vars(cls)["perrequest_on_close"]
        if isinstance(raw, staticmethod):
            raw = raw.__func__
        try:
            check_on_close(raw)
        except TypeError as exc:
            raise TypeError(f"{where}: perrequest_{exc}") from None
        # A plain function stored on a class would be bound to the task as a method.
        cls.perrequest_on_close = staticmethod(raw) if raw is not None else None  # type: ignore[attr-defined]


def _defined_in(cls: type, value: object) -> bool:
    """A function written in the class's body (its own ``on_close`` method), not an option."""
    qualname = getattr(value, "__qualname__", None)
    return isinstance(qualname, str) and qualname.startswith(f"{cls.__qualname__}.")


class _OpenJob(NamedTuple):
    task_id: str
    store: MemoStore
    before: Any  # what was active when the job's scope opened: active again after it


def _restore(before: Any) -> None:
    """Make ``before`` the active store again, after a task whose body left a scope of
    its own open (a generator holding ``with request_scope()`` across a yield, kept by
    the task): the worker thread would run everything after it inside that scope."""
    if _current.get() is not before:
        _current.set(before)


# Per app, install()'s (max_entries, on_close).
_installed: weakref.WeakKeyDictionary[Any, tuple[int | None, OnClose | None]]
_installed = weakref.WeakKeyDictionary()
_open_jobs: ContextVar[tuple[_OpenJob, ...]] = ContextVar("perrequest.celery.jobs", default=())


@explains_options("install()")
def install(
    app: Any, *, max_entries: int | None = DEFAULT_MAX_ENTRIES, on_close: OnClose | None = None
) -> None:
    """Give every task of ``app`` its own request scope, for each run.

    Call it once, where the app is created and before a worker starts.
    Tasks based on ``ScopedTask`` keep their own options.

    Args:
        app: The Celery app.
        max_entries: The bound of each run's store; ``None``: unbounded.
        on_close: Called with each run's ``ScopeStats`` as its scope closes.

    Raises:
        RuntimeError: ``install`` was already called on this app.
        TypeError: An unknown option or a bad value.
        ValueError: ``max_entries`` zero or negative.
    """
    if not isinstance(app, Celery):
        raise TypeError(
            f"perrequest.celery.install() takes a Celery app, not {type(app).__name__} {app!r}"
        )
    options = check_options("perrequest.celery.install", max_entries, on_close)
    if app in _installed:
        raise RuntimeError(
            f"perrequest is already installed on Celery app {app.main!r}; call "
            "perrequest.celery.install() once, where the app is created"
        )
    _installed[app] = options
    task_prerun.connect(_open_job_scope, weak=False, dispatch_uid="perrequest.celery.prerun")
    task_postrun.connect(_close_job_scope, weak=False, dispatch_uid="perrequest.celery.postrun")


def _open_job_scope(sender: Any = None, task_id: str = "", **_: Any) -> None:
    options = None if sender is None else _installed.get(sender.app)
    if options is None:
        return
    if not sender.request.is_eager:
        _drop_leftovers()
    if isinstance(sender, ScopedTask):  # its __call__ opens its scope
        return
    before = _current.get()
    job = _OpenJob(task_id, open_scope(*options), before)
    _open_jobs.set((*_open_jobs.get(), job))


def _drop_leftovers() -> None:
    """Before a worker's run of a task (not ``apply()``): a worker runs one task at a time
    per thread, never inside a scope, so whatever is open or active here was left by an
    earlier run cut short as its scope opened or closed, by an exception a signal handler
    raised (the soft time limit's): Celery logs a receiver's exception and goes on."""
    active = _current.get()
    while type(active) is MemoStore and not active.closed:  # innermost first, as in order
        close_scope(active)
        active = _current.get()
    for job in reversed(_open_jobs.get()):
        close_scope(job.store)
    _open_jobs.set(())
    if _current.get() is not None:
        _current.set(None)


def _close_job_scope(sender: Any = None, task_id: str = "", **_: Any) -> None:
    if isinstance(sender, ScopedTask):  # none was opened for it (a replace() in eager mode
        return  # runs its replacement under the replaced task's id: that task's job stays)
    jobs = _open_jobs.get()
    # The innermost run first; a postrun without its prerun finds nothing and does nothing.
    for index in range(len(jobs) - 1, -1, -1):
        if jobs[index].task_id == task_id:
            break
    else:
        return
    _open_jobs.set(jobs[:index])
    try:
        for job in reversed(jobs[index:]):
            close_scope(job.store)
    finally:
        _restore(jobs[index].before)
