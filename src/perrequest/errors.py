"""Exceptions raised by perrequest. Each names what went wrong and what to do."""

from __future__ import annotations

__all__ = ["NoActiveScope", "PerRequestError", "ScopeClosed", "UnhashableArguments"]


class PerRequestError(Exception):
    """Base class of every error perrequest raises on purpose."""


class NoActiveScope(PerRequestError, LookupError):
    """Raised when code needs a request scope and none is active."""


class ScopeClosed(PerRequestError, RuntimeError):
    """Raised on a write to a store whose scope has ended."""


class UnhashableArguments(PerRequestError, TypeError):
    """Raised when a memoized call's arguments cannot form a cache key."""
