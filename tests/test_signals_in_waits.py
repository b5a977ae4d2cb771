"""Signals whose handlers raise (Celery's soft time limit, a KeyboardInterrupt), timed at
random microseconds, while threads wait for one another's computations: nobody is
stranded. Each run is a process of its own (tests/signal_waits.py), so that a stranded
thread fails the test instead of hanging the suite.

Until 8 December 2026 single-flight waited on ``concurrent.futures.Future``, whose every
method takes a ``Condition`` with a Python ``__enter__``: a signal there left its lock held
for good (cpython#148874), and the computing thread blocked in ``set_result`` with the
store's lock held (a shared tier's: every request). These runs stranded it within 300 to
700 rounds; a probe's saw it in every run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("signal_waits.py")


@pytest.mark.slow  # five seconds of rounds each
@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="needs setitimer")
@pytest.mark.parametrize(
    ("mode", "signal"),
    [("sync", "Soft"), ("sync", "Exception"), ("batch", "BaseException"), ("shared", "Soft")],
)
def test_signals_at_random_moments_of_single_flight_strand_no_thread(
    mode: str, signal: str
) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "5", mode, signal],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "no thread stranded" in done.stdout, (
        done.stdout[-2000:] + done.stderr[-2000:]
    )
