"""DESIGN.md's layout, pinned: small modules, a core that imports no framework, and no
reading of the interpreter's frames.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = sorted((SRC / "perrequest").rglob("*.py"))
LONGEST = 350  # "each readable in one sitting (<= 350 lines)"
REASON = "Over 350 lines:"  # what a longer module's docstring must say, and why


def test_every_module_is_readable_in_one_sitting_or_says_why_not() -> None:
    too_long = []
    for path in MODULES:
        text = path.read_text()
        if len(text.splitlines()) > LONGEST and REASON not in (
            ast.get_docstring(ast.parse(text)) or ""
        ):
            too_long.append(f"{path.relative_to(SRC)}: {len(text.splitlines())} lines")
    assert not too_long, too_long
    assert len(MODULES) > 20  # the glob found the package


def test_the_core_imports_no_framework_nor_optional_dependency() -> None:
    optional = ["starlette", "fastapi", "django", "flask", "werkzeug", "celery", "redis",
                "opentelemetry", "prometheus_client", "cachetools"]  # fmt: skip
    code = (
        "import sys\n"
        "import perrequest, perrequest.asgi, perrequest.wsgi, perrequest.testing\n"
        f"print(sorted(m for m in {optional!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_reads_the_callers_frames() -> None:
    """Scope objects are single-use: nothing needs to know who entered them. (Only the
    collector hook in ``_active`` looks at a frame, the one a collection interrupted;
    ``_signals`` tells Celery's soft time limit by type, reading no frame.)"""
    for path in MODULES:
        text = path.read_text()
        for banned in ("sys._getframe", "f_locals"):
            assert banned not in text, f"{path.relative_to(SRC)} uses {banned}"
    signals = (SRC / "perrequest" / "_signals.py").read_text()
    for banned in ("f_back", "f_code", "tb_frame", "tb_next", "__traceback__", "inspect"):
        assert banned not in signals, f"_signals reads frames: {banned}"


def test_the_license_the_metadata_names_ships_with_its_text() -> None:
    """pyproject.toml said MIT with no license file anywhere: MIT's notice must go with
    every copy (a packaging probe). hatchling ships a root LICENSE as License-File."""
    import tomllib

    root = SRC.parent
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"]
    text = (root / "LICENSE").read_text()
    assert declared == "MIT" and text.startswith("MIT License\n")
    assert "The above copyright notice and this permission notice shall be included" in text
