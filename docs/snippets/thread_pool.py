"""A thread pool: one scope per job, in whichever thread runs it.

Run it: `python thread_pool.py`
"""

from concurrent.futures import ThreadPoolExecutor

from perrequest import in_request_scope, request_memo, request_scope

loads: list[int] = []  # a stub database: it counts its loads


@request_memo
def load_account(account_id: int) -> int:
    loads.append(account_id)
    return account_id * 100


@request_scope()
def run_job(accounts: list[int]) -> int:
    return sum(load_account(a) for a in accounts)


if __name__ == "__main__":
    jobs = [[1, 1, 2], [2, 2], [1]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(run_job, jobs)) == [400, 400, 100]
        # The pool's threads hold no store between jobs.
        assert not any(pool.map(lambda _: in_request_scope(), range(8)))
    assert sorted(loads) == [1, 1, 2, 2]  # once per account per job
