"""Cost of a memo hit and a memo miss: perrequest against lru_cache, cachetools and a minimal memo.

Every number is measured in this process, in interleaved rounds (each round times every
variant once, in a rotating order), and reported as the median over the rounds. Ratios are
the median of the per-round ratios, so slow drift on a shared machine cancels out.

Cases: ``f(1)`` (one positional argument), ``g(1, 2, c=3)`` (two positional arguments and
one keyword) and ``await h(1)`` (an async function). Variants:

- plain call: the undecorated function, the floor every memo pays on top of;
- ``functools.lru_cache(maxsize=10_000)``: the C implementation;
- ``cachetools.cached(cachetools.LRUCache(maxsize=10_000))``;
- minimal memo: the hand-written generic per-request memo of DESIGN.md, written as simply
  as possible: ``ContextVar.get()``, ``key = (fn, args, tuple(kwargs.items()))``, one dict
  lookup (``try: return store[key] except KeyError: ...``);
- ``perrequest.request_memo`` inside ``perrequest.request_scope()`` (default bound, 10_000).

``lru_cache`` and ``cachetools.cached`` would cache the coroutine object of an async function
(which can be awaited only once), so the async case compares the plain await, the minimal
async memo and perrequest only.

Hits: each variant is primed with the key, then called 10 times per loop iteration (the loop
is unrolled, so its own cost is about 1/10 of an iteration per call). Misses: a fresh key per
call (``f(i)`` for ``i`` in ``range(BATCH)``); before each batch every variant gets an empty
cache (a new ``request_scope()``, a new dict in the minimal memo's ContextVar,
``cache_clear()``, ``LRUCache.clear()``), outside the timed region. A batch is smaller than
every bound, so nothing is evicted. The garbage collector is off while timing, as in
``timeit``.

Usage: ``.venv/bin/python benchmarks/hit_cost.py [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import statistics
import sys
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import Any

import _common as common
import cachetools

import perrequest

BOUND = 10_000
MISS_BATCH = 1_000

Fn = Callable[..., Any]

# -- the minimal hand-written memo (the DESIGN.md baseline) --------------------------------

_minimal_store: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar(
    "minimal_memo_store", default=None
)


def minimal_memo(fn: Fn) -> Fn:
    """The simplest generic per-request memo: ContextVar.get, build the key, one lookup."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        store = _minimal_store.get()
        if store is None:
            return fn(*args, **kwargs)
        key = (fn, args, tuple(kwargs.items()))
        try:
            return store[key]
        except KeyError:
            value = store[key] = fn(*args, **kwargs)
            return value

    return wrapper


