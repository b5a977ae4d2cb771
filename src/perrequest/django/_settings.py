"""``settings.PERREQUEST``, read and checked when the middleware is made: a bad key or
value raises ``ImproperlyConfigured`` naming it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from difflib import get_close_matches
from types import ModuleType

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .._active import OnClose
from .._checks import check_max_entries, check_on_close
from ..store import DEFAULT_MAX_ENTRIES

_KEYS = ("MAX_ENTRIES", "ON_CLOSE")
_ALIASES = {"MAXSIZE": "MAX_ENTRIES", "MAX_SIZE": "MAX_ENTRIES"}  # functools', cachetools' name


def read_settings() -> tuple[int | None, OnClose | None]:
    """``settings.PERREQUEST``, validated; ``ImproperlyConfigured`` names the bad key."""
    options = getattr(settings, "PERREQUEST", None)
    if options is None:
        return DEFAULT_MAX_ENTRIES, None
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            f"settings.PERREQUEST must be a dict with the keys {', '.join(_KEYS)}, "
            f"not {type(options).__name__} {options!r}"
        )
    for key in options:
        if key not in _KEYS:
            name = str(key).upper()
            close = _ALIASES.get(name) or next(iter(get_close_matches(name, _KEYS, n=1)), None)
            hint = f" Did you mean {close!r}?" if close else ""
            raise ImproperlyConfigured(
                f"settings.PERREQUEST has an unknown key {key!r}; the valid keys are "
                f"{', '.join(_KEYS)}.{hint}"
            )
    try:
        max_entries = options.get("MAX_ENTRIES", DEFAULT_MAX_ENTRIES)
        max_entries = check_max_entries(max_entries, 'settings.PERREQUEST["MAX_ENTRIES"]')
    except (TypeError, ValueError) as exc:
        raise ImproperlyConfigured(
            f"{exc} (None means unbounded; leave the key out for the default, "
            f"{DEFAULT_MAX_ENTRIES})"
        ) from exc
    value = options.get("ON_CLOSE")
    if isinstance(value, str):
        path = value
        try:
            value = _import(path)
        except Exception as exc:  # ImportError, or whatever the module raised on import
            raise ImproperlyConfigured(
                f'settings.PERREQUEST["ON_CLOSE"] is the dotted path {path!r}, which cannot '
                f"be imported: {exc}"
            ) from exc
        if isinstance(value, ModuleType):
            raise ImproperlyConfigured(
                f'settings.PERREQUEST["ON_CLOSE"] is the dotted path of the module {path!r}, '
                "not of a callable: name the function in it"
            )
    try:
        return max_entries, check_on_close(value, 'settings.PERREQUEST["ON_CLOSE"]')
    except TypeError as exc:  # says what is wrong with it: not callable, async, arguments
        if isinstance(options.get("ON_CLOSE"), str):
            hint = f" ({options['ON_CLOSE']!r} names that object)"
        else:
            hint = "" if callable(value) else " (or a dotted path to one)"
        raise ImproperlyConfigured(f"{exc}{hint}") from exc


def _import(path: str) -> object:
    """What ``path`` names; a module too (a submodule not imported yet). A name its module
    lacks is the error told, with the closest name there (a misspelt function's)."""
    try:
        return import_string(path)
    except ImportError as missing:
        try:
            return importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name != path:  # a module on the way, or one it imports
                raise
        module, _, name = path.rpartition(".")
        close = get_close_matches(
            name, dir(sys.modules[module]) if module in sys.modules else [], n=1
        )
        hint = f"; did you mean {module}.{close[0]}?" if close else ""
        raise ImportError(f"{missing}{hint}") from missing
