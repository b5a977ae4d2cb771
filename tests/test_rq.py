"""RQ (Redis Queue) jobs decorated with ``@request_scope()``, run by RQ's own worker
against a real redis-server: a store per run of a job, nothing left open after it
(docs/workers.md, "RQ"). RQ's job timeout is told by type: test_guards_cleanup_signals."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import rq_jobs
from rq import Queue, SimpleWorker, Worker

from perrequest.testing import live_scopes


@pytest.mark.parametrize("worker", [SimpleWorker, Worker], ids=["simple", "forking"])
def test_each_run_of_an_rq_job_has_a_store_of_its_own(redis_server: Any, worker: Any) -> None:
    """In RQ's forking worker each job runs in a child (its work horse); the job's result
    says what its store held, the parent's list stays empty there."""
    rq_jobs.computed.clear()
    with redis_server.client() as connection:
        queue = Queue("digests", connection=connection)
        first = queue.enqueue(rq_jobs.send_digest, [1, 2, 1])
        second = queue.enqueue(rq_jobs.send_digest, [1])
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            assert worker([queue], connection=connection).work(burst=True)
        finally:  # RQ's worker installs its own and leaves them
            for number, handler in handlers.items():
                signal.signal(number, handler)
        assert first.get_status(refresh=True) == "finished", first.exc_info
        assert second.get_status(refresh=True) == "finished", second.exc_info
        assert (first.return_value(), second.return_value()) == (2, 1)
    # In this process once per user per run; the forking worker's jobs ran in children.
    assert rq_jobs.computed == ([1, 2, 1] if worker is SimpleWorker else [])
    assert live_scopes() == 0
