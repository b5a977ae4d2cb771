"""What a request scope middleware adds to a hello-world request, served in-process.

ASGI: a bare Starlette app with one route returning ``PlainTextResponse("Hello, world!")``,
and the same app with, as its only user middleware:

- ``perrequest.asgi.RequestScopeMiddleware`` (pure ASGI);
- a minimal hand-written pure ASGI ContextVar middleware (set a dict, reset in ``finally``);
- ``starlette_context.middleware.RawContextMiddleware`` (pure ASGI);
- ``starlette_context.middleware.ContextMiddleware`` (``BaseHTTPMiddleware``).

Each request is one ``await app(scope, receive, send)`` from a hand-made driver: a fresh copy
of a GET scope, a ``receive`` that hands over the empty body and then, like uvicorn, waits for
the response to complete before reporting ``http.disconnect``, and a ``send`` that keeps the
status and body. No network, no httpx, no TestClient: the driver costs a few microseconds, so
the app and the middleware dominate what is timed.

WSGI: a bare Flask app with the same route, and the same app wrapped in
``perrequest.wsgi.RequestScopeMiddleware`` and, for reference, in two hand-written ContextVar
middlewares: the minimal one, which sets and resets around the app call only (its store is
gone before the body is iterated and closed), and the least one that keeps its store until
the response is closed, as DESIGN.md asks (it wraps the body and resets in ``close()``; no
more). Each request calls
``app(environ, start_response)`` with a fresh PEP 3333 environ, iterates the body and calls
its ``close()``, as a WSGI server does.

All variants are timed in interleaved rounds (rotating order) in one process; each round
serves a batch of requests per variant. Reported: median microseconds per request, and the
medians over rounds of (variant - bare) and (variant / bare), measured in the same round.
The targets are microseconds added to the bare app. benchmarks/instructions.py counts the
same requests in instructions (callgrind), which no other load on the machine changes.

Usage: ``.venv/bin/python benchmarks/middleware_overhead.py [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import io
import statistics
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import _common as common

# The frameworks are imported where an app is made: instructions.py's child processes,
# which run under callgrind, then import only their protocol's (the imports were most of
# each child's time there).
if TYPE_CHECKING:
    from flask import Flask
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

HELLO = b"Hello, world!"

# -- the hand-written minimal middlewares (the DESIGN.md reference) -----------------------------

_request_store: contextvars.ContextVar[dict[Any, Any] | None] = contextvars.ContextVar(
    "minimal_request_store", default=None
)


class MinimalASGIMiddleware:
    """Pure ASGI: a fresh dict in a ContextVar for each HTTP request, reset in ``finally``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _request_store.set({})
        try:
            await self.app(scope, receive, send)
        finally:
            _request_store.reset(token)


