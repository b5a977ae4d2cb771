"""What perrequest's Django middleware adds to a hello-world Django request (no target).

Each request goes through Django's ``WSGIHandler`` as a WSGI server drives it: a fresh
PEP 3333 environ, the body iterated, then ``close()`` (which sends ``request_finished``
and, with perrequest, ends the scope). Variants, one handler each, in interleaved rounds:
Django with no middleware, with perrequest's ``RequestScopeMiddleware``, and with a
minimal ContextVar middleware (set a dict around ``get_response``) for reference.
Medians of per-round differences.

Usage: ``.venv/bin/python benchmarks/django_overhead.py [--quick] [--rounds N]``
"""

from __future__ import annotations

import gc
import io
import statistics
import sys
from contextvars import ContextVar
from time import perf_counter
from typing import Any

import _common as common
import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="benchmark",
    MIDDLEWARE=[],
    LOGGING_CONFIG=None,
)
django.setup()

from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.test.utils import override_settings  # noqa: E402
from django.urls import path  # noqa: E402

_store: ContextVar[dict[str, Any] | None] = ContextVar("django_minimal_store", default=None)


def hello(request: Any) -> HttpResponse:
    return HttpResponse("Hello, world!")


urlpatterns = [path("", hello)]


def minimal(get_response: Any) -> Any:
    """A dict in a ContextVar around ``get_response``, nothing more."""

    def middleware(request: Any) -> Any:
        token = _store.set({})
        try:
            return get_response(request)
        finally:
            _store.reset(token)

    return middleware


VARIANTS = {
    "bare Django": [],
    "perrequest RequestScopeMiddleware": ["perrequest.django.RequestScopeMiddleware"],
    "minimal ContextVar middleware": [f"{__name__}.minimal"],
}


def environ() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def serve(handler: WSGIHandler, requests: int) -> float:
    """Microseconds per request, body iterated and closed as a server does."""
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)

    start = perf_counter()
    for _ in range(requests):
        body = handler(environ(), start_response)
        for _chunk in body:
            pass
        body.close()  # type: ignore[attr-defined]
    elapsed = perf_counter() - start
    assert statuses[-1].startswith("200"), statuses[-1]
    return elapsed / requests * 1e6


def main() -> int:
    args = common.arguments(__doc__).parse_args()
    rounds = args.rounds or (3 if args.quick else 31)
    requests = 50 if args.quick else 1_000
    handlers = {}
    for name, middleware in VARIANTS.items():
        with override_settings(MIDDLEWARE=middleware):
            handlers[name] = WSGIHandler()
        serve(handlers[name], 20)  # warm up, and check the response
    names = list(handlers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        gc.collect()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(serve(handlers[name], requests))
    bare = samples["bare Django"]
    print(f"perrequest django_overhead: {rounds} interleaved rounds of {requests} requests\n")
    print(f"| {'variant':<34} | us/request |    +us |")
    print(f"| {'-' * 34} | ----------:| ------:|")
    results: dict[str, Any] = {"meta": common.meta(), "rounds": rounds, "variants": {}}
    for name in names:
        added = statistics.median(t - b for t, b in zip(samples[name], bare, strict=True))
        median = statistics.median(samples[name])
        print(f"| {name:<34} | {median:10.2f} | {added:+6.2f} |")
        results["variants"][name] = {"us": median, "added_us": added}
    print("\n+us: median of per-round differences from bare Django. No target (DESIGN.md).")
    common.write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
