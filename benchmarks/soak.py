"""Soak: a real uvicorn server, a million requests, and its resident memory over time.

    python benchmarks/soak.py                      # 1_000_000 requests, perrequest memo
    python benchmarks/soak.py --naive              # the same app with a module-level dict memo
    python benchmarks/soak.py --requests 200000    # a shorter run

The server is a Starlette app behind perrequest's ASGI middleware, run by
uvicorn in a subprocess on 127.0.0.1. Every request memoizes a ~1 KB value
under a near-unique key (plus one key shared by all requests) and stores it
with ``perrequest.set``: the pattern that makes a module-level dict grow for
ever. The client is a small keep-alive HTTP/1.1 client over a few concurrent
connections. The server's RSS (psutil) is sampled after a warm-up and every
``--report-every`` requests; the script prints the growth per 100k requests
and a verdict, stops by itself (also when RSS passes ``--max-rss-mb``), and
always stops the server.

Exit status: 0 when the run shows what it should (perrequest: flat; --naive:
grows), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
FLAT_LIMIT_MB = 5.0  # DESIGN.md: one million requests grow RSS by less than 5 MB
PAYLOAD_BYTES = 1024


# -- the server ------------------------------------------------------------------------


def build_app(naive: bool) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    import perrequest
    from perrequest.asgi import RequestScopeMiddleware

    cache: dict[str, bytes] = {}  # the naive memo: nothing ever removes from it

    def make_payload(key: str) -> bytes:
        seed = hashlib.sha256(key.encode()).digest()
        return (seed * (PAYLOAD_BYTES // len(seed) + 1))[:PAYLOAD_BYTES]

    @perrequest.request_memo
    def load(key: str) -> bytes:
        return make_payload(key)

    def load_naive(key: str) -> bytes:
        value = cache.get(key)
        if value is None:
            value = cache[key] = make_payload(key)
        return value

    async def item(request: Request) -> Response:
        key = request.path_params["key"]
        if naive:
            value = load_naive(key)
            load_naive("settings")
        else:
            value = load(key)
            load("settings")
            perrequest.set(("item", key), value)
            value = load(key)  # a hit
        return Response(value, media_type="application/octet-stream")

    app = Starlette(routes=[Route("/item/{key}", item)])
    app.add_middleware(RequestScopeMiddleware)
    return app


def serve(port: int, naive: bool) -> None:
    import uvicorn

    uvicorn.run(
        build_app(naive),
        host=HOST,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


# -- the client ------------------------------------------------------------------------


@dataclass
class Run:
    total: int
    report_every: int
    warmup: int
    max_rss_mb: float
    server_pid: int
    done: int = 0
    errors: int = 0
    stopped_early: str = ""
    started: float = field(default_factory=time.perf_counter)
    samples: list[tuple[int, float, float]] = field(default_factory=list)  # n, rss MB, seconds

    def rss_mb(self) -> float:
        import psutil

        return float(psutil.Process(self.server_pid).memory_info().rss) / 2**20

    def sample(self) -> None:
        rss = self.rss_mb()
        self.samples.append((self.done, rss, time.perf_counter() - self.started))
        if len(self.samples) > 1:
            print_row(self.samples[0], self.samples[-2], self.samples[-1])
        if rss > self.max_rss_mb:
            self.stopped_early = f"RSS {rss:.0f} MB passed --max-rss-mb {self.max_rss_mb:.0f}"

    def on_done(self) -> None:
        self.done += 1
        n = self.done
        after_warmup = n - self.warmup
        if (
            after_warmup == 0
            or n == self.total
            or (after_warmup > 0 and after_warmup % self.report_every == 0)
        ):
            self.sample()


def print_row(
    base: tuple[int, float, float], prev: tuple[int, float, float], cur: tuple[int, float, float]
) -> None:
    n, rss, seconds = cur
    per_100k = (rss - prev[1]) / max(n - prev[0], 1) * 100_000
    rate = (n - prev[0]) / max(seconds - prev[2], 1e-9)
    print(
        f"{n:>10,} {rss:>10.1f} {rss - base[1]:>+12.1f} {per_100k:>+14.2f} {rate:>10,.0f}",
        flush=True,
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response on a keep-alive connection: its head and its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


async def connection(port: int, ids: itertools.count[int], run: Run) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while not run.stopped_early:
            i = next(ids)
            if i >= run.total:
                return
            key = f"k{i}"
            writer.write(f"GET /item/{key} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head, body = await read_response(reader)
            if not head.startswith(b"HTTP/1.1 200") or len(body) != PAYLOAD_BYTES:
                run.errors += 1
                if run.errors > 10:
                    run.stopped_early = f"errors: {head[:60]!r}"
            run.on_done()
    finally:
        writer.close()


async def drive(port: int, connections: int, run: Run) -> None:
    ids = itertools.count()
    await asyncio.gather(*(connection(port, ids, run) for _ in range(connections)))


# -- the run ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"the server did not listen on {HOST}:{port}")


def verdict(run: Run, naive: bool) -> tuple[bool, dict[str, Any]]:
    (n0, rss0, _), (n1, rss1, seconds) = run.samples[0], run.samples[-1]
    growth = rss1 - rss0
    per_100k = growth / max(n1 - n0, 1) * 100_000
    flat = growth < FLAT_LIMIT_MB and not run.stopped_early.startswith("RSS")
    mode = "naive module-level dict" if naive else "perrequest"
    summary = {
        "mode": mode,
        "requests": run.done,
        "errors": run.errors,
        "warmup": run.warmup,
        "rss_after_warmup_mb": round(rss0, 1),
        "rss_end_mb": round(rss1, 1),
        "growth_mb": round(growth, 1),
        "growth_per_100k_mb": round(per_100k, 2),
        "requests_per_s": round(run.done / seconds),
        "stopped_early": run.stopped_early,
        "flat": flat,
    }
    word = "FLAT" if flat else "GROWS"
    print(
        f"\nverdict ({mode}): {word}: RSS {rss0:.1f} -> {rss1:.1f} MB "
        f"({growth:+.1f} MB, {per_100k:+.2f} MB per 100k requests) over {n1 - n0:,} requests "
        f"after a {run.warmup:,}-request warm-up; flat means < {FLAT_LIMIT_MB:g} MB."
    )
    if run.stopped_early:
        print(f"stopped early: {run.stopped_early}")
    ok = (flat != naive) and run.errors == 0 and not run.stopped_early.startswith("errors")
    return ok, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--naive", action="store_true", help="a module-level dict memo instead")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--report-every", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=None, help="default: 5%%, at most 20k")
    parser.add_argument("--max-rss-mb", type=float, default=3072)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.naive)
        return 0

    total = args.requests
    warmup = args.warmup if args.warmup is not None else min(20_000, max(total // 20, 1))
    port = free_port()
    argv = [sys.executable, __file__, "--serve", str(port)] + (["--naive"] if args.naive else [])
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_port(port, proc)
        run = Run(total, args.report_every, warmup, args.max_rss_mb, proc.pid)
        mode = "--naive (module-level dict)" if args.naive else "perrequest"
        print(f"soak: {total:,} requests, {args.connections} connections, {mode}, pid {proc.pid}")
        columns = ("requests", 10), ("RSS MB", 10), ("since warmup", 12), ("MB per 100k", 14)
        print(" ".join(f"{name:>{width}}" for name, width in (*columns, ("req/s", 10))))
        asyncio.run(drive(port, args.connections, run))
        if run.samples[-1][0] != run.done:
            run.sample()
        ok, summary = verdict(run, args.naive)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    sys.exit(main())
