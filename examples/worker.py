"""A worker that processes jobs, one request scope per job, and prints each scope's stats.

Run it: ``python examples/worker.py``. Every job looks up the
same few customers several times; the lookup is memoized per job, so it runs
once per customer per job, and nothing is left behind when the job ends.
"""

from __future__ import annotations

import random
import time

import perrequest
from perrequest import ScopeStats, request_memo, request_scope
from perrequest.testing import assert_no_live_scopes, live_scopes

LOOKUPS = 0


@request_memo
def load_customer(customer_id: int) -> dict[str, object]:
    """Stands in for a database query."""
    global LOOKUPS
    LOOKUPS += 1
    time.sleep(0.001)
    return {"id": customer_id, "name": f"customer-{customer_id}"}


def report(stats: ScopeStats) -> None:
    print(
        f"  scope closed: {stats.hits} hits, {stats.misses} misses, "
        f"{stats.entries} entries, {stats.duration_s * 1000:.1f} ms"
    )


@request_scope(on_close=report)
def process_job(job_id: int, customer_ids: list[int]) -> float:
    total = 0.0
    for customer_id in customer_ids:
        customer = load_customer(customer_id)
        total += len(str(customer["name"]))
    perrequest.set("job_id", job_id)
    return total


def main() -> None:
    rng = random.Random(42)
    calls = 0
    for job_id in range(5):
        customers = [rng.randrange(3) + job_id * 10 for _ in range(12)]
        calls += len(customers)
        print(f"job {job_id}: {len(customers)} lookups of {len(set(customers))} customers")
        process_job(job_id, customers)
    print(f"{calls} calls, {LOOKUPS} real lookups; open scopes now: {live_scopes()}")
    assert_no_live_scopes()


if __name__ == "__main__":
    main()
