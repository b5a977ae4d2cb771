"""A ThreadPoolExecutor worker: one request scope per job, and a job that fans out.

Run it: ``python examples/thread_pool.py``. Needs nothing but perrequest.

Each job runs in a pool thread inside ``@request_scope()``, so its memo
entries are its own and are freed when it returns; the pool's threads are
reused, and the next job on a thread starts with no store. One job also fans
its lookups out to a second pool: ``ThreadPoolExecutor.submit`` does not copy
the context, so the fanned-out function is wrapped with ``bind_scope`` to
share the job's store (and its single-flight).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import perrequest
from perrequest import ScopeStats, bind_scope, current_store, request_memo, request_scope
from perrequest.testing import assert_no_live_scopes, live_scopes

_lock = threading.Lock()
QUERIES = 0


@request_memo
def load_account(account_id: int) -> dict[str, object]:
    """Stands in for a database query."""
    global QUERIES
    with _lock:
        QUERIES += 1
    time.sleep(0.003)
    return {"id": account_id, "job": perrequest.get("job")}


@request_scope(max_entries=1_000)
def run_job(job_id: int, account_ids: list[int]) -> ScopeStats:
    """A job: every account it loads is loaded once, then read from its store."""
    perrequest.set("job", job_id)
    accounts = [load_account(account_id) for account_id in account_ids]
    assert all(account["job"] == job_id for account in accounts), "cross-talk between jobs"
    return current_store().stats


@request_scope()
def run_fan_out_job(job_id: int, account_ids: list[int]) -> ScopeStats:
    """A job that loads its accounts from several threads, all sharing its store."""
    perrequest.set("job", job_id)
    with ThreadPoolExecutor(max_workers=4) as helpers:
        accounts = list(helpers.map(bind_scope(load_account), account_ids))
    assert all(account["job"] == job_id for account in accounts), "a helper missed the store"
    return current_store().stats


def main() -> None:
    jobs = {job_id: [job_id % 3, 10, 11, 10, 11, job_id % 3, 10] for job_id in range(8)}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {job_id: pool.submit(run_job, job_id, ids) for job_id, ids in jobs.items()}
        futures[len(jobs)] = pool.submit(run_fan_out_job, len(jobs), [20, 21, 20, 21, 20, 21])
        for job_id, future in futures.items():
            stats = future.result()
            print(
                f"job {job_id}: {stats.misses} queries, {stats.hits} memo hits, "
                f"{stats.entries} entries"
            )
        leftover = sum(pool.map(lambda _: perrequest.in_request_scope(), range(9)))
    print(f"{len(futures)} jobs, {QUERIES} real queries; pool threads still in a scope: {leftover}")
    print(f"open scopes: {live_scopes()}")
    assert leftover == 0
    assert_no_live_scopes()


if __name__ == "__main__":
    main()
