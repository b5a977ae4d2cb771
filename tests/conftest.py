"""Every test ends with no request scope left open in this process; the Redis servers of
the Redis tier's tests (``tests/redis_server.py``), started on demand; and httpx's default
SSL context made once per process, not once per client."""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from perrequest.testing import assert_no_live_scopes, live_scopes


def _share_httpx_default_ssl_context() -> None:
    """httpx makes an SSL context for every client, and ``httpx.get()`` makes a client per
    call: loading the CA certificates into it costs about 20 ms of CPU each time, which the
    tests paid tens of thousands of times (one request at a time, polling a server's state
    every 50 ms) to talk plain HTTP to 127.0.0.1; over half of some server tests' time.
    Here a process makes the default one (the same certificates, the same checks) once."""
    try:
        from httpx._transports import default as transports
    except ImportError:  # another httpx: its clients make their own
        return
    make = getattr(transports, "create_ssl_context", None)
    if make is None:
        return

    @functools.cache
    def default_context() -> ssl.SSLContext:
        return make()

    def create_ssl_context(
        verify: Any = True, cert: Any = None, trust_env: bool = True
    ) -> ssl.SSLContext:
        if verify is True and cert is None and trust_env:
            return default_context()
        return make(verify=verify, cert=cert, trust_env=trust_env)

    transports.create_ssl_context = create_ssl_context


_share_httpx_default_ssl_context()


@pytest.fixture(autouse=True)
def _no_live_scopes_after_test() -> Iterator[None]:
    yield
    # A server thread may still be finishing the last response's close.
    deadline = time.monotonic() + 5
    while live_scopes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_no_live_scopes()


@pytest.fixture(scope="session")
def _redis_session() -> Iterator[Any]:
    from redis_server import BINARY, MISSING, RedisServer

    if BINARY is None:
        pytest.skip(MISSING)
    server = RedisServer()
    try:  # closed (its directory removed) also when it failed to start
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def redis_server(_redis_session: Any) -> Any:
    """The session's redis-server, emptied for this test."""
    with _redis_session.client() as client:
        client.flushall()
    return _redis_session


@pytest.fixture
def own_redis() -> Iterator[Callable[..., Any]]:
    """Start redis-servers of this test's own (to stop, kill or fill): ``own_redis(*options)``."""
    from redis_server import BINARY, MISSING, RedisServer

    if BINARY is None:
        pytest.skip(MISSING)
    servers: list[Any] = []

    def start(*options: str) -> Any:
        server = RedisServer(*options)
        servers.append(server)  # closed (its directory removed) also when it fails to start
        return server.start()

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def reader() -> Iterator[Any]:
    """An OpenTelemetry SDK in-memory metric reader, perrequest.otel instrumented on it."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from perrequest import otel

    metric_reader = InMemoryMetricReader()
    otel.instrument(MeterProvider(metric_readers=[metric_reader]))
    yield metric_reader
    otel.uninstrument()


@pytest.fixture
def registry() -> Iterator[Any]:
    """A fresh prometheus-client registry, perrequest.prometheus instrumented on it."""
    from prometheus_client import CollectorRegistry

    from perrequest import prometheus

    collector_registry = CollectorRegistry()
    prometheus.instrument(collector_registry)
    yield collector_registry
    prometheus.uninstrument()
