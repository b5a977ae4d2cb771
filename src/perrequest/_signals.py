"""Telling Celery's soft time limit (billiard's SIGUSR1 handler raises
``SoftTimeLimitExceeded``, an ``Exception``; Celery's is the same class) from the failure
of the code it interrupted, where perrequest catches that code's failures (listeners, keys'
hashes, error copies, Redis values, batches): it is the task's, and goes on. Told by type:
any other signal handler's ``Exception`` is taken for a failure of the code it interrupted,
as Python's own ``logging`` and ``atexit`` take it. Looked up, never imported (the core
imports no framework): if billiard was never imported, no soft time limit can come."""

from __future__ import annotations

import sys


def is_soft_time_limit(exc: BaseException) -> bool:
    """Whether ``exc`` is billiard's (Celery's) ``SoftTimeLimitExceeded``."""
    limit = getattr(sys.modules.get("billiard.exceptions"), "SoftTimeLimitExceeded", None)
    return limit is not None and isinstance(exc, limit)  # (none while billiard is importing)
