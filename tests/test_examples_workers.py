"""The worker examples run on their own, exit 0, and print the per-job stats they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.timeout(90)


def _run(name: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=EXAMPLES.parent,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_celery_worker_example() -> None:
    out = _run("celery_worker.py")
    orders = re.findall(r"^order (\d+): total \d+, (\d+) lookups, (\d+) memo hits$", out, re.M)
    assert sorted(int(order) for order, _, _ in orders) == list(range(6))
    assert all(int(lookups) + int(hits) == 6 for _, lookups, hits in orders)
    assert len(re.findall(r"^  task scope closed: ", out, re.M)) == 6
    assert "6 tasks, 36 calls, 14 real lookups" in out
    assert out.rstrip().endswith("open scopes: 0")


def test_asyncio_worker_example() -> None:
    out = _run("asyncio_worker.py")
    jobs = re.findall(r"^consumer-\d job (\d+): 12 calls, (\d) fetches, (\d+) memo hits", out, re.M)
    assert sorted(int(job) for job, _, _ in jobs) == list(range(12))
    assert all(int(fetches) + int(hits) == 12 for _, fetches, hits in jobs)
    assert "12 jobs, 30 real fetches; open scopes: 0" in out


def test_thread_pool_example() -> None:
    out = _run("thread_pool.py")
    jobs = re.findall(r"^job (\d+): (\d) queries, (\d) memo hits", out, re.M)
    assert [int(job) for job, _, _ in jobs] == list(range(9))
    assert jobs[:8] == [(str(j), "3", "4") for j in range(8)]
    assert jobs[8] == ("8", "2", "4")  # the fan-out job: helper threads shared its store
    assert "9 jobs, 26 real queries; pool threads still in a scope: 0" in out
    assert out.rstrip().endswith("open scopes: 0")


def test_simple_worker_example() -> None:
    out = _run("worker.py")
    closed = re.findall(r"^  scope closed: (\d+) hits, (\d+) misses, (\d+) entries", out, re.M)
    assert len(closed) == 5
    # 12 lookups of 3 customers per job: 3 computed, 9 from the memo, plus the job_id entry.
    assert all(c == ("9", "3", "4") for c in closed)
    assert "60 calls, 15 real lookups; open scopes now: 0" in out
