"""Celery: ScopedTask scopes chosen tasks, with options per task.

Run it: `python celery_scoped_task.py`
"""

import perrequest
from celery import Celery
from perrequest import ScopeStats
from perrequest.celery import ScopedTask

app = Celery("reports")
log: list[ScopeStats] = []


def log_stats(stats: ScopeStats) -> None:
    log.append(stats)


@app.task(base=ScopedTask)
def rebuild_report(report_id: int) -> int | None:
    return perrequest.current_store().max_entries  # 10_000, the default


@app.task(
    base=ScopedTask, perrequest_max_entries=100, perrequest_on_close=log_stats
)
def small_job() -> int | None:
    return perrequest.current_store().max_entries


class AuditedTask(ScopedTask):  # or subclass it
    perrequest_max_entries = 5_000
    perrequest_on_close = staticmethod(log_stats)  # or a plain function


@app.task(base=AuditedTask)
def audited_job() -> int | None:
    return perrequest.current_store().max_entries


if __name__ == "__main__":
    assert rebuild_report.apply(args=(7,)).get() == 10_000
    assert rebuild_report(7) == 10_000  # a direct call is scoped too
    assert small_job.apply().get() == 100
    assert audited_job.apply().get() == 5_000
    assert len(log) == 2  # small_job and audited_job closed their scopes
    assert not perrequest.in_request_scope()