def minimal_memo_async(fn: Fn) -> Fn:
    """The same memo for an async function: the awaited result is stored."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        store = _minimal_store.get()
        if store is None:
            return await fn(*args, **kwargs)
        key = (fn, args, tuple(kwargs.items()))
        try:
            return store[key]
        except KeyError:
            value = store[key] = await fn(*args, **kwargs)
            return value

    return wrapper


# -- the functions under test -----------------------------------------------------------------


def one_arg(x: int) -> int:
    return x


def two_args_kw(a: int, b: int, c: int = 0) -> int:
    return a + b + c


async def async_one_arg(x: int) -> int:
    return x


# -- timing loops: each returns nanoseconds per call --------------------------------------------


def hits_one_arg(fn: Fn, loops: int) -> float:
    fn(1)
    start = perf_counter_ns()
    for _ in range(loops):
        fn(1), fn(1), fn(1), fn(1), fn(1), fn(1), fn(1), fn(1), fn(1), fn(1)
    return (perf_counter_ns() - start) / (loops * 10)


def hits_two_args_kw(fn: Fn, loops: int) -> float:
    fn(1, 2, c=3)
    start = perf_counter_ns()
    for _ in range(loops):
        fn(1, 2, c=3), fn(1, 2, c=3), fn(1, 2, c=3), fn(1, 2, c=3), fn(1, 2, c=3)
        fn(1, 2, c=3), fn(1, 2, c=3), fn(1, 2, c=3), fn(1, 2, c=3), fn(1, 2, c=3)
    return (perf_counter_ns() - start) / (loops * 10)


async def hits_async(fn: Fn, loops: int) -> float:
    await fn(1)
    start = perf_counter_ns()
    for _ in range(loops):
        await fn(1), await fn(1), await fn(1), await fn(1), await fn(1)
        await fn(1), await fn(1), await fn(1), await fn(1), await fn(1)
    return (perf_counter_ns() - start) / (loops * 10)


def misses_one_arg(fn: Fn, keys: range) -> int:
    start = perf_counter_ns()
    for i in keys:
        fn(i)
    return perf_counter_ns() - start


def misses_two_args_kw(fn: Fn, keys: range) -> int:
    start = perf_counter_ns()
    for i in keys:
        fn(i, 2, c=3)
    return perf_counter_ns() - start


async def misses_async(fn: Fn, keys: range) -> int:
    start = perf_counter_ns()
    for i in keys:
        await fn(i)
    return perf_counter_ns() - start


# -- variants -----------------------------------------------------------------------------------

PLAIN, LRU, CACHETOOLS, MINIMAL, OURS = (
    "plain call (no memo)",
    "functools.lru_cache",
    "cachetools.cached",
    "minimal memo",
    "perrequest.request_memo",
)


class Variant:
    """One decorated function and how to give it an empty cache."""

    def __init__(self, name: str, fn: Fn, reset: Callable[[], None]) -> None:
        self.name = name
        self.fn = fn
        self.reset = reset


def _nothing() -> None:
    pass


def _fresh_minimal_store() -> None:
    _minimal_store.set({})


def sync_variants(fn: Fn) -> list[Variant]:
    lru = functools.lru_cache(maxsize=BOUND)(fn)
    lru_cache_: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(maxsize=BOUND)
    return [
        Variant(PLAIN, fn, _nothing),
        Variant(LRU, lru, lru.cache_clear),
        Variant(CACHETOOLS, cachetools.cached(lru_cache_)(fn), lru_cache_.clear),
        Variant(MINIMAL, minimal_memo(fn), _fresh_minimal_store),
        Variant(OURS, perrequest.request_memo(fn), _nothing),
    ]


def async_variants(fn: Fn) -> list[Variant]:
    return [
        Variant(PLAIN, fn, _nothing),
        Variant(MINIMAL, minimal_memo_async(fn), _fresh_minimal_store),
        Variant(OURS, perrequest.request_memo(fn), _nothing),
    ]


# -- the run ------------------------------------------------------------------------------------

Samples = dict[str, dict[str, dict[str, list[float]]]]  # case -> kind -> variant -> ns/call


def _run(coro: Coroutine[Any, Any, float | int], loop: asyncio.AbstractEventLoop) -> float:
    return float(loop.run_until_complete(coro))


def measure(rounds: int, loops: int, batches: int) -> Samples:
    cases: list[tuple[str, list[Variant], Fn, Fn, bool]] = [
        ("f(1)", sync_variants(one_arg), hits_one_arg, misses_one_arg, False),
        ("g(1, 2, c=3)", sync_variants(two_args_kw), hits_two_args_kw, misses_two_args_kw, False),
        ("await h(1)", async_variants(async_one_arg), hits_async, misses_async, True),
    ]
    samples: Samples = {
        case: {"hit": {v.name: [] for v in vs}, "miss": {v.name: [] for v in vs}}
        for case, vs, *_ in cases
    }
    keys = range(MISS_BATCH)
    loop = asyncio.new_event_loop()
    gc.disable()
    try:
        for r in range(rounds):
            for case, variants, hit_loop, miss_loop, is_async in cases:
                shift = r % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    # Hits: one scope (and one minimal store) for the whole timing.
                    v.reset()
                    with perrequest.request_scope():
                        if is_async:
                            ns = _run(hit_loop(v.fn, loops), loop)
                        else:
                            ns = hit_loop(v.fn, loops)
                    samples[case]["hit"][v.name].append(ns)
                    # Misses: an empty cache before each batch, reset outside the timing.
                    total = 0.0
                    for _ in range(batches):
                        v.reset()
                        with perrequest.request_scope():
                            if is_async:
                                total += _run(miss_loop(v.fn, keys), loop)
                            else:
                                total += miss_loop(v.fn, keys)
                        gc.collect()
                    samples[case]["miss"][v.name].append(total / (batches * MISS_BATCH))
    finally:
        gc.enable()
        loop.close()
    return samples


# (label, numerator, denominator, comparison, hit target, miss target); None: no target.
RATIOS: list[tuple[str, str, str, str, float | None, float | None]] = [
    ("ours / minimal memo", OURS, MINIMAL, "<=", 1.0, 2.0),
    ("cachetools / ours", CACHETOOLS, OURS, ">=", 3.0, None),
    ("ours / lru_cache", OURS, LRU, "<=", None, None),
    ("minimal memo / lru_cache", MINIMAL, LRU, "<=", None, None),
]


def _check(value: float, op: str, target: float | None) -> tuple[str, bool | None]:
    if target is None:
        return "", None
    return f"{op} {target:.2f}", value <= target if op == "<=" else value >= target


def report(samples: Samples, rounds: int) -> dict[str, Any]:
    meta = common.meta(rounds=rounds)
    print(
        f"perrequest hit_cost: {meta['python']}, {meta['platform']}, {meta['cpus']} CPUs, "
        f"{rounds} interleaved rounds, median ns per call"
    )
    results: dict[str, Any] = {"meta": meta, "cases": {}}
    for case, kinds in samples.items():
        medians = {
            kind: {name: statistics.median(values) for name, values in variants.items()}
            for kind, variants in kinds.items()
        }
        print(f"\n## {case}\n")
        print(f"| {'variant':<26} | {'hit ns':>8} | {'miss ns':>8} |")
        print(f"| {'-' * 26} | {'-' * 8}:| {'-' * 8}:|")
        for name in medians["hit"]:
            print(f"| {name:<26} | {medians['hit'][name]:8.1f} | {medians['miss'][name]:8.1f} |")
        print(f"\n| {'ratio':<26} | {'hit':>8} | {'target':>8} | {'miss':>8} | {'target':>8} |")
        print(f"| {'-' * 26} | {'-' * 8}:| {'-' * 8}:| {'-' * 8}:| {'-' * 8}:|")
        ratios: dict[str, Any] = {}
        for label, top, bottom, op, hit_target, miss_target in RATIOS:
            hit = common.ratio(kinds["hit"], top, bottom)
            miss = common.ratio(kinds["miss"], top, bottom)
            if hit is None or miss is None:
                continue
            hit_wanted, hit_met = _check(hit, op, hit_target)
            miss_wanted, miss_met = _check(miss, op, miss_target)
            marks = {True: "", False: " (NOT met)", None: ""}
            print(
                f"| {label:<26} | {hit:8.2f} | {hit_wanted:>8} | {miss:8.2f} | {miss_wanted:>8} |"
                f"{marks[hit_met]}{' miss' + marks[miss_met] if miss_met is False else ''}"
            )
            ratios[label] = {
                "hit": hit,
                "miss": miss,
                "hit_target": hit_wanted or None,
                "miss_target": miss_wanted or None,
                "hit_met": hit_met,
                "miss_met": miss_met,
            }
        results["cases"][case] = {"median_ns": medians, "ratios": ratios}
    print("\nratios: medians of per-round ratios; targets: DESIGN.md 'Performance'.")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = common.arguments(__doc__)
    args = parser.parse_args(argv)
    rounds, loops, batches = (3, 500, 1) if args.quick else (31, 10_000, 5)
    rounds = args.rounds or rounds
    samples = measure(rounds, loops, batches)
    results = report(samples, rounds)
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
