"""``make bench``: run every benchmark in this folder and print one table of the targets.

Each script runs in its own process, one after the other (never two at once: they would
slow each other down), and writes its results as JSON; this script then prints the
DESIGN.md performance targets beside what was measured, marked met or not. Every figure
is a ratio measured within one script's run, against a baseline run in the same process.

Usage: ``.venv/bin/python benchmarks/report.py [--quick]`` (``--quick``: smoke test only,
the numbers mean nothing; it leaves out instructions.py, which takes minutes under
valgrind however few requests it counts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPTS = (
    "hit_cost",
    "middleware_overhead",
    "instructions",
    "shared_cost",
    "redis_cost",
    "throughput",
    "observability_cost",
    "batch_cost",
)


def run_all(quick: bool, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in SCRIPTS:
        if quick and name == "instructions":
            continue  # minutes under valgrind even when quick: tested on its own
        path = out / f"{name}.json"
        argv = [sys.executable, str(HERE / f"{name}.py"), "--json", str(path)]
        if quick:
            argv.append("--quick")
        elif name == "batch_cost" and shutil.which("valgrind"):
            argv.append("--instructions")  # the timings flicker on a busy machine
        print(f"\n=== {name}.py {'--quick ' if quick else ''}===", flush=True)
        subprocess.run(argv, check=True)
        results[name] = json.loads(path.read_text(encoding="utf-8"))
    return results


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, target, measured, status) for every target, plus reference rows."""
    table: list[tuple[str, str, str, str]] = []

    def mark(met: bool | None) -> str:
        return "info" if met is None else ("met" if met else "NOT met")

    for case, data in results["hit_cost"]["cases"].items():
        ratios = data["ratios"]
        mine = ratios["ours / minimal memo"]
        table.append(
            (
                f"memo hit / minimal memo, {case}",
                "<= 1.00",
                f"{mine['hit']:.2f}",
                mark(mine["hit_met"]),
            )
        )
        if "cachetools / ours" in ratios:
            ct = ratios["cachetools / ours"]
            table.append(
                (
                    f"cachetools hit / memo hit, {case}",
                    ">= 3.00",
                    f"{ct['hit']:.2f}",
                    mark(ct["hit_met"]),
                )
            )
        table.append(
            (
                f"memo miss / minimal memo, {case}",
                "<= 2.00",
                f"{mine['miss']:.2f}",
                mark(mine["miss_met"]),
            )
        )
    for protocol, variants in results["middleware_overhead"]["protocols"].items():
        for name, row in variants.items():
            if name == "perrequest - minimal":
                label = f"{protocol}: perrequest - minimal middleware (us)"
                table.append((label, "", f"{row['added_us']:+.2f}", "info"))
            elif name == "minimal, store until close()":
                label = f"{protocol}: least middleware keeping its store until close() - bare (us)"
                table.append((label, "", f"{row['added_us']:+.2f}", "info"))
            elif row["target"]:
                what = f"{protocol}: {name} - bare (us)"
                table.append((what, row["target"], f"{row['added_us']:+.2f}", mark(row["met"])))
    instructions = results.get("instructions")
    if instructions:
        for protocol, row in instructions["protocols"].items():
            table.append(
                (
                    f"{protocol}: instructions per request, perrequest - minimal",
                    "",
                    f"{row['perrequest_minus_minimal']:+,d}",
                    "info",
                )
            )
    for case, row in results["shared_cost"]["cases"].items():
        table.append(
            (
                f"shared tier / cachetools + lock, {case}",
                "<= 1.00",
                f"{row['ratio']:.2f}",
                mark(row["met"]),
            )
        )
    table += redis_rows(results["redis_cost"])
    for name, row in results["observability_cost"]["variants"].items():
        if row["baseline"] != name and "noise" not in name:
            what = f"observed request: {name}, added us vs {row['baseline']}"
            table.append((what, "", f"{row['added_us']:.1f}", "info"))
    batch = results["batch_cost"]
    for case, row in batch["cases"].items():
        what = f"request_batch / DataLoader, {case}"
        table.append((what, row["target"] or "", f"{row['ratio']:.2f}", mark(row["met"])))
    for case, row in batch.get("instructions", {}).items():
        what = f"request_batch / DataLoader, {case} (instructions)"
        target = row.get("target") or ""
        table.append((what, target, f"{row['ratio']:.2f}", mark(row["met"])))
    if "store_setup_instructions" in batch:
        what = "a store's first write and its close (instructions)"
        table.append((what, "", f"{batch['store_setup_instructions']:,d}", "info"))
    tp = results["throughput"]
    table.append(
        ("FastAPI, 10 lookups per request: memo / plain req/s", "", f"{tp['ratio']:.2f}", "info")
    )
    return table


def redis_rows(redis: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    if "skipped" in redis:
        return [("Redis tier", "", "skipped", "info")]
    labels = {
        "first read in a request, sync": "Redis tier / client.get + json.loads, sync",
        "first read in a request, async": "Redis tier / client.get + json.loads, async",
        "repeated read in a request": "Redis tier hit / memo hit, repeated read",
    }
    table = [
        (
            labels[case],
            f"<= {row['target']:.2f}",
            f"{row['ratio']:.2f}",
            "met" if row["met"] else "NOT met",
        )
        for case, row in redis["cases"].items()
    ]
    tiers = redis["stampede"]["tiers"]
    ours, theirs = tiers["redis"], tiers["in-process TTLCache"]
    n = redis["stampede"]["processes"]
    table.append(
        (
            f"stampede, {n} processes: duplicate computations, Redis tier",
            "0",
            str(ours["duplicates"]),
            "met" if ours["duplicates"] == 0 else "NOT met",
        )
    )
    ratio = theirs["computations"] / max(ours["computations"], 1)
    table.append(
        (f"stampede: computations without / with the Redis tier (~{n})", "", f"{ratio:.2f}", "info")
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: numbers mean nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(args.quick, Path(tmp))
    table = rows(results)
    width = max(len(r[0]) for r in table)
    print(f"\n=== summary{' (--quick: not a measurement)' if args.quick else ''} ===\n")
    print(f"| {'ratio':<{width}} | {'target':>8} | {'measured':>8} | status  |")
    print(f"| {'-' * width} | {'-' * 8}:| {'-' * 8}:| ------- |")
    for what, target, measured, status in table:
        print(f"| {what:<{width}} | {target:>8} | {measured:>8} | {status:<7} |")
    print("\nTargets: DESIGN.md 'Performance'. Every ratio is from one script's own run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
