"""What a scope reports when it closes: ``ScopeStats``, per function ``FunctionStats``.

Counted in ``Counter`` objects as calls happen; made into the immutable stats only
when somebody asks (``store.stats``) or watches (``on_close``, listeners, DEBUG).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, NoReturn, Protocol

from ._checks import check_on_close


class FunctionStats(NamedTuple):
    """One function's counters in one scope.

    Attributes:
        hits: Calls answered from the store (a single-flight waiter counts).
        misses: Calls that computed, also those that raised.
        evictions: Entries of this function evicted to respect a bound.
        compute_s: Seconds spent computing its misses (measured only when
            somebody reads the stats: ``on_close``, a listener, DEBUG logging).
    """

    hits: int
    misses: int
    evictions: int
    compute_s: float


class FunctionsStats(dict[str, FunctionStats]):
    """``ScopeStats.functions``: a read-only dict, so that the stats can be pickled (a
    listener handing them to a queue or a task), deep-copied and ``asdict``-ed, which a
    ``MappingProxyType`` cannot be, and hashed with the rest of the stats."""

    __slots__ = ()

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("ScopeStats.functions is read-only: copy it with dict() to change it")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[type[FunctionsStats], tuple[dict[str, FunctionStats]]]:
        return FunctionsStats, (dict(self),)  # not rebuilt through __setitem__ (copy too)


_NO_STATS: Mapping[str, FunctionStats] = FunctionsStats()


@dataclass(frozen=True, slots=True)
class ScopeStats:
    """An immutable snapshot of one store's counters, what ``on_close`` receives.

    Attributes:
        hits: ``@request_memo`` calls and ``get_or_set`` answered from the store.
        misses: Those that computed (also when the computation raised).
        entries: Entries in the store (at close: just before it was cleared).
        peak_entries: The most entries the store held at once.
        evictions: Entries evicted to respect ``max_entries``.
        duration_s: Seconds since the scope opened (at close: its whole life).
        functions: Each memoized function's ``module.qualname`` mapped to its
            ``FunctionStats``.
    """

    hits: int
    misses: int
    entries: int
    peak_entries: int
    evictions: int
    duration_s: float
    functions: Mapping[str, FunctionStats] = field(default_factory=lambda: _NO_STATS)


def function_name(fn: object) -> str:
    """``module.qualname``: what counters (shared by two functions of one name; entries
    never are), warnings and metric labels go by. Never the ``repr``, which shows a
    ``functools.partial``'s bound arguments: it is named after its function."""
    if isinstance(fn, functools.partial):
        return function_name(fn.func).removesuffix(" (partial)") + " (partial)"
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}" if module else qualname


class Counter:
    """One function's (or the helpers') counts. The clock is read around a computation
    only when ``timed`` (somebody will see the stats): a read costs a sixth of a miss."""

    __slots__ = ("compute_s", "evictions", "hits", "misses", "timed")

    def __init__(self, timed: bool = True) -> None:
        self.hits = self.misses = self.evictions = 0
        self.compute_s = 0.0
        self.timed = timed


class CountsLike(Protocol):
    """What single-flight counts into: a ``Counter``, or a shared tier's own counts."""

    hits: int
    misses: int
    compute_s: float
    timed: bool  # whether to read the clock around computations


# Called with the ScopeStats of every scope that closes (perrequest.add_scope_listener).
listeners: list[Callable[[ScopeStats], object]] = []
_listeners_lock = threading.RLock()  # reentrant: a finalizer may add a listener
_logger = logging.getLogger("perrequest")


def observed() -> bool:  # beyond a scope's own on_close
    return bool(listeners) or _logger.isEnabledFor(logging.DEBUG)


def add_scope_listener(fn: Callable[[ScopeStats], object]) -> None:
    """Call ``fn(stats)`` for every scope that closes in this process, after its
    ``on_close``. A listener that raises is logged, never propagated."""
    if fn is None:
        raise TypeError(
            "add_scope_listener() must be a callable taking ScopeStats, not None. "
            "To stop a listener, call remove_scope_listener(fn) with it."
        )
    fn = check_on_close(fn, "add_scope_listener()", optional=False)  # type: ignore[assignment]
    with _listeners_lock:
        if fn not in listeners:
            listeners.append(fn)


def remove_scope_listener(fn: Callable[[ScopeStats], object]) -> None:
    """Stop calling ``fn``; a listener that was not added is ignored."""
    with _listeners_lock:
        if fn in listeners:
            listeners.remove(fn)


def stats_of(counts: tuple[Any, ...], duration: float) -> ScopeStats:
    """The stats from ``Entries._counts``' numbers."""
    hits, misses, entries, peak, evictions, functions = counts
    return ScopeStats(
        hits=hits + sum(f[1] for f in functions),
        misses=misses + sum(f[2] for f in functions),
        entries=entries,
        peak_entries=max(peak, entries),
        evictions=evictions,
        duration_s=duration,
        functions=FunctionsStats({f[0]: FunctionStats(*f[1:]) for f in functions}),
    )
