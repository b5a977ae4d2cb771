"""An ``on_close`` that tries to reach the store where it runs, for the tests that check it
runs with none active (docs/semantics.md, "When a scope closes")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import perrequest
from perrequest import ScopeStats


def writing_on_close(seen: list[Any]) -> Callable[[ScopeStats], None]:
    """Appends to ``seen`` whether a store is active, then the error a write raised."""

    def on_close(stats: ScopeStats) -> None:
        seen.append(perrequest.in_request_scope())
        try:
            perrequest.set("leaked", "from the request's on_close")
        except perrequest.PerRequestError as exc:
            seen.append(type(exc).__name__)

    return on_close
