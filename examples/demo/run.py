"""``make demo``: the same app with a naive memo and with perrequest, side by side.

Starts ``examples/demo/app.py`` twice under a real uvicorn server on 127.0.0.1
(``PERREQUEST_DEMO_MODE=naive`` and ``=perrequest``), sends both the same
requests with near-unique request ids, samples each server's resident memory
as it goes, then prints a table and a verdict and writes a chart: the naive
server climbs with every request, the perrequest one stays flat.

Run it from the repository root: ``python examples/demo/run.py [--requests N]``.
The servers are always stopped, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
MODES = ("naive", "perrequest")
MB = 1024 * 1024
WARMUP = 200  # requests per server before the baseline: first-request allocations are not a leak


@dataclass
class Server:
    """One uvicorn subprocess serving the demo app in one mode, and what was measured."""

    mode: str
    port: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    client: httpx.Client
    samples: list[tuple[int, int]] = field(default_factory=list)  # (requests served, rss)
    before: dict[str, Any] = field(default_factory=dict)  # /stats after the warm-up
    after: dict[str, Any] = field(default_factory=dict)  # /stats at the end

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stats(self) -> dict[str, Any]:
        response = self.client.get("/stats")
        response.raise_for_status()
        return dict(response.json())

    def growth(self) -> float:
        """Resident memory gained over the measured requests, in bytes."""
        return float(self.samples[-1][1] - self.samples[0][1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the same FastAPI app with a module-level memo (naive) and with "
        "perrequest under uvicorn, send both the same load, and compare their memory.",
    )
    parser.add_argument(
        "--requests", type=int, default=6_000, help="requests per server (default: 6000)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight per server (default: 8)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="base port: naive on P, perrequest on P+1 (default: two free ports)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("demo-memory.png"),
        help="where to write the chart (default: demo-memory.png)",
    )
    parser.add_argument(
        "--sample-every",
        type=int,
        default=0,
        help="sample memory every N requests (default: requests/100)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write a JSON summary (pids, ports, samples, stats) to PATH",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.sample_every < 0:
        parser.error("--requests and --concurrency must be >= 1, --sample-every >= 0")
    if args.port and not 0 < args.port < 65535:
        parser.error("--port must be between 1 and 65534")
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def connect(port: int) -> httpx.Client:
    """A client with one keep-alive connection; each load thread has its own, so none is shared."""
    return httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30, trust_env=False)


def start_server(mode: str, port: int) -> Server:
    """Start uvicorn in its own session, so Ctrl-C reaches only us and we stop it in order."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop_server
    command = [sys.executable, "-m", "uvicorn", "examples.demo.app:app"]
    command += ["--host", HOST, "--port", str(port), "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "PERREQUEST_DEMO_MODE": mode},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(mode, port, proc, log, connect(port))


def server_log(server: Server) -> str:
    server.log.seek(0)
    return server.log.read().decode(errors="replace")


def wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"the {server.mode} server exited with code {server.proc.returncode}:\n"
                + server_log(server)
            )
        try:
            server.stats()
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"the {server.mode} server did not answer on port {server.port}")


def stop_server(server: Server) -> None:
    """Terminate, then kill if it lingers; never leaves a process behind."""
    server.client.close()
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=5)
    server.log.close()


def fetch(client: httpx.Client, mode: str, request_id: str) -> None:
    response = client.get("/profile", params={"request_id": request_id})
    if response.status_code != 200:
        raise RuntimeError(f"the {mode} server answered {response.status_code}")


class Load:
    """Sends ``total`` near-unique request ids to every server, ``concurrency`` at a time."""

    def __init__(self, servers: list[Server], total: int, sample_every: int) -> None:
        self.servers = servers
        self.total = total
        self.sample_every = sample_every
        self.started = 0
        self.done = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def sample(self, done: int) -> None:
        for server in self.servers:
            server.samples.append((done, server.rss()))

    def worker(self) -> None:
        clients = [connect(server.port) for server in self.servers]
        try:
            while not self.stop.is_set():
                with self.lock:
                    if self.started >= self.total:
                        return
                    self.started += 1
                self.send(clients, uuid.uuid4().hex)
        finally:
            for client in clients:
                client.close()

    def send(self, clients: list[httpx.Client], request_id: str) -> None:
        """The same request id to every server, then a memory sample every so often."""
        for client, server in zip(clients, self.servers, strict=True):
            fetch(client, server.mode, request_id)
        with self.lock:
            self.done += 1
            done = self.done
        if done % self.sample_every == 0 or done == self.total:
            self.sample(done)


def progress(done: int, total: int, elapsed: float, final: bool = False) -> None:
    """A text bar on stderr, redrawn in place on a terminal, printed once otherwise."""
    if not (final or sys.stderr.isatty()):
        return
    width = 30
    filled = width * done // total
    rate = done / elapsed if elapsed > 0 else 0.0
    bar = "#" * filled + "." * (width - filled)
    end = "\n" if final else ""
    print(f"\r  [{bar}] {done:,}/{total:,} requests, {rate:,.0f}/s", end=end, file=sys.stderr)


def run_load(servers: list[Server], total: int, concurrency: int, sample_every: int) -> float:
    """Drive the load with a progress bar; returns the wall time of the measured part."""
    load = Load(servers, total, sample_every)
    load.sample(0)
    start = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load")
    futures: list[Future[None]] = [pool.submit(load.worker) for _ in range(concurrency)]
    try:
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for future in finished:
                future.result()  # a failed request stops the demo with its error
            progress(load.done, total, time.monotonic() - start)
    finally:
        load.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    elapsed = time.monotonic() - start
    progress(load.done, total, elapsed, final=True)
    for server in servers:
        server.samples.sort()
    return elapsed


