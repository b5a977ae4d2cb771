"""The memoized lookup shared by middleware, views and templates, and the on_close recorder."""

from __future__ import annotations

import itertools
from typing import Any

import perrequest
from perrequest import ScopeStats, request_memo

CLOSED: list[ScopeStats] = []
"""Stats of every store the middleware closed in this process (ON_CLOSE in settings)."""

_tokens = itertools.count(1)


def record_close(stats: ScopeStats) -> None:
    CLOSED.append(stats)


@request_memo
def lookup(user: str) -> str:
    """An "expensive" lookup: every real call returns a new token and counts itself."""
    perrequest.set("lookups", perrequest.get("lookups", 0) + 1)
    return f"{user}-{next(_tokens)}"


@request_memo
def who() -> Any:
    """Memoized read of this request's value: a shared store would hand out another's."""
    return perrequest.get("value")


def lookup_context(request: Any) -> dict[str, str]:
    """Context processor: the template sees the same memoized lookup."""
    return {"lookup": lookup("alice")}