class MinimalWSGIMiddleware:
    """A fresh dict in a ContextVar around the app call (not around a lazy body)."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        token = _request_store.set({})
        try:
            return self.app(environ, start_response)
        finally:
            _request_store.reset(token)


class _UntilCloseBody:
    """The app's body; its ``close()`` closes the app's, then resets the ContextVar."""

    __slots__ = ("_body", "_token")

    def __init__(self, body: Iterable[bytes], token: contextvars.Token[Any]) -> None:
        self._body = body
        self._token = token

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            _request_store.reset(self._token)


class UntilCloseWSGIMiddleware:
    """The least a WSGI middleware can do and keep its store until the response is closed
    (a streaming body, Flask's ``call_on_close``): set a dict, wrap the body, reset in its
    ``close()``. Nothing else: no store made lazily, no nesting check, nothing for a server
    that iterates in another thread or never closes the body. The floor of the WSGI target."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        token = _request_store.set({})
        try:
            body = self.app(environ, start_response)
        except BaseException:
            _request_store.reset(token)
            raise
        return _UntilCloseBody(body, token)


# -- the apps ---------------------------------------------------------------------------------


def starlette_app(*middleware: Middleware) -> ASGIApp:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("Hello, world!")

    return Starlette(routes=[Route("/", hello)], middleware=list(middleware))


def flask_app() -> Flask:
    from flask import Flask

    app = Flask("hello")

    @app.route("/")
    def index() -> str:
        return "Hello, world!"

    return app


# The bare app again, built separately: how far two identical apps drift apart in
# this harness, the resolution every other ratio here has.
NOISE = "bare app, a second copy (noise)"
MINIMAL = "minimal ContextVar middleware"
UNTIL_CLOSE = "minimal, store until close()"


def asgi_variants() -> dict[str, ASGIApp]:
    from starlette.middleware import Middleware
    from starlette_context.middleware import ContextMiddleware, RawContextMiddleware

    import perrequest.asgi

    return {
        "bare Starlette": starlette_app(),
        "perrequest RequestScopeMiddleware": starlette_app(
            Middleware(perrequest.asgi.RequestScopeMiddleware)
        ),
        "minimal ContextVar middleware": starlette_app(Middleware(MinimalASGIMiddleware)),
        "starlette-context Raw (pure ASGI)": starlette_app(Middleware(RawContextMiddleware)),
        "starlette-context (BaseHTTP)": starlette_app(Middleware(ContextMiddleware)),
        NOISE: starlette_app(),
    }


def wsgi_variants() -> dict[str, WSGIApp]:
    import perrequest.wsgi

    app = flask_app()
    return {
        "bare Flask": app,
        "perrequest RequestScopeMiddleware": perrequest.wsgi.RequestScopeMiddleware(app),
        "minimal ContextVar middleware": MinimalWSGIMiddleware(app),
        UNTIL_CLOSE: UntilCloseWSGIMiddleware(app),
        NOISE: flask_app(),
    }


# -- the drivers --------------------------------------------------------------------------------

ASGI_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"testserver"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("testserver", 80),
    "state": {},
}


class Exchange:
    """One request's receive and send, behaving like uvicorn's."""

    __slots__ = ("body", "done", "requested", "status")

    def __init__(self) -> None:
        self.requested = False
        self.done: asyncio.Event | None = None
        self.status = 0
        self.body = b""

    async def receive(self) -> Message:
        if not self.requested:
            self.requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.done is None:
            self.done = asyncio.Event()
        await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")
            if not message.get("more_body", False) and self.done is not None:
                self.done.set()


async def serve_asgi(app: ASGIApp, requests: int) -> float:
    """Serve ``requests`` GET / and return microseconds per request."""
    start = perf_counter_ns()
    for _ in range(requests):
        exchange = Exchange()
        scope = dict(ASGI_SCOPE)
        scope["state"] = {}
        await app(scope, exchange.receive, exchange.send)
    return (perf_counter_ns() - start) / requests / 1000


async def check_asgi(app: ASGIApp) -> None:
    exchange = Exchange()
    await app(dict(ASGI_SCOPE, state={}), exchange.receive, exchange.send)
    if (exchange.status, exchange.body) != (200, HELLO):
        raise RuntimeError(f"unexpected response {exchange.status} {exchange.body!r}")


WSGI_ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/",
    "QUERY_STRING": "",
    "SERVER_NAME": "testserver",
    "SERVER_PORT": "80",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "127.0.0.1",
    "HTTP_HOST": "testserver",
    "HTTP_USER_AGENT": "bench",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": False,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return _write


def _write(data: bytes) -> None:
    pass


def serve_wsgi(app: WSGIApp, requests: int) -> float:
    """Serve ``requests`` GET / as a WSGI server does; return microseconds per request."""
    start = perf_counter_ns()
    for _ in range(requests):
        environ = dict(WSGI_ENVIRON)
        environ["wsgi.input"] = io.BytesIO()
        body = app(environ, _start_response)
        try:
            for _chunk in body:
                pass
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
    return (perf_counter_ns() - start) / requests / 1000


def check_wsgi(app: WSGIApp) -> None:
    environ = dict(WSGI_ENVIRON, **{"wsgi.input": io.BytesIO()})
    body = app(environ, _start_response)
    try:
        data = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    if data != HELLO:
        raise RuntimeError(f"unexpected body {data!r}")


# -- the run ------------------------------------------------------------------------------------

