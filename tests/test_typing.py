"""Type checkers see what @request_memo and @request_batch return: mypy and pyright.

tests/typecheck/good.py uses every form a user writes (function, async function,
method, staticmethod, shared=, the functools-style extras) and must check
cleanly; tests/typecheck/bad.py makes a mistake on each marked line, which both checkers
must report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "typecheck"
ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.slow  # each checker starts in a few seconds


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    # This checkout's src and this interpreter's packages, also from a git worktree
    # (where the editable install points at another checkout, and no .venv is beside).
    if argv[0] == "basedpyright":
        argv = (*argv, "--pythonpath", sys.executable)
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )


def test_mypy_strict_accepts_a_users_module_and_reports_each_mistake() -> None:
    good = _run("mypy", "--strict", str(HERE / "good.py"))
    assert good.returncode == 0, good.stdout
    bad = _run("mypy", "--strict", str(HERE / "bad.py"))
    errors = [line for line in bad.stdout.splitlines() if ": error:" in line]
    assert sorted({int(line.split(":")[1]) for line in errors}) == [
        13,
        14,
        15,
        16,
        17,
        25,
        26,
        35,
        36,
        37,
        46,
        47,
    ], bad.stdout


def test_pyright_accepts_a_users_module_and_reports_each_mistake() -> None:
    good = _run("basedpyright", "--level", "error", str(HERE / "good.py"))
    assert good.returncode == 0, good.stdout
    bad = _run("basedpyright", "--level", "error", str(HERE / "bad.py"))
    errors = [line for line in bad.stdout.splitlines() if " - error:" in line]
    lines = sorted({int(line.split(":")[1]) for line in errors})
    assert lines == [13, 14, 15, 16, 17, 25, 26, 35, 36, 37, 46, 47], bad.stdout