def per_100k(server: Server, total: int) -> float:
    return server.growth() / MB * 100_000 / total


def table(servers: list[Server], total: int) -> str:
    """The comparison, one column per mode."""

    def count(server: Server, key: str) -> int:
        return int(server.after[key]) - int(server.before[key])

    rows: list[tuple[str, list[str]]] = [
        ("requests served", [f"{total:,}" for _ in servers]),
        ("memory at start", [f"{s.samples[0][1] / MB:,.1f} MB" for s in servers]),
        ("memory at end", [f"{s.samples[-1][1] / MB:,.1f} MB" for s in servers]),
        ("growth", [f"{s.growth() / MB:+,.1f} MB" for s in servers]),
        ("growth per 100k requests", [f"{per_100k(s, total):+,.1f} MB" for s in servers]),
        ("lookup calls", [f"{count(s, 'calls'):,}" for s in servers]),
        ("lookups computed", [f"{count(s, 'computed'):,}" for s in servers]),
        ("avoided within requests", [f"{count(s, 'avoided'):,}" for s in servers]),
        ("memo entries left behind", [f"{count(s, 'memo_entries'):,}" for s in servers]),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [" " * width + "".join(f"{s.mode:>14}" for s in servers)]
    lines += [label.ljust(width) + "".join(f"{v:>14}" for v in values) for label, values in rows]
    return "\n".join(lines)


def verdict(servers: list[Server], total: int) -> str:
    naive, scoped = servers
    left = naive.after["memo_entries"] - naive.before["memo_entries"]
    avoided = scoped.after["avoided"] - scoped.before["avoided"]
    return (  # at most 80 columns: the docs show this output
        f"naive:      {per_100k(naive, total):+8,.1f} MB per 100k requests: grows without bound\n"
        f"            ({left:,} entries nobody will read again)\n"
        f"perrequest: {per_100k(scoped, total):+8,.1f} MB per 100k requests: flat\n"
        f"Both memos spared the same {avoided:,} repeated lookups within requests;\n"
        "only the naive one keeps them."
    )


def plot(servers: list[Server], total: int, concurrency: int, output: Path) -> None:
    """Memory against requests served: the naive line climbs, the perrequest one stays flat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "naive": "naive: module-level dict memo",
        "perrequest": "perrequest: @request_memo + RequestScopeMiddleware",
    }
    colors = {"naive": "#d62728", "perrequest": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(9, 5.2), dpi=110)
    for server in servers:
        xs = [served for served, _ in server.samples]
        ys = [rss / MB for _, rss in server.samples]
        label = f"{labels[server.mode]} ({server.growth() / MB:+,.1f} MB)"
        ax.plot(xs, ys, label=label, color=colors[server.mode], linewidth=2.2)
        ax.annotate(
            f"{per_100k(server, total):+,.0f} MB per 100k requests",
            xy=(xs[-1], ys[-1]),
            xytext=(-6, 6) if server.mode == "perrequest" else (-6, -14),
            textcoords="offset points",
            ha="right",
            va="bottom" if server.mode == "perrequest" else "top",
            color=colors[server.mode],
        )
    ax.set_title(
        "Same FastAPI app under uvicorn, same requests with near-unique ids\n"
        "a process-lifetime memo leaks; a per-request memo does not",
        fontsize=12,
    )
    ax.set_xlabel(f"requests served (concurrency {concurrency})")
    ax.set_ylabel("server resident memory (MB)")
    ax.set_xlim(0, total)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:,.0f}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def summary(servers: list[Server], total: int, elapsed: float, output: Path) -> dict[str, Any]:
    return {
        "requests": total,
        "load_seconds": round(elapsed, 2),
        "chart": str(output),
        "servers": {
            s.mode: {
                "pid": s.proc.pid,
                "port": s.port,
                "rss_start": s.samples[0][1],
                "rss_end": s.samples[-1][1],
                "growth_bytes": s.growth(),
                "growth_mb_per_100k": round(per_100k(s, total), 2),
                "stats_before": s.before,
                "stats_after": s.after,
                "samples": s.samples,
            }
            for s in servers
        },
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean-up path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    sample_every = args.sample_every or max(1, args.requests // 100)
    ports = [args.port, args.port + 1] if args.port else [free_port(), free_port()]
    began = time.monotonic()
    servers: list[Server] = []
    try:
        for mode, port in zip(MODES, ports, strict=True):
            servers.append(start_server(mode, port))
        for server in servers:
            wait_ready(server)
            print(
                f"{server.mode:>10} server: pid {server.proc.pid} on http://{HOST}:{server.port}",
                file=sys.stderr,
            )
        for server in servers:  # warm up, then take the baseline
            for n in range(WARMUP):
                fetch(server.client, server.mode, f"warmup-{n}")
            server.before = server.stats()
        print(f"sending {args.requests:,} requests to each server...", file=sys.stderr)
        elapsed = run_load(servers, args.requests, args.concurrency, sample_every)
        for server in servers:
            server.after = server.stats()
        plot(servers, args.requests, args.concurrency, args.output)
        print(table(servers, args.requests))
        print()
        print(verdict(servers, args.requests))
        print(
            f"chart: {args.output}  (load {elapsed:.1f} s, total {time.monotonic() - began:.1f} s)"
        )
        if args.json is not None:
            result = summary(servers, args.requests, elapsed, args.output)
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the servers", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short and orphan a server.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        for server in servers:
            stop_server(server)
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
