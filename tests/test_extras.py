"""A module of an optional extra imported without its package says which extra to
install: ``import perrequest.prometheus`` without prometheus_client was a bare
``ModuleNotFoundError`` (a newcomer's review). Each import runs in a child process
where the package is made unimportable (``sys.modules[name] = None``): nothing is
uninstalled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = """
import sys
sys.modules[{package!r}] = None  # as if it were not installed
try:
    import {module}
except ModuleNotFoundError as exc:
    cause = exc.__cause__
    print(type(cause).__name__, getattr(cause, "name", None), exc.name)
    print(exc)
else:
    print("imported")
"""


@pytest.mark.parametrize(
    ("module", "package", "extra"),
    [
        ("perrequest.prometheus", "prometheus_client", "prometheus"),
        ("perrequest.otel", "opentelemetry", "otel"),
        ("perrequest.redis", "redis", "redis"),
        ("perrequest.celery", "celery", "celery"),
        ("perrequest.flask", "flask", "flask"),
        ("perrequest.django", "django", "django"),
        ("perrequest.django.toolbar", "debug_toolbar", "toolbar"),
        # Without Django the toolbar's import stops in perrequest.django: the toolbar's
        # extra is named there too (it named [django] alone, then [toolbar] once installed).
        ("perrequest.django.toolbar", "django", "toolbar"),
    ],
)
def test_a_missing_optional_package_names_the_extra_to_install(
    module: str, package: str, extra: str
) -> None:
    pytest.importorskip(package)  # installed here; the child hides it
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(module=module, package=package)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cause, message = done.stdout.strip().split("\n", 1)
    kind, name, name_too = cause.split()  # raised `from` the original, with its name
    assert kind == "ModuleNotFoundError" and name == name_too
    assert name.partition(".")[0] == package
    needs = "perrequest.django" if package == "django" else module
    assert message.startswith(f"{needs} needs {package}, which is not installed ("), message
    install = f"Install it with: pip install 'perrequest[{extra}]'"
    if needs == "perrequest.django":
        install = "Install it with: pip install 'perrequest[django]' ('perrequest[toolbar]' "
        install += "for its toolbar)"
    assert message.endswith(install), message


def test_an_import_error_that_is_not_a_missing_package_is_left_as_it_is() -> None:
    """A package too old to have a name (``ImportError: cannot import name``) is not
    "not installed": its own error goes through, unchanged."""
    from perrequest._extras import missing_extra

    old = ImportError("cannot import name 'Collector'", name="prometheus_client")
    with pytest.raises(ImportError) as info:
        missing_extra(old, "perrequest.prometheus", "prometheus", "prometheus_client")
    assert info.value is old
    other = ModuleNotFoundError("No module named 'six'", name="six")
    with pytest.raises(ModuleNotFoundError) as info:
        missing_extra(other, "perrequest.prometheus", "prometheus", "prometheus_client")
    assert info.value is other
