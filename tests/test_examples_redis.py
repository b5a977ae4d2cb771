"""The Redis tier examples under real servers with several worker processes: FastAPI
under uvicorn --workers 4, Django under gunicorn --workers 4, one real redis-server.
Concurrent requests spread over the workers all get the value one worker computed."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from servers import HOST, free_port, serve_gunicorn, serve_subprocess

pytestmark = pytest.mark.timeout(120)


def _spread(base: str, path: str, rounds: int = 60, concurrent: int = 16) -> list[dict[str, Any]]:
    """Concurrent requests, round after round, until at least two workers have answered.

    A new connection per request: a kept-alive one stays with the worker that
    accepted it, and one busy worker can accept them all.
    """
    answers: list[dict[str, Any]] = []
    limits = httpx.Limits(max_keepalive_connections=0)
    with (
        ThreadPoolExecutor(concurrent) as pool,
        httpx.Client(base_url=base, timeout=30, limits=limits) as http,
    ):
        for _ in range(rounds):
            responses = list(pool.map(lambda _: http.get(path), range(concurrent)))
            assert all(r.status_code == 200 for r in responses), responses[0].text
            answers += [r.json() for r in responses]
            if len({a["served_by"] for a in answers}) >= 2:
                break
            time.sleep(0.05)  # let the other workers come back to accept()
    return answers


def _stats_of(base: str, pid: int) -> dict[str, Any]:
    """The /stats of the worker ``pid``: asked on new connections until it answers."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base, timeout=30, limits=limits) as http:
        for _ in range(400):
            stats: dict[str, Any] = http.get("/stats").json()
            if stats["worker"] == pid:
                return stats
    raise AssertionError(f"worker {pid} never answered /stats")


def test_fastapi_under_uvicorn_workers_fetches_the_rate_once(redis_server: Any) -> None:
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "examples.redis_tier:app", "--host", HOST,
        "--port", str(port), "--workers", "4", "--log-level", "warning",
    ]  # fmt: skip
    with serve_subprocess(argv, port, env={"REDIS_URL": redis_server.url}) as base:
        answers = _spread(base, "/convert/EUR?amount=20")
        rates = sorted({(a["rate"]["fetched_at"], a["rate"]["fetched_by"]) for a in answers})
        later = {pid: _stats_of(base, pid) for _, pid in rates[1:]}
    assert len({a["served_by"] for a in answers}) >= 2  # several processes answered
    # All of them got the one value fetched once; or a worker that fetched it again
    # failed to reach Redis (a machine so loaded that an operation took op_timeout):
    # failing open, as documented, is the only way a second fetch may happen.
    assert all(stats["errors"] or stats["lock_timeouts"] for stats in later.values()), later
    assert all(a["amount"] == 18.4 and a["fee"] == 0.18 for a in answers)
    with redis_server.client() as client:
        keys = [k.decode() for k in client.scan_iter()]
        assert len(keys) == 1 and keys[0].startswith("example:examples.redis_tier.exchange_rate:1:")
        assert 0 < client.ttl(keys[0]) <= 60


def test_django_under_gunicorn_workers_quotes_once(redis_server: Any) -> None:
    env = {"REDIS_URL": redis_server.url}
    with serve_gunicorn("examples.redis_tier_django:application", workers=4, env=env) as base:
        answers = _spread(base, "/quote/FR")
        stats = httpx.get(f"{base}/stats", timeout=30).json()
    assert len({a["served_by"] for a in answers}) >= 2
    quotes = {(a["quote"]["quoted_by"], a["quote"]["quoted_at"]) for a in answers}
    assert len(quotes) == 1 and all(a["same"] for a in answers)
    assert stats["errors"] == 0
    with redis_server.client() as client:
        keys = [k.decode() for k in client.scan_iter()]
        assert len(keys) == 1 and ":examples.redis_tier_django.shipping_quote:2:" in keys[0]
