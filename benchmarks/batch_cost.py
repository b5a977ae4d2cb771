"""Cost of ``@request_batch`` against aiodataloader's ``DataLoader`` created per request.

Both load through the same trivial async batch function (``return keys``), so what is
measured is the loader's own work. Every number is measured in this process, in
interleaved rounds (each round times every variant once, in a rotating order); the
reported figure is the median over the rounds, and ratios are medians of per-round
ratios, so slow drift on a shared machine cancels out.

Cases:

- cached load: ``await loader.load(1)`` of a key already loaded in this request (ns per
  load; 10 loads per loop iteration);
- 100 new keys, ``load_many``: ``await loader.load_many(range(100))`` in a fresh request
  (a new ``request_scope()``, a new ``DataLoader``; made outside the timing), one batch;
- 100 new keys, 100 ``load`` calls gathered: ``await asyncio.gather(*(loader.load(k) for k
  in keys))``, one batch;
- 100 resolvers: 100 coroutines, each awaiting one ``load`` (the shape of a GraphQL
  query), gathered; asyncio's task per coroutine dominates (reported, no target);
- fixed cost of a batch: ``await loader.load(1)`` in a fresh request, a batch of one
  key: scheduling the call, running it, handing back the value (reported, no target).

The garbage collector is off while timing, as in ``timeit``.

``--instructions`` also counts machine instructions under callgrind (valgrind),
which the machine's other load does not move: each case and variant runs in a
process of its own, twice (N1 and N2 operations after a warm-up), and
(total(N2) - total(N1)) / (N2 - N1) is one operation's count, start-up cancelled
out. A request's count is the body's: the same request with an empty body (the
scope opened and closed, or the DataLoader made) is subtracted.

Usage: ``.venv/bin/python benchmarks/batch_cost.py [--quick] [--instructions] [--json PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import _common as common
from aiodataloader import DataLoader

import perrequest

KEYS = list(range(100))
OURS, THEIRS = "perrequest.request_batch", "aiodataloader.DataLoader"


async def trivial(keys: Sequence[int]) -> Sequence[int]:
    return keys


batched = perrequest.request_batch(trivial)


class Variant:
    """A loader per request: ``request(body)`` runs ``body(loader)`` in a fresh request.

    perrequest's request has its store in use already, as in an app whose middleware,
    memos or other loaders write to it: its first write and its closing after one are a
    cost of the request, measured on their own (``SETUP``; the store is built whole when
    the scope makes it, so its set-up is in every request of both variants).
    """

    def __init__(self, name: str, used: bool = True) -> None:
        self.name = name
        self.used = used

    async def request(self, body: Callable[[Any], Awaitable[float]]) -> float:
        if self.name == OURS:
            with perrequest.request_scope() as store:
                if self.used:
                    store["in use"] = True
                return await body(batched)
        return await body(DataLoader(trivial))


# -- timing bodies: each returns nanoseconds --------------------------------------------------


def cached(loops: int) -> Callable[[Any], Awaitable[float]]:
    async def body(loader: Any) -> float:
        await loader.load(1)
        await loader.load(1)
        start = perf_counter_ns()
        for _ in range(loops):
            await loader.load(1), await loader.load(1), await loader.load(1)
            await loader.load(1), await loader.load(1), await loader.load(1)
            await loader.load(1), await loader.load(1), await loader.load(1)
            await loader.load(1)
        return (perf_counter_ns() - start) / (loops * 10)

    return body


async def load_many(loader: Any) -> float:
    start = perf_counter_ns()
    values = await loader.load_many(KEYS)
    elapsed = perf_counter_ns() - start
    assert values == KEYS
    return elapsed


async def gathered(loader: Any) -> float:
    start = perf_counter_ns()
    values = await asyncio.gather(*[loader.load(k) for k in KEYS])
    elapsed = perf_counter_ns() - start
    assert values == KEYS
    return elapsed


async def resolvers(loader: Any) -> float:
    async def resolve(key: int) -> int:
        return int(await loader.load(key))

    start = perf_counter_ns()
    values = await asyncio.gather(*[resolve(k) for k in KEYS])
    elapsed = perf_counter_ns() - start
    assert values == KEYS
    return elapsed


async def one_key(loader: Any) -> float:
    start = perf_counter_ns()
    value = await loader.load(1)
    elapsed = perf_counter_ns() - start
    assert value == 1
    return elapsed


# -- the run ------------------------------------------------------------------------------------

CASES = (
    "cached load",
    "100 new keys, load_many",
    "100 new keys, 100 loads gathered",
    "100 resolvers, one load each",
    "fixed cost of a batch (one key)",
)
TARGETS = {CASES[0]: 1.0, CASES[1]: 1.0, CASES[2]: 1.0}  # ours / theirs at most


async def measure_round(variants: list[Variant], loops: int, requests: int) -> dict[str, Any]:
    """ns per load (cached) or per request (the rest), per case and variant."""
    bodies = {
        CASES[1]: load_many,
        CASES[2]: gathered,
        CASES[3]: resolvers,
        CASES[4]: one_key,
    }
    out: dict[str, dict[str, float]] = {case: {} for case in CASES}
    for v in variants:
        out[CASES[0]][v.name] = await v.request(cached(loops))
        for case, body in bodies.items():
            total = 0.0
            for _ in range(requests):
                total += await v.request(body)
            out[case][v.name] = total / requests
    return out


def measure(rounds: int, loops: int, requests: int) -> dict[str, dict[str, list[float]]]:
    samples: dict[str, dict[str, list[float]]] = {c: {OURS: [], THEIRS: []} for c in CASES}
    loop = asyncio.new_event_loop()
    gc.disable()
    try:
        for r in range(rounds):
            variants = [Variant(OURS), Variant(THEIRS)]
            variants = variants[r % 2 :] + variants[: r % 2]
            result = loop.run_until_complete(measure_round(variants, loops, requests))
            for case, by_variant in result.items():
                for name, ns in by_variant.items():
                    samples[case][name].append(ns)
            gc.collect()
    finally:
        gc.enable()
        loop.close()
    return samples


def report(samples: dict[str, dict[str, list[float]]], rounds: int) -> dict[str, Any]:
    meta = common.meta(rounds=rounds)
    print(
        f"perrequest batch_cost: {meta['python']}, {meta['platform']}, {meta['cpus']} CPUs, "
        f"{rounds} interleaved rounds, medians"
    )
    print(f"\n| {'case':<34} | {'DataLoader':>10} | {'ours':>10} | ratio | target | status  |")
    print(f"| {'-' * 34} | {'-' * 10}:| {'-' * 10}:| -----:| ------:| ------- |")
    results: dict[str, Any] = {"meta": meta, "cases": {}}
    for case in CASES:
        theirs = statistics.median(samples[case][THEIRS])
        ours = statistics.median(samples[case][OURS])
        r = common.ratio(samples[case], OURS, THEIRS) or 0.0
        target = TARGETS.get(case)
        met = None if target is None else r <= target
        status = "info" if met is None else ("met" if met else "NOT met")
        unit = "ns" if case == CASES[0] else "us"
        scale = 1.0 if unit == "ns" else 1000.0
        shown = f"<= {target:.2f}" if target else ""
        print(
            f"| {case:<34} | {theirs / scale:7.1f} {unit} | {ours / scale:7.1f} {unit} "
            f"| {r:5.2f} | {shown:>6} | {status:<7} |"
        )
        results["cases"][case] = {
            "dataloader_ns": theirs,
            "ours_ns": ours,
            "ratio": r,
            "target": shown or None,
            "met": met,
        }
    print(
        "\nratio: ours / DataLoader, median of per-round ratios; cached load in ns per load, "
        "the rest in us per request."
    )
    return results


# -- instruction counts (callgrind) -----------------------------------------------------------


async def _empty(loader: Any) -> float:
    return 0.0


EMPTY, UNUSED = "empty request", "empty request, store never written"
SETUP = "a store's first write, and closing it after one"


def child(variant: str, case: str, n: int) -> None:
    """Run ``n`` operations of one case (after a warm-up), for callgrind to count."""
    v = Variant(variant, used=case != UNUSED)
    bodies = dict(zip(CASES[1:], (load_many, gathered, resolvers, one_key), strict=True))
    bodies[EMPTY] = bodies[UNUSED] = _empty

    async def run(count: int) -> None:
        if case == CASES[0]:
            await v.request(cached(count))
            return
        for _ in range(count):
            await v.request(bodies[case])

    loop = asyncio.new_event_loop()
    loop.run_until_complete(run(50))
    gc.collect()
    gc.freeze()  # what start-up made stays out of the collections counted
    loop.run_until_complete(run(n))
    loop.close()


def _count(variant: str, case: str, n: int) -> int:
    return common.callgrind(str(Path(__file__).resolve()), "--child", variant, case, str(n))


def instructions(quick: bool) -> tuple[dict[str, Any], int]:
    """Instructions per load (cached) or per request body, per case and variant."""
    sizes = {CASES[0]: (2_000, 12_000) if not quick else (200, 400)}
    for case in (*(CASES[1:] if not quick else CASES[2:3]), EMPTY, UNUSED):
        sizes[case] = (20, 120) if not quick else (5, 10)
    jobs = [
        (v, c, n)
        for c in sizes
        for v in (OURS, THEIRS)
        for n in sizes[c]
        if v == OURS or c != UNUSED  # a DataLoader has no store to set up
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:  # counts do not depend on the load
        totals = dict(zip(jobs, pool.map(lambda job: _count(*job), jobs), strict=True))
    per_op = {
        (v, c): (totals[(v, c, sizes[c][1])] - totals[(v, c, sizes[c][0])])
        // (sizes[c][1] - sizes[c][0])
        for v, c, _ in jobs
    }
    print("\ncallgrind: instructions per load (cached) or per request body\n")
    print(f"| {'case':<34} | {'DataLoader':>10} | {'ours':>10} | ratio | target | status  |")
    print(f"| {'-' * 34} | {'-' * 10}:| {'-' * 10}:| -----:| ------:| ------- |")
    out: dict[str, Any] = {}
    for case in [c for c in CASES if c in sizes]:
        if case == CASES[0]:  # an operation is 10 loads
            theirs, ours = per_op[(THEIRS, case)] // 10, per_op[(OURS, case)] // 10
        else:
            theirs, ours = (per_op[(v, case)] - per_op[(v, EMPTY)] for v in (THEIRS, OURS))
        r = ours / theirs
        target = TARGETS.get(case)
        met = None if target is None else r <= target
        status = "info" if met is None else ("met" if met else "NOT met")
        shown = f"<= {target:.2f}" if target else ""
        print(f"| {case:<34} | {theirs:10,d} | {ours:10,d} | {r:5.2f} | {shown:>6} | {status:<7} |")
        out[case] = {
            "dataloader": theirs,
            "ours": ours,
            "ratio": r,
            "target": shown or None,
            "met": met,
        }
    setup = per_op[(OURS, EMPTY)] - per_op[(OURS, UNUSED)]
    print(f"\n{SETUP} (perrequest, once per request, not in the rows above): {setup:,d}")
    return out, setup


def main(argv: list[str] | None = None) -> int:
    parser = common.arguments(__doc__)
    parser.add_argument(
        "--instructions", action="store_true", help="also count instructions (valgrind)"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("VARIANT", "CASE", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    rounds, loops, requests = (3, 200, 5) if args.quick else (31, 5_000, 100)
    rounds = args.rounds or rounds
    results = report(measure(rounds, loops, requests), rounds)
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
        results["instructions"], results["store_setup_instructions"] = instructions(args.quick)
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
