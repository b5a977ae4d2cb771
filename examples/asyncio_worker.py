"""An asyncio queue consumer that handles each job in its own request scope.

Run it: ``python examples/asyncio_worker.py``. Needs nothing but perrequest.

Four consumers take jobs from an ``asyncio.Queue``. Each job fetches the same
few users several times, some of them concurrently; the fetch is memoized
per job, so concurrent awaits of one user share a single fetch
(single-flight), later ones are hits, and the job's entries are freed the
moment it ends. A module-level dict used as the memo would instead keep
every user ever fetched for the life of the process.
"""

from __future__ import annotations

import asyncio

import perrequest
from perrequest import ScopeStats, current_store, request_memo, request_scope
from perrequest.testing import assert_no_live_scopes, live_scopes

FETCHES = 0


@request_memo
async def fetch_user(user_id: int) -> dict[str, object]:
    """Stands in for an HTTP call or a database query."""
    global FETCHES
    FETCHES += 1
    await asyncio.sleep(0.005)
    return {"id": user_id, "job": perrequest.get("job")}


@request_scope(max_entries=1_000)
async def handle(job_id: int, user_ids: list[int]) -> ScopeStats:
    """One job: its scope opens when it starts and closes when it returns or raises."""
    perrequest.set("job", job_id)
    users = await asyncio.gather(*(fetch_user(user_id) for user_id in user_ids))
    users += [await fetch_user(user_id) for user_id in user_ids]
    assert all(user["job"] == job_id for user in users), "a job saw another job's entry"
    return current_store().stats


async def consumer(name: str, queue: asyncio.Queue[tuple[int, list[int]] | None]) -> None:
    while (job := await queue.get()) is not None:
        job_id, user_ids = job
        stats = await handle(job_id, user_ids)
        print(
            f"{name} job {job_id}: {2 * len(user_ids)} calls, {stats.misses} fetches, "
            f"{stats.hits} memo hits, {stats.entries} entries"
        )


async def main() -> None:
    queue: asyncio.Queue[tuple[int, list[int]] | None] = asyncio.Queue()
    consumers = [asyncio.create_task(consumer(f"consumer-{i}", queue)) for i in range(4)]
    jobs = 12
    for job_id in range(jobs):
        queue.put_nowait((job_id, [job_id % 4, 1, 2, 1, job_id % 4, 2]))
    for _ in consumers:
        queue.put_nowait(None)
    await asyncio.gather(*consumers)
    print(f"{jobs} jobs, {FETCHES} real fetches; open scopes: {live_scopes()}")
    assert_no_live_scopes()


if __name__ == "__main__":
    asyncio.run(main())
