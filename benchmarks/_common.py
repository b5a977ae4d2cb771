"""What the benchmark scripts share: how a run describes itself and saves its results."""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any


def meta(**extra: Any) -> dict[str, Any]:
    """When and where a run was made, for its JSON results."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": f"{platform.system()} {platform.machine()}",
        "cpus": os.cpu_count(),
        **extra,
    }


def ratio(samples: dict[str, list[float]], top: str, bottom: str) -> float | None:
    """Median over rounds of top/bottom, measured in the same round."""
    if top not in samples or bottom not in samples:
        return None
    return statistics.median(t / b for t, b in zip(samples[top], samples[bottom], strict=True))


def write_json(results: dict[str, Any], path: str | None) -> None:
    """Write the results to ``path`` (the scripts' ``--json``), if given."""
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
        print(f"wrote {path}")


def arguments(doc: str | None, rounds: bool = True) -> argparse.ArgumentParser:
    """The options every script takes: ``--quick``, ``--json PATH`` and ``--rounds N``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few short rounds (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    if rounds:
        parser.add_argument("--rounds", type=int, help="override the number of rounds")
    return parser


def callgrind(script: str, *args: str, cwd: str | None = None) -> int:
    """The instructions ``python script args...`` executes, counted by callgrind. With a
    fixed hash seed and no address randomisation (``setarch -R``, where there is one):
    otherwise dict and context layouts, hence counts, drift by thousands between runs.
    Its bytecode is compiled first, uncounted, into a cache of this process's own: two
    counts that differ by a compilation (another process writing the checkout's
    ``__pycache__`` between them, as the tests' children do) would make no sense."""
    setarch = ["setarch", "-R"] if shutil.which("setarch") else []
    argv = [*setarch, "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    argv += [sys.executable, script, *args]
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPYCACHEPREFIX": _bytecode_cache()}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run(
        argv[argv.index(sys.executable) :], capture_output=True, check=True, cwd=cwd, env=env
    )
    run = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=cwd, env=env)
    found = re.search(r"Collected : (\d+)", run.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no total:\n{run.stderr[-2000:]}")
    return int(found.group(1))


_CACHE: list[str] = []


def _bytecode_cache() -> str:
    """A bytecode cache directory for this process's counted children, removed at exit."""
    if not _CACHE:
        _CACHE.append(tempfile.mkdtemp(prefix="perrequest-bench-pycache-"))
        atexit.register(shutil.rmtree, _CACHE[0], True)
    return _CACHE[0]
