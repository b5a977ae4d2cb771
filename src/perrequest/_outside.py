"""Calls made outside any scope: the ``outside_scope`` option, one rule for memos and loaders."""

from __future__ import annotations

import logging
import threading

from .errors import NoActiveScope
from .scope import NO_SCOPE_HINT

logger = logging.getLogger("perrequest")

# The test suite's choice for every memo and loader (the pytest plugin's
# perrequest_outside_scope), over each one's own outside_scope.
override: str | None = None
# Names warned about, once each; bounded, like everything here.
warned: set[str] = set()
_WARNED_MAX = 10_000
_warned_lock = threading.Lock()


def refuse_or_warn(decorator: str, name: str, outside_scope: str, what: str, fix: str) -> None:
    """Raise ``NoActiveScope`` or log one WARNING per name, as ``outside_scope`` (or
    the test suite's override) says; nothing for ``"call"``."""
    mode = override or outside_scope
    if mode == "call":
        return
    if mode == "raise":
        raise NoActiveScope(
            f"@{decorator} {name} was called outside a request scope "
            f"(outside_scope='raise'). {NO_SCOPE_HINT}"
        )
    if name in warned:
        return
    with _warned_lock:
        if name in warned or len(warned) >= _WARNED_MAX:
            return
        warned.add(name)
    logger.warning(
        "perrequest: %s was called outside a request scope, so nothing was %s (logged "
        "once per function). %s To call it uncached on purpose, use "
        "@%s(outside_scope='call').",
        name,
        what,
        fix,
        decorator,
    )
