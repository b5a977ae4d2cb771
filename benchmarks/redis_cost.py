"""Cost of the Redis tier on loopback, against a hand-written ``client.get`` + ``json.loads``.

Starts its own redis-server on a free 127.0.0.1 port (persistence off) and stops it.
Interleaved rounds, medians of per-round ratios, as the other scripts. Cases:

- first read in a request, sync and async: every key is in Redis, not yet in the request
  store (a request-store miss served by Redis), ``KEYS`` distinct keys per fresh
  ``request_scope()`` (its opening and closing included), against ``json.loads(
  client.get(key))`` on the very same keys, with the same client settings;
- repeated read in a request: the same keys again in the same request (request-store
  hits, timed on their second pass, so that both variants run with warm caches), against
  a plain ``@request_memo`` hit; the script checks that these reads send no command to
  Redis;
- stampede: 4 processes x 8 threads calling one expiring key (ttl 0.5 s, 50 ms to
  compute) for a few seconds: computations with the Redis tier, and without it (each
  process behind its own in-process ``TTLCache``).

Usage: ``.venv/bin/python benchmarks/redis_cost.py [--quick] [--json PATH] [--rounds N]``
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from time import perf_counter_ns
from typing import Any

import _common as common
import cachetools
import redis
import redis.asyncio

import perrequest
from perrequest.redis import RedisCache

HOST = "127.0.0.1"
KEYS = 1_000
TTL, COMPUTE_S, PROCESSES, THREADS = 0.5, 0.05, 4, 8


SKIPPED = "no redis-server or valkey-server on PATH (Debian package redis-server)"


def start_server(binary: str) -> tuple[subprocess.Popen[bytes], int, str]:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = int(sock.getsockname()[1])
    folder = tempfile.mkdtemp(prefix="perrequest-bench-")
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--dir", folder]
    proc = subprocess.Popen([*argv, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(500):
        try:
            with redis.Redis(host=HOST, port=port) as probe:
                probe.ping()
            return proc, port, folder
        except redis.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start")


def item(n: int) -> dict[str, Any]:
    return {"id": n, "name": f"item {n}", "tags": ["a", "b"], "price": n / 100}


# -- first and repeated reads --------------------------------------------------------------


def sync_variants(port: int) -> dict[str, Any]:
    client = redis.Redis(host=HOST, port=port)
    # op_timeout: 5 s, not 0.5: what is measured is the cost of Redis's answers. Beside other
    # work (the test suite's smoke run) a GET took past 0.5 s once; the cache then left Redis
    # alone for retry_after, stored none of the keys after it, and the check below failed.
    cache = RedisCache(client, ttl=3600, namespace="bench", op_timeout=5)
    ours = perrequest.request_memo(shared=cache)(item)
    plain = perrequest.request_memo(item)
    with perrequest.request_scope():
        for n in range(KEYS):
            ours(n)
    keys = sorted(client.scan_iter("bench:*"), key=lambda k: json.loads(client.get(k))["id"])
    assert len(keys) == KEYS

    def first_ours() -> float:
        start = perf_counter_ns()
        with perrequest.request_scope():
            for n in range(KEYS):
                ours(n)
        return (perf_counter_ns() - start) / KEYS

    def first_baseline() -> float:
        get, loads = client.get, json.loads
        start = perf_counter_ns()
        for key in keys:
            loads(get(key))
        return (perf_counter_ns() - start) / KEYS

    def repeated(fn: Any) -> Any:
        def timer() -> float:
            with perrequest.request_scope():
                for _ in range(2):  # first reads, then hits once untimed (warm caches)
                    for n in range(KEYS):
                        fn(n)
                start = perf_counter_ns()
                for n in range(KEYS):
                    fn(n)
                return (perf_counter_ns() - start) / KEYS

        return timer

    return {
        "client": client,
        "first": {"baseline": first_baseline, "ours": first_ours},
        "repeated": {"baseline": repeated(plain), "ours": repeated(ours)},
    }


def async_variants(port: int, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    client = redis.asyncio.Redis(host=HOST, port=port)
    cache = RedisCache(client, ttl=3600, namespace="abench", op_timeout=5)  # see above

    async def item_async(n: int) -> dict[str, Any]:
        return item(n)

    ours = perrequest.request_memo(shared=cache)(item_async)

    async def fill() -> list[bytes]:
        async with perrequest.request_scope():
            for n in range(KEYS):
                await ours(n)
        keys = [k async for k in client.scan_iter("abench:*")]
        values = [json.loads(await client.get(k))["id"] for k in keys]
        return [k for _, k in sorted(zip(values, keys, strict=True))]

    keys = loop.run_until_complete(fill())

    async def first_ours() -> float:
        start = perf_counter_ns()
        async with perrequest.request_scope():
            for n in range(KEYS):
                await ours(n)
        return (perf_counter_ns() - start) / KEYS

    async def first_baseline() -> float:
        get, loads = client.get, json.loads
        start = perf_counter_ns()
        for key in keys:
            loads(await get(key))
        return (perf_counter_ns() - start) / KEYS

    return {
        "baseline": lambda: loop.run_until_complete(first_baseline()),
        "ours": lambda: loop.run_until_complete(first_ours()),
    }


def measure(port: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    loop = asyncio.new_event_loop()
    sync = sync_variants(port)
    cases = {
        "first read in a request, sync": sync["first"],
        "first read in a request, async": async_variants(port, loop),
        "repeated read in a request": sync["repeated"],
    }
    samples = {case: {"baseline": [], "ours": []} for case in cases}
    commands_before = sync["client"].info("stats")["total_commands_processed"]
    gc.disable()
    try:
        for r in range(rounds):
            for case, variants in cases.items():
                for name in ("baseline", "ours")[r % 2 :] + ("baseline", "ours")[: r % 2]:
                    samples[case][name].append(variants[name]())
    finally:
        gc.enable()
        loop.close()
    sent = sync["client"].info("stats")["total_commands_processed"] - commands_before
    # Per round: KEYS first reads (sync), KEYS (async), KEYS baseline GETs of each, and
    # the repeated case's own first reads; its repeated reads send nothing.
    expected = rounds * KEYS * 5
    assert sent <= expected + 10, f"repeated reads reached Redis: {sent} > {expected} commands"
    return samples


# -- the stampede --------------------------------------------------------------------------


def _hot(port: int) -> str:
    with redis.Redis(host=HOST, port=port) as client:
        client.rpush("computations", repr(time.time()))
    time.sleep(COMPUTE_S)
    return "hot"


def stampede_child(port: int, tier: str, seconds: float, barrier: Any) -> None:
    if tier == "redis":
        shared: Any = RedisCache(redis.Redis(host=HOST, port=port), ttl=TTL, namespace="hot")
    else:
        shared = cachetools.TTLCache(maxsize=10, ttl=TTL)
    hot = perrequest.request_memo(shared=shared)(_hot)
    barrier.wait(60)
    deadline = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            with perrequest.request_scope():
                hot(port)
            time.sleep(0.002)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def stampede(port: int, seconds: float) -> dict[str, dict[str, int]]:
    """Computations with each tier, and duplicates: computations that started less than
    ``TTL`` after the one before, so of the same expiry (the value lives ``TTL``)."""
    spawn = multiprocessing.get_context("spawn")
    counts: dict[str, dict[str, int]] = {}
    with redis.Redis(host=HOST, port=port) as client:
        for tier in ("redis", "in-process TTLCache"):
            client.delete("computations")
            barrier = spawn.Barrier(PROCESSES)
            children = [
                spawn.Process(target=stampede_child, args=(port, tier, seconds, barrier))
                for _ in range(PROCESSES)
            ]
            for child in children:
                child.start()
            for child in children:
                child.join(120)
            starts = sorted(float(t) for t in client.lrange("computations", 0, -1))
            duplicates = sum(b - a < TTL for a, b in itertools.pairwise(starts))
            counts[tier] = {"computations": len(starts), "duplicates": duplicates}
    return counts


# -- report --------------------------------------------------------------------------------

TARGETS = {
    "first read in a request, sync": 1.30,
    "first read in a request, async": 1.30,
    "repeated read in a request": 1.10,
}


def report(samples: dict[str, dict[str, list[float]]], counts: dict[str, dict[str, int]],
           rounds: int, seconds: float) -> dict[str, Any]:  # fmt: skip
    print(f"perrequest redis_cost: {rounds} interleaved rounds, median ns per call\n")
    print(f"| {'case':<31} | {'baseline':>9} | {'Redis tier':>10} | ratio | target |")
    print(f"| {'-' * 31} | {'-' * 9}:| {'-' * 10}:| -----:| ------ |")
    results: dict[str, Any] = common.meta(rounds=rounds, keys=KEYS)
    results["cases"] = {}
    for case, by in samples.items():
        ratio = common.ratio(by, "ours", "baseline") or 0.0
        target = TARGETS[case]
        met = ratio <= target
        base, ours = statistics.median(by["baseline"]), statistics.median(by["ours"])
        print(
            f"| {case:<31} | {base:9.0f} | {ours:10.0f} | {ratio:5.2f} | "
            f"<= {target:.2f} {'met' if met else 'NOT met'} |"
        )
        results["cases"][case] = {
            "baseline_ns": base, "ours_ns": ours, "ratio": ratio, "target": target, "met": met,
        }  # fmt: skip
    print(
        "\nbaseline: json.loads(client.get(key)) on the same keys (first reads); a plain "
        "@request_memo hit (repeated reads). ratio: median of per-round ratios."
    )
    print(
        f"\nstampede: {PROCESSES} processes x {THREADS} threads on one key for {seconds} s, "
        f"ttl {TTL} s, {COMPUTE_S * 1000:.0f} ms to compute"
    )
    expiries = seconds / (TTL + COMPUTE_S)  # a value lives TTL after its computation ends
    results["stampede"] = {"seconds": seconds, "processes": PROCESSES, "tiers": counts}
    for tier, row in counts.items():
        print(
            f"  {tier:<20} {row['computations']:3d} computations ({row['duplicates']} of an "
            f"expiry already computed), {row['computations'] / expiries:.1f} per expiry"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = common.arguments(__doc__)
    args = parser.parse_args(argv)
    rounds, seconds = (3, 1.5) if args.quick else (31, 5.0)
    rounds = args.rounds or rounds
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:  # make bench installs it where it can; never fail the whole run
        print(f"redis_cost.py skipped: {SKIPPED}")
        common.write_json(common.meta(skipped=SKIPPED), args.json)
        return 0
    proc, port, folder = start_server(binary)
    try:
        samples = measure(port, rounds)
        counts = stampede(port, seconds)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    common.write_json(report(samples, counts, rounds, seconds), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
