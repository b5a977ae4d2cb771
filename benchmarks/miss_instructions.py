"""What a memo miss costs, in machine instructions (callgrind): ours against the minimal memo.

The three cases of hit_cost.py (``f(i)``, ``g(i, 2, c=3)``, ``await h(i)``), each miss a
fresh key, in one fresh ``request_scope()`` (and, for the minimal memo of hit_cost.py, a
fresh dict in its ContextVar). Each variant runs in its own process under
``valgrind --tool=callgrind``, twice: with N1 and with N2 misses after a warm-up;
(total(N2) - total(N1)) / (N2 - N1) is one miss, start-up, imports and the scope's own
cost cancelled out. The loop calling the function is in every variant's count: the plain
call's (no memo) is shown for reference. The collector is off while counting, as in
hit_cost.py.

Usage: ``.venv/bin/python benchmarks/miss_instructions.py [--quick] [--json PATH]``
(needs valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common as common

HERE = Path(__file__).resolve().parent
CASES = ("f(1)", "g(1, 2, c=3)", "await h(1)")
HITS = tuple(f"hit {case}" for case in CASES)  # --hits: what a change costs a hit
VARIANTS = ("plain", "minimal", "ours")


def child(case: str, variant: str, n: int) -> None:
    """Make ``n`` misses of one case and variant (after a warm-up), for callgrind to count."""
    sys.path.insert(0, str(HERE.parent / "src"))  # this checkout's, whatever is installed
    import hit_cost as hc

    import perrequest

    assert Path(perrequest.__file__).is_relative_to(HERE.parent), perrequest.__file__

    hit = case in HITS
    fn: Callable[..., Any] = {
        "f(1)": hc.one_arg, "g(1, 2, c=3)": hc.two_args_kw, "await h(1)": hc.async_one_arg
    }[case.removeprefix("hit ")]  # fmt: skip
    is_async = case.endswith(CASES[2])
    if variant == "minimal":
        fn = (hc.minimal_memo_async if is_async else hc.minimal_memo)(fn)
    elif variant == "ours":
        fn = perrequest.request_memo(fn)
    loop = asyncio.new_event_loop()

    def batch(count: int) -> None:
        keys = range(1000, 1000 + count)  # not the small ints: every key is made anew
        with perrequest.request_scope():
            hc._minimal_store.set({})  # in the scope's context: the task copies it
            if hit and is_async:  # 10 hits an iteration
                loop.run_until_complete(hc.hits_async(fn, count // 10))
            elif hit:
                (hc.hits_one_arg if case == HITS[0] else hc.hits_two_args_kw)(fn, count // 10)
            elif is_async:
                loop.run_until_complete(hc.misses_async(fn, keys))
            elif case == CASES[0]:
                hc.misses_one_arg(fn, keys)
            else:
                hc.misses_two_args_kw(fn, keys)
            hc._minimal_store.set(None)  # freed here, as a scope's store is as it closes

    batch(200)
    gc.collect()
    gc.freeze()
    gc.disable()
    batch(n)
    loop.close()


def _count(case: str, variant: str, n: int) -> int:
    script = str(Path(__file__).resolve())
    return common.callgrind(script, "--child", case, variant, str(n), cwd=str(HERE))


def measure(
    n1: int, n2: int, cases: tuple[str, ...] = CASES, variants: tuple[str, ...] = VARIANTS
) -> dict[str, dict[str, int]]:
    """Instructions per miss (or hit), per case and variant."""
    jobs = [(c, v, n) for c in cases for v in variants for n in (n1, n2)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # counts do not depend on the load
        totals = dict(zip(jobs, pool.map(lambda job: _count(*job), jobs), strict=True))
    return {
        c: {v: (totals[(c, v, n2)] - totals[(c, v, n1)]) // (n2 - n1) for v in variants}
        for c in cases
    }


def report(per_miss: dict[str, dict[str, int]], n1: int, n2: int) -> dict[str, Any]:
    meta = common.meta(misses=[n1, n2])
    print(
        f"perrequest miss_instructions: {meta['python']}, callgrind, instructions per miss "
        f"from runs of {n1} and {n2} misses (the calling loop included)\n"
    )
    print(f"| {'case':<16} | {'plain':>7} | {'minimal':>7} | {'ours':>7} | ratio | ratio - plain |")
    print(f"| {'-' * 16} | {'-' * 7}:| {'-' * 7}:| {'-' * 7}:| -----:| -------------:|")
    results: dict[str, Any] = {"meta": meta, "cases": {}}
    for case, counts in per_miss.items():
        plain, minimal, ours = (counts.get(v, 0) for v in VARIANTS)
        r = ours / minimal if minimal else 0.0
        r_net = (ours - plain) / (minimal - plain) if minimal and plain else 0.0
        print(
            f"| {case:<16} | {plain:7,d} | {minimal:7,d} | {ours:7,d} | {r:5.2f} | {r_net:13.2f} |"
        )
        results["cases"][case] = {**counts, "ratio": r, "ratio_minus_plain": r_net}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few misses (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", choices=VARIANTS, help="count one variant only")
    parser.add_argument("--hits", action="store_true", help="also count the hits")
    parser.add_argument(
        "--child", nargs=3, metavar=("CASE", "VARIANT", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        case, variant, n = args.child
        child(case, variant, int(n))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("miss_instructions.py needs valgrind (Debian: apt-get install valgrind)")
    n1, n2 = (100, 300) if args.quick else (1000, 5000)
    cases = CASES + HITS if args.hits else CASES
    variants = (args.only,) if args.only else VARIANTS
    results = report(measure(n1, n2, cases, variants), n1, n2)
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
