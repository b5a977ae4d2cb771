"""What the metric listeners (``otel``, ``prometheus``) and the toolbar panel share.

A metric attribute is a function's qualified name and nothing else: never an
argument, a key or a value, so the number of series is bounded by the code,
not by the traffic. ``label`` enforces it for names that are not plain
qualified names (a ``functools.partial`` or a callable object is named by its
``repr``, which can hold argument values or a memory address).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

from ._stats import FunctionStats, ScopeStats

# get_or_set and store[key] entries: counted in the totals under this name.
HELPERS = "perrequest.helpers"
UNNAMED = "(unnamed callable)"
# Histogram buckets: entries up to past the default bound (10_000), seconds from 0.1 ms.
ENTRY_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 100_000)
SAVED_BUCKETS = (
    0, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
)  # fmt: skip
_QUALIFIED = re.compile(r"[^\W\d][\w.<>]{0,199}|\(other functions\)")


@functools.lru_cache(maxsize=4096)
def label(name: str) -> str:
    """``name`` if it is a plain ``module.qualname``, else ``UNNAMED``."""
    return name if _QUALIFIED.fullmatch(name) else UNNAMED


def saved_s(fn: FunctionStats) -> float:
    """Seconds the hits saved: hits x mean miss time (0 when misses were not timed)."""
    return fn.hits * fn.compute_s / fn.misses if fn.misses and fn.compute_s else 0.0


def scope_saved_s(stats: ScopeStats) -> float:
    """Seconds the memo saved in one scope, over its memoized functions."""
    return sum(saved_s(fn) for fn in stats.functions.values())


def per_function(stats: ScopeStats) -> Iterator[tuple[str, int, int, int]]:
    """``(label, hits, misses, evictions)`` per function with any, then the helpers'
    share of the totals (``get_or_set``, plain entries) under ``HELPERS``."""
    hits = misses = evictions = 0
    for name, fn in stats.functions.items():
        hits += fn.hits
        misses += fn.misses
        evictions += fn.evictions
        if fn.hits or fn.misses or fn.evictions:
            yield label(name), fn.hits, fn.misses, fn.evictions
    rest = (stats.hits - hits, stats.misses - misses, stats.evictions - evictions)
    if any(rest):
        yield (HELPERS, *rest)
