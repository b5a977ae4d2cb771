"""Cost of a shared-tier hit: ``@request_memo(shared=cache)`` against ``cachetools.cached``.

Both use the same kind of cache (a ``cachetools.LRUCache``, pre-filled) and a lock, since
a process-wide cache used from threads needs one. Two cases, in interleaved rounds,
medians of per-round ratios:

- first read in a request: every key is in the shared cache but not yet in the request
  store (a request-level miss served by the shared tier). Each batch of ``KEYS`` distinct
  keys runs in a fresh ``request_scope()``, whose opening and closing is included, spread
  over the batch;
- repeated read in a request: the same keys again within the request (request-level hits).

Usage: ``.venv/bin/python benchmarks/shared_cost.py [--quick]``
"""

from __future__ import annotations

import gc
import statistics
import sys
import threading
from time import perf_counter_ns
from typing import Any

import _common as common
import cachetools

import perrequest

KEYS = 1_000


def lookup(x: int) -> int:
    return x


def make_variants() -> dict[str, Any]:
    ours_cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(maxsize=10 * KEYS)
    theirs_cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(maxsize=10 * KEYS)
    ours = perrequest.request_memo(shared=ours_cache)(lookup)
    theirs = cachetools.cached(theirs_cache, lock=threading.Lock())(lookup)
    with perrequest.request_scope():
        for i in range(KEYS):
            ours(i)
            theirs(i)
    return {"cachetools.cached + lock": theirs, "request_memo(shared=)": ours}


def first_reads(fn: Any) -> float:
    start = perf_counter_ns()
    with perrequest.request_scope():
        for i in range(KEYS):
            fn(i)
    return (perf_counter_ns() - start) / KEYS


def repeated_reads(fn: Any) -> float:
    with perrequest.request_scope():
        for i in range(KEYS):
            fn(i)
        start = perf_counter_ns()
        for i in range(KEYS):
            fn(i)
        return (perf_counter_ns() - start) / KEYS


def main(argv: list[str] | None = None) -> int:
    parser = common.arguments(__doc__, rounds=False)
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 41
    variants = make_variants()
    cases = {"first read in a request": first_reads, "repeated read in a request": repeated_reads}
    samples: dict[str, dict[str, list[float]]] = {c: {v: [] for v in variants} for c in cases}
    gc.disable()
    try:
        for r in range(rounds):
            names = list(variants)
            names = names[r % 2 :] + names[: r % 2]
            for case, timer in cases.items():
                for name in names:
                    samples[case][name].append(timer(variants[name]))
    finally:
        gc.enable()
    print(f"perrequest shared_cost: {rounds} interleaved rounds, median ns per call\n")
    print(f"| {'case':<28} | {'cachetools.cached + lock':>24} | {'shared=':>8} | ratio | target |")
    print(f"| {'-' * 28} | {'-' * 24}:| {'-' * 8}:| -----:| ------ |")
    ours, theirs = "request_memo(shared=)", "cachetools.cached + lock"
    results: dict[str, Any] = {"rounds": rounds, "cases": {}}
    for case, by_variant in samples.items():
        r = common.ratio(by_variant, ours, theirs) or 0.0
        status = "met" if r <= 1.0 else "NOT met"
        print(
            f"| {case:<28} | {statistics.median(by_variant[theirs]):24.0f} "
            f"| {statistics.median(by_variant[ours]):8.0f} | {r:5.2f} | <= 1 {status} |"
        )
        results["cases"][case] = {
            "cachetools_ns": statistics.median(by_variant[theirs]),
            "shared_ns": statistics.median(by_variant[ours]),
            "ratio": r,
            "met": r <= 1.0,
        }
    print("\nratio: shared= / cachetools.cached, median of per-round ratios.")
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
