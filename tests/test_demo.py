"""``make demo`` end to end: real uvicorn servers, real memory, and nothing left running.

The demo's whole point is that the naive memo grows and the perrequest one
does not, so that is asserted on the numbers it measured, not just its exit code.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 3000
MB = 1024 * 1024


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One run of the demo, shared by the tests below (it takes a few seconds)."""
    tmp = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "examples/demo/run.py", "--requests", str(REQUESTS)]
    command += ["--output", str(tmp / "chart.png"), "--json", str(tmp / "summary.json")]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    return result, tmp


def summary(demo: tuple[subprocess.CompletedProcess[str], Path]) -> dict[str, Any]:
    result, tmp = demo
    assert result.returncode == 0, result.stderr
    return dict(json.loads((tmp / "summary.json").read_text()))


def test_prints_the_table_and_the_verdict(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, _ = demo
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["naive", "perrequest"]
    for row in ("requests served", "memory at start", "memory at end", "growth per 100k"):
        assert any(line.startswith(row) for line in lines), row
    assert f"requests served {REQUESTS:,} {REQUESTS:,}" in " ".join(result.stdout.split())
    assert "grows without bound" in result.stdout
    assert "flat" in result.stdout


def test_writes_a_png_chart(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    summary(demo)
    chart = demo[1] / "chart.png"
    data = chart.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_naive_grows_and_perrequest_stays_flat(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    servers = summary(demo)["servers"]
    naive = servers["naive"]["growth_bytes"]
    scoped = servers["perrequest"]["growth_bytes"]
    assert naive > 10 * MB, f"naive grew only {naive / MB:.1f} MB"
    assert naive > 5 * max(scoped, 0.5 * MB), (naive / MB, scoped / MB)
    assert scoped < 5 * MB, f"perrequest grew {scoped / MB:.1f} MB"


def test_memo_works_within_requests_in_both_modes(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    for mode, server in summary(demo)["servers"].items():
        before, after = server["stats_before"], server["stats_after"]
        assert after["computed"] - before["computed"] == REQUESTS, mode
        assert after["calls"] - before["calls"] == 4 * REQUESTS, mode
    servers = summary(demo)["servers"]
    assert servers["naive"]["stats_after"]["memo_entries"] >= REQUESTS
    assert servers["perrequest"]["stats_after"]["memo_entries"] == 0


def test_leaves_no_server_running(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    for mode, server in summary(demo)["servers"].items():
        alive = psutil.pid_exists(server["pid"]) and (
            psutil.Process(server["pid"]).status() != psutil.STATUS_ZOMBIE
        )
        assert not alive, f"the {mode} server (pid {server['pid']}) is still running"
        with pytest.raises(ConnectionRefusedError):  # nothing listens on its port any more
            socket.create_connection(("127.0.0.1", server["port"]), timeout=5).close()
