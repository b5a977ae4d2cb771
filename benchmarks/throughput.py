"""Throughput of a FastAPI endpoint that repeats one expensive lookup ten times per request.

The situation perrequest is for: several places of one request (a dependency, the
endpoint, a helper it calls) ask for the same thing, here the current user's
permissions, an async lookup that costs one round trip to a database (1 ms of
``asyncio.sleep``, so the number does not depend on a database being installed). One
route calls the plain function ten times; the other calls the same function under
``@request_memo``, so the lookup runs once per request and nine calls are hits.

The app runs under a real uvicorn server in a subprocess on 127.0.0.1 (one worker), and
a small keep-alive HTTP/1.1 client drives it over a few concurrent connections. The two
routes are measured in interleaved rounds (alternating which goes first), each for a
fixed number of requests; reported: requests per second and median latency per route,
and the median over rounds of the throughput ratio (memo / plain), measured in the same
round.

Usage: ``.venv/bin/python benchmarks/throughput.py [--quick] [--rounds N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import _common as common
from soak import free_port, read_response, wait_for_port

HOST = "127.0.0.1"
LOOKUPS_PER_REQUEST = 10
LOOKUP_SECONDS = 0.001
ROUTES = {"plain": "/plain", "request_memo": "/memo"}


# -- the server ---------------------------------------------------------------------------------


def build_app() -> Any:
    from fastapi import Depends, FastAPI, Header

    from perrequest import request_memo
    from perrequest.asgi import RequestScopeMiddleware

    async def permissions(user: str) -> frozenset[str]:
        await asyncio.sleep(LOOKUP_SECONDS)  # one round trip to the database
        return frozenset({f"{user}:read", f"{user}:write"})

    memoized = request_memo(permissions)

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    async def check(user: str, lookup: Any) -> int:
        granted = 0
        for _ in range(LOOKUPS_PER_REQUEST - 1):  # the helpers the endpoint calls
            granted += f"{user}:read" in await lookup(user)
        return granted

    async def plain_user(x_user: str = Header("alice")) -> tuple[str, bool]:
        return x_user, f"{x_user}:read" in await permissions(x_user)  # the dependency

    async def memo_user(x_user: str = Header("alice")) -> tuple[str, bool]:
        return x_user, f"{x_user}:read" in await memoized(x_user)

    @app.get("/plain")
    async def plain(user: tuple[str, bool] = Depends(plain_user)) -> dict[str, int]:
        return {"granted": await check(user[0], permissions) + user[1]}

    @app.get("/memo")
    async def memo(user: tuple[str, bool] = Depends(memo_user)) -> dict[str, int]:
        return {"granted": await check(user[0], memoized) + user[1]}

    return app


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(
        build_app(), host=HOST, port=port, log_level="warning", access_log=False, lifespan="off"
    )


# -- the client ---------------------------------------------------------------------------------


async def _connection(port: int, path: str, requests: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nX-User: alice\r\n\r\n".encode()
    try:
        for _ in range(requests):
            start = time.perf_counter()
            writer.write(request)
            head, body = await read_response(reader)
            if not head.startswith(b"HTTP/1.1 200") or json.loads(body)["granted"] != 10:
                raise RuntimeError(f"unexpected response {head[:40]!r} {body[:80]!r}")
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def _batch(port: int, path: str, connections: int, requests: int) -> tuple[float, float]:
    """Requests per second and median latency (ms) of one batch on one route."""
    latencies: list[float] = []
    start = time.perf_counter()
    per_connection = requests // connections
    await asyncio.gather(
        *(_connection(port, path, per_connection, latencies) for _ in range(connections))
    )
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, statistics.median(latencies) * 1000


def measure(rounds: int, requests: int, connections: int) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, __file__, "--serve", str(port)]
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    samples: dict[str, dict[str, list[float]]] = {name: {"rps": [], "ms": []} for name in ROUTES}
    try:
        wait_for_port(port, proc)

        async def run() -> None:
            for path in ROUTES.values():  # warm up
                await _batch(port, path, connections, connections * 5)
            for r in range(rounds):
                names = list(ROUTES)
                for name in names[r % 2 :] + names[: r % 2]:
                    rps, ms = await _batch(port, ROUTES[name], connections, requests)
                    samples[name]["rps"].append(rps)
                    samples[name]["ms"].append(ms)

        asyncio.run(run())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    ratio = statistics.median(
        m / p for m, p in zip(samples["request_memo"]["rps"], samples["plain"]["rps"], strict=True)
    )
    return {
        "meta": common.meta(rounds=rounds, requests_per_round=requests, connections=connections),
        "routes": {
            name: {
                "requests_per_s": statistics.median(s["rps"]),
                "median_latency_ms": statistics.median(s["ms"]),
            }
            for name, s in samples.items()
        },
        "ratio": ratio,
    }


def report(results: dict[str, Any]) -> None:
    meta = results["meta"]
    print(
        f"perrequest throughput: {meta['python']}, {meta['cpus']} CPUs, uvicorn (1 worker) on "
        f"{HOST}, {meta['connections']} connections, {meta['rounds']} interleaved rounds of "
        f"{meta['requests_per_round']} requests per route\n"
    )
    print(f"FastAPI endpoint: {LOOKUPS_PER_REQUEST} calls of a {LOOKUP_SECONDS * 1000:g} ms lookup")
    print(f"\n| {'route':<34} | {'requests/s':>10} | {'median ms':>9} |")
    print(f"| {'-' * 34} | {'-' * 10}:| {'-' * 9}:|")
    labels = {
        "plain": f"plain: {LOOKUPS_PER_REQUEST} lookups per request",
        "request_memo": "@request_memo: 1 lookup, 9 hits",
    }
    for name, row in results["routes"].items():
        print(
            f"| {labels[name]:<34} | {row['requests_per_s']:10.0f} "
            f"| {row['median_latency_ms']:9.2f} |"
        )
    print(
        f"\nthroughput, request_memo / plain: {results['ratio']:.2f}x (median of per-round ratios)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two short rounds (smoke test)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    rounds, requests = (2, 40) if args.quick else (7, 400)
    results = measure(args.rounds or rounds, requests, args.connections)
    report(results)
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
