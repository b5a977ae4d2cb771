"""What a module built on an optional package says when that package is missing: the
extra to install (``pip install 'perrequest[prometheus]'``), not a bare
``ModuleNotFoundError``."""

from __future__ import annotations

from typing import NoReturn


def missing_extra(
    exc: ImportError, module: str, extra: str, *packages: str, also: str = ""
) -> NoReturn:
    """Raise ``exc`` again: as a ``ModuleNotFoundError`` naming the extra (and ``also``,
    another extra's use) when the module not found is one of ``packages`` (or inside one);
    anything else (a package too old to have a name, a broken install) as it is."""
    missing = (exc.name or "").partition(".")[0]
    if isinstance(exc, ModuleNotFoundError) and missing in packages:
        raise ModuleNotFoundError(
            f"{module} needs {missing}, which is not installed ({exc}). Install it with: "
            f"pip install 'perrequest[{extra}]'{also}",
            name=exc.name,
        ) from exc
    raise exc
