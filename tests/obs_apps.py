"""Apps for tests/test_attack_obs.py, served by gunicorn (``obs_apps:multiprocess_app``).

Under gunicorn with several workers and prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``), ``/metrics`` serves what every worker counted,
the way prometheus-client's docs say to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

import perrequest.prometheus
from perrequest import request_memo
from perrequest.wsgi import RequestScopeMiddleware

perrequest.prometheus.instrument()


@request_memo
def load(x: str) -> str:
    return x


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/metrics":
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = (load(environ["PATH_INFO"]) + load(environ["PATH_INFO"])).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


multiprocess_app = RequestScopeMiddleware(_app)
