"""Telling a task runner's time limit from the failure of the code it interrupted, where
perrequest catches that code's failures (listeners, keys' hashes, error copies, Redis
values, batches): it is the task's, and goes on. Celery's soft time limit (billiard's
SIGUSR1 handler raises ``SoftTimeLimitExceeded``, an ``Exception``; Celery's is the same
class) and RQ's job timeout (its SIGALRM handler raises ``JobTimeoutException``). Told by
type: any other signal handler's ``Exception`` is taken for a failure of the code it
interrupted, as Python's own ``logging`` and ``atexit`` take it. Looked up, never imported
(the core imports no framework): a runner never imported raises no time limit."""

from __future__ import annotations

import sys

# (module, class): the exceptions task runners raise from a signal handler to stop a task.
_TIME_LIMITS = (
    ("billiard.exceptions", "SoftTimeLimitExceeded"),
    ("rq.timeouts", "JobTimeoutException"),
)


def is_time_limit(exc: BaseException) -> bool:
    """Whether ``exc`` is a task runner's time limit (Celery's, RQ's)."""
    for module, name in _TIME_LIMITS:
        limit = getattr(sys.modules.get(module), name, None)  # (none while importing)
        if limit is not None and isinstance(exc, limit):
            return True
    return False
