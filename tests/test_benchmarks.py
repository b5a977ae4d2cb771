"""Smoke tests: each benchmark script runs with --quick and prints its tables.

No timing is asserted: the numbers depend on the machine. The full runs and their
results are in docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_quick(script: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.timeout(150)
def test_hit_cost_quick(tmp_path: Path) -> None:
    stdout, results = run_quick("hit_cost.py", tmp_path)
    for header in ("## f(1)", "## g(1, 2, c=3)", "## await h(1)", "hit ns", "miss ns"):
        assert header in stdout
    for row in ("perrequest.request_memo", "minimal memo", "functools.lru_cache"):
        assert row in stdout
    assert "ours / minimal memo" in stdout
    assert "cachetools / ours" in stdout
    assert set(results["cases"]) == {"f(1)", "g(1, 2, c=3)", "await h(1)"}


@pytest.mark.timeout(150)
def test_middleware_overhead_quick(tmp_path: Path) -> None:
    pytest.importorskip("perrequest.asgi")
    pytest.importorskip("perrequest.wsgi")
    stdout, results = run_quick("middleware_overhead.py", tmp_path)
    for header in ("## ASGI", "## WSGI", "us/request", "x bare"):
        assert header in stdout
    for row in ("bare Starlette", "bare Flask", "perrequest RequestScopeMiddleware"):
        assert row in stdout
    assert set(results["protocols"]) == {"ASGI", "WSGI"}
