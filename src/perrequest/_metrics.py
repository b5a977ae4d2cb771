"""What the metric listeners (``otel``, ``prometheus``) and the toolbar panel share.

A metric attribute is a function's qualified name and nothing else, never an
argument, a key or a value, so that the number of series is bounded by the code,
not by the traffic: ``label`` enforces it for a loader's or a hand-set name.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator

from ._stats import FunctionStats, ScopeStats

HELPERS = "perrequest.helpers"
UNNAMED = "(unnamed callable)"
OTHER = "(other functions)"
MAX_NAMES = 4096  # function names kept in running totals; beyond, counted under OTHER
# Histogram buckets: entries up to past the default bound (10_000), seconds from 0.1 ms.
ENTRY_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 100_000)
SAVED_BUCKETS = (
    0, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
)  # fmt: skip
# Up to 1,000 characters: deeply nested classes make long real names (a probe: 312).
_QUALIFIED = re.compile(r"[^\W\d][\w.<>]{0,999}(?: \(partial\))?|\(other functions\)")


@functools.lru_cache(maxsize=4096)
def label(name: str) -> str:
    """``name`` if it is a plain ``module.qualname`` (of a partial: with its suffix),
    else ``UNNAMED``."""
    return name if _QUALIFIED.fullmatch(name) else UNNAMED


def saved_s(fn: FunctionStats) -> float:
    """Seconds the hits saved: hits x mean miss time (0 when misses were not timed)."""
    return fn.hits * fn.compute_s / fn.misses if fn.misses and fn.compute_s else 0.0


def scope_saved_s(stats: ScopeStats) -> float:
    """Seconds the memo saved in one scope, over its memoized functions."""
    return sum(saved_s(fn) for fn in stats.functions.values())


def used(stats: ScopeStats) -> bool:
    """Whether a scope touched its store at all (most static files and probes do not)."""
    return bool(stats.peak_entries or stats.hits or stats.misses)


def per_function(stats: ScopeStats) -> Iterator[tuple[str, int, int, int]]:
    """``(name, hits, misses, evictions)`` of each function, then of what no function
    accounts for (``get_or_set``, ``store[key]``) under ``HELPERS``."""
    hits = misses = evictions = 0
    for name, fn in stats.functions.items():
        hits += fn.hits
        misses += fn.misses
        evictions += fn.evictions
        yield name, fn.hits, fn.misses, fn.evictions
    if hits != stats.hits or misses != stats.misses or evictions != stats.evictions:
        yield HELPERS, stats.hits - hits, stats.misses - misses, stats.evictions - evictions


class Totals:
    """Running per-function totals since ``instrument()``: added to as each scope closes
    (a few dict updates), read when the metrics are collected (every export or scrape).

    The names are the program's memoized functions, so the dict is as bounded as the
    code; past ``MAX_NAMES`` names the rest are counted under ``OTHER``.
    """

    __slots__ = ("_by_name", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, list[int]] = {}

    def add(self, stats: ScopeStats) -> None:
        with self._lock:
            for name, hits, misses, evictions in per_function(stats):
                row = self._by_name.get(name)
                if row is None:  # a new function: labelled when read, not here
                    if len(self._by_name) >= MAX_NAMES:
                        name = OTHER
                    row = self._by_name.setdefault(name, [0, 0, 0])
                row[0] += hits
                row[1] += misses
                row[2] += evictions

    def series(self, column: int) -> list[tuple[str, int]]:
        """``(label, total)`` per function seen so far: hits (0), misses (1), evictions (2)."""
        with self._lock:
            rows = [(name, row[column]) for name, row in self._by_name.items()]
        merged: dict[str, int] = {}
        for name, total in rows:  # names that are no plain qualified name share one label
            merged[label(name)] = merged.get(label(name), 0) + total
        return list(merged.items())
