"""What a middleware adds to a hello-world request, in machine instructions (callgrind).

The same in-process requests as middleware_overhead.py (bare Starlette and Flask, the
minimal ContextVar middleware, perrequest's middleware, and for WSGI the least middleware
that keeps its store until ``close()``), each variant in its own process
under ``valgrind --tool=callgrind``, twice: with N1 and with N2 requests after a warm-up.
(total(N2) - total(N1)) / (N2 - N1) is the instructions one request costs, start-up and
imports cancelled out. An instruction count does not move with the machine's other load,
where microseconds on a shared machine move by more than the differences measured here:
it is the resolution that timing lacks. (It counts instructions, not cycles: cache misses
and branch mispredictions are not in it.)

Usage: ``.venv/bin/python benchmarks/instructions.py [--quick] [--json PATH]`` (needs
valgrind; Debian package ``valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common as common

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "ASGI": ("bare", "minimal", "perrequest"),
    "WSGI": ("bare", "minimal", "until_close", "perrequest"),
}


def child(protocol: str, variant: str, requests: int) -> None:
    """Serve ``requests`` requests (after a warm-up) through one variant, then exit."""
    import middleware_overhead as mo

    if protocol == "ASGI":  # each protocol's imports only: most of a child's time
        from starlette.middleware import Middleware

        import perrequest.asgi

        middleware = {
            "bare": [],
            "minimal": [Middleware(mo.MinimalASGIMiddleware)],
            "perrequest": [Middleware(perrequest.asgi.RequestScopeMiddleware)],
        }[variant]
        app = mo.starlette_app(*middleware)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(mo.check_asgi(app))
        loop.run_until_complete(mo.serve_asgi(app, 200))
        _freeze()
        loop.run_until_complete(mo.serve_asgi(app, requests))
    else:
        import perrequest.wsgi

        flask = mo.flask_app()
        wsgi_app = {
            "bare": flask,
            "minimal": mo.MinimalWSGIMiddleware(flask),
            "until_close": mo.UntilCloseWSGIMiddleware(flask),
            "perrequest": perrequest.wsgi.RequestScopeMiddleware(flask),
        }[variant]
        mo.check_wsgi(wsgi_app)
        mo.serve_wsgi(wsgi_app, 200)
        _freeze()
        mo.serve_wsgi(wsgi_app, requests)


def _freeze() -> None:
    """Move what the imports and the warm-up made out of the collector's way: a full
    collection scanning them would cost a request tens of thousands of instructions,
    landing in one run and not the other. Young collections, which requests pay for,
    still run."""
    gc.collect()
    gc.freeze()


def _instructions(protocol: str, variant: str, requests: int) -> int:
    script = str(Path(__file__).resolve())
    return common.callgrind(script, "--child", protocol, variant, str(requests), cwd=str(HERE))


def measure(n1: int, n2: int) -> dict[str, dict[str, int]]:
    """Instructions per request, per protocol and variant."""
    jobs = [(p, v, n) for p, names in VARIANTS.items() for v in names for n in (n1, n2)]
    with ThreadPoolExecutor(max_workers=2) as pool:  # counts do not depend on the load
        totals = dict(zip(jobs, pool.map(lambda job: _instructions(*job), jobs), strict=True))
    return {
        p: {v: (totals[(p, v, n2)] - totals[(p, v, n1)]) // (n2 - n1) for v in names}
        for p, names in VARIANTS.items()
    }


def report(per_request: dict[str, dict[str, int]], n1: int, n2: int) -> dict[str, Any]:
    meta = common.meta(requests=[n1, n2])
    print(
        f"perrequest instructions: {meta['python']}, {meta['platform']}, callgrind, "
        f"instructions per request from runs of {n1} and {n2} requests"
    )
    results: dict[str, Any] = {"meta": meta, "protocols": {}}
    for protocol, counts in per_request.items():
        bare, minimal, ours = counts["bare"], counts["minimal"], counts["perrequest"]
        print(f"\n## {protocol}\n")
        print(f"| {'variant':<12} | {'instructions':>12} | {'- bare':>8} |")
        print(f"| {'-' * 12} | {'-' * 12}:| {'-' * 8}:|")
        for name, count in counts.items():
            print(f"| {name:<12} | {count:12,d} | {count - bare:+8,d} |")
        results["protocols"][protocol] = {
            **counts,
            "perrequest_minus_minimal": ours - minimal,
            "minimal_minus_bare": minimal - bare,
        }
        print(f"\nperrequest - minimal middleware: {ours - minimal:+,d} instructions")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few requests (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--child", nargs=3, metavar=("PROTOCOL", "VARIANT", "N"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        protocol, variant, requests = args.child
        child(protocol, variant, int(requests))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions.py needs valgrind (Debian: apt-get install valgrind)")
    n1, n2 = (20, 60) if args.quick else (500, 1500)
    results = report(measure(n1, n2), n1, n2)
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