Samples = dict[str, dict[str, list[float]]]  # protocol -> variant -> microseconds per request


def measure(rounds: int, asgi_requests: int, wsgi_requests: int) -> Samples:
    asgi, wsgi = asgi_variants(), wsgi_variants()
    loop = asyncio.new_event_loop()
    samples: Samples = {"ASGI": {n: [] for n in asgi}, "WSGI": {n: [] for n in wsgi}}
    try:
        for app in asgi.values():
            loop.run_until_complete(check_asgi(app))
            loop.run_until_complete(serve_asgi(app, asgi_requests))  # warm up
        for wapp in wsgi.values():
            check_wsgi(wapp)
            serve_wsgi(wapp, wsgi_requests)
        for r in range(rounds):
            names = list(asgi)
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                samples["ASGI"][name].append(
                    loop.run_until_complete(serve_asgi(asgi[name], asgi_requests))
                )
            names = list(wsgi)
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                samples["WSGI"][name].append(serve_wsgi(wsgi[name], wsgi_requests))
    finally:
        loop.close()
    return samples


# protocol -> (the variant with a target, microseconds it may add to the bare app)
TARGETS = {
    "ASGI": ("perrequest RequestScopeMiddleware", 0.6),
    "WSGI": ("perrequest RequestScopeMiddleware", 2.0),
}


def report(samples: Samples, rounds: int) -> dict[str, Any]:
    meta = common.meta(rounds=rounds)
    print(
        f"perrequest middleware_overhead: {meta['python']}, {meta['platform']}, "
        f"{meta['cpus']} CPUs, {rounds} interleaved rounds, in-process, no network"
    )
    results: dict[str, Any] = {"meta": meta, "protocols": {}}
    for protocol, variants in samples.items():
        bare_name = next(iter(variants))
        bare = variants[bare_name]
        target_name, target = TARGETS[protocol]
        print(f"\n## {protocol}\n")
        print(
            f"| {'variant':<34} | {'us/request':>10} | {'+us':>6} | {'x bare':>7} "
            f"| {'target':>7} | status  |"
        )
        print(f"| {'-' * 34} | {'-' * 10}:| {'-' * 6}:| {'-' * 7}:| {'-' * 7}:| ------- |")
        rows: dict[str, Any] = {}
        for name, values in variants.items():
            median_us = statistics.median(values)
            added = statistics.median(v - b for v, b in zip(values, bare, strict=True))
            ratio = statistics.median(v / b for v, b in zip(values, bare, strict=True))
            met = added <= target if name == target_name else None
            wanted = f"<= +{target:.1f}" if name == target_name else ""
            status = "" if met is None else ("met" if met else "NOT met")
            print(
                f"| {name:<34} | {median_us:10.2f} | {added:+6.2f} | {ratio:7.3f} "
                f"| {wanted:>7} | {status:<7} |"
            )
            rows[name] = {
                "median_us": median_us,
                "added_us": added,
                "ratio": ratio,
                "target": wanted,
                "met": met,
            }
        results["protocols"][protocol] = rows
        over_minimal = statistics.median(
            o - m for o, m in zip(variants[target_name], variants[MINIMAL], strict=True)
        )
        results["protocols"][protocol]["perrequest - minimal"] = {"added_us": over_minimal}
        print(f"\nperrequest over the minimal ContextVar middleware: {over_minimal:+.2f} us")
        if UNTIL_CLOSE in variants:
            print(
                f"the least middleware that keeps its store until close(), over bare: "
                f"{rows[UNTIL_CLOSE]['added_us']:+.2f} us (the floor under the WSGI target)"
            )
    print(
        "\n+us and x bare: medians of per-round differences and ratios. Targets: "
        "DESIGN.md 'Performance' (microseconds added to the bare app)."
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = common.arguments(__doc__)
    args = parser.parse_args(argv)
    rounds, asgi_requests, wsgi_requests = (3, 20, 50) if args.quick else (41, 200, 500)
    rounds = args.rounds or rounds
    samples = measure(rounds, asgi_requests, wsgi_requests)
    results = report(samples, rounds)
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
