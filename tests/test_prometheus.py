"""perrequest.prometheus: a FastAPI app under uvicorn, its /metrics scraped and parsed."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, make_asgi_app
from prometheus_client.parser import text_string_to_metric_families
from servers import serve_uvicorn

from perrequest import prometheus, request_memo, request_scope
from perrequest.asgi import RequestScopeMiddleware

NAME = f"{__name__}.user"


@request_memo
def user(uid: int) -> dict[str, int]:
    time.sleep(0.001)
    return {"id": uid}


@request_memo(max_entries=1)
def page(n: int) -> int:
    return n


def scrape(url: str) -> dict[str, list[Any]]:
    """Sample name -> samples, parsed by prometheus-client's own parser."""
    response = httpx.get(url + "/metrics/")
    assert response.status_code == 200
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def by_function(samples: list[Any]) -> dict[str, float]:
    return {s.labels["function"]: s.value for s in samples}


def test_a_real_metrics_endpoint_under_uvicorn(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/users/{uid}")
    def show(uid: int) -> dict[str, Any]:
        first = user(uid)
        assert user(uid) is first and user(uid) is first  # two hits
        return {"user": first, "pages": [page(n) for n in (1, 2, 3)]}

    app.add_middleware(RequestScopeMiddleware)
    app.mount("/metrics", make_asgi_app(registry))
    with serve_uvicorn(app) as url:
        for uid in (1, 2, 3):
            assert httpx.get(f"{url}/users/{uid}").json()["user"] == {"id": uid}
        # A scope closes just after its response is sent: wait for the third.
        deadline = time.monotonic() + 5
        samples = scrape(url)
        while by_function(samples.get("perrequest_memo_hits_total", [])).get(NAME) != 6:
            assert time.monotonic() < deadline, samples.get("perrequest_memo_hits_total")
            time.sleep(0.02)
            samples = scrape(url)
    # A function's three series start together, at zero (as Prometheus advises).
    bounded = f"{__name__}.page"
    assert by_function(samples["perrequest_memo_hits_total"]) == {NAME: 6, bounded: 0}
    assert by_function(samples["perrequest_memo_misses_total"]) == {NAME: 3, bounded: 9}
    assert by_function(samples["perrequest_memo_evictions_total"]) == {NAME: 0, bounded: 6}
    entries = {s.labels.get("le"): s.value for s in samples["perrequest_scope_entries_bucket"]}
    # Three user requests held at most 2 entries (a user, a page). The scrapes used no
    # memo: the histograms leave them out (test_guards_obs.py checks it).
    assert entries["2.0"] - entries["1.0"] == 3
    assert entries["+Inf"] == samples["perrequest_scope_entries_count"][0].value
    saved = {s.labels.get("le"): s.value for s in samples["perrequest_scope_saved_seconds_bucket"]}
    assert saved["0.0"] < saved["+Inf"]  # the user requests saved two ~1 ms calls each
    assert samples["perrequest_scope_saved_seconds_sum"][0].value >= 3 * 2 * 0.001


def test_instrument_is_idempotent_and_uninstrument_unregisters() -> None:
    registry = CollectorRegistry()
    prometheus.instrument(registry)
    prometheus.instrument(registry)  # the same registry: nothing new, no duplicate error
    other = CollectorRegistry()
    prometheus.instrument(other)  # another: moves there
    try:
        with request_scope():
            user(1)
        assert registry.get_sample_value("perrequest_memo_misses_total", {"function": NAME}) is None
        assert other.get_sample_value("perrequest_memo_misses_total", {"function": NAME}) == 1
    finally:
        prometheus.uninstrument()
    assert not prometheus.is_instrumented()
    assert other.get_sample_value("perrequest_memo_misses_total", {"function": NAME}) is None
    prometheus.instrument(other)  # registered again after uninstrument: no duplicate error
    prometheus.uninstrument()


def test_a_registry_cleared_behind_its_back_is_fed_again_and_left_cleanly() -> None:
    """A test fixture that unregisters every collector between tests: instrumenting the
    same registry again registered nothing (idempotent), and moving to another one, or
    uninstrumenting, raised KeyError on the gone collectors ever after (a probe)."""
    registry = CollectorRegistry()
    prometheus.instrument(registry)
    for collector in list(registry._collector_to_names):  # what such fixtures do
        registry.unregister(collector)
    try:
        prometheus.instrument(registry)  # registered again
        with request_scope():
            user(1)
        assert registry.get_sample_value("perrequest_memo_misses_total", {"function": NAME}) == 1
        for collector in list(registry._collector_to_names):
            registry.unregister(collector)
        other = CollectorRegistry()
        prometheus.instrument(other)  # moves there, whatever is left in the first
        with request_scope():
            user(1)
        assert other.get_sample_value("perrequest_memo_misses_total", {"function": NAME}) == 1
    finally:
        prometheus.uninstrument()
    assert not prometheus.is_instrumented()


def test_a_bad_registry_is_refused() -> None:
    with pytest.raises(TypeError, match="CollectorRegistry"):
        prometheus.instrument({})  # type: ignore[arg-type]


def test_a_misspelt_option_names_the_right_one() -> None:
    with pytest.raises(TypeError, match=r"registy=\. Did you mean registry="):
        prometheus.instrument(registy=None)  # type: ignore[call-arg]
    assert not prometheus.is_instrumented()


@pytest.mark.parametrize("taken", ["perrequest_memo_hits", "perrequest_scope_saved_seconds"])
def test_a_failed_instrument_changes_nothing(taken: str) -> None:
    """A name clash in the new registry used to tear down the working instrumentation
    first, and to leave the collectors registered before the clash behind, so that
    every retry failed on a different name."""
    working = CollectorRegistry()
    prometheus.instrument(working)
    clashing = CollectorRegistry()
    (Counter if taken.endswith("hits") else Histogram)(taken, "someone else's", registry=clashing)
    try:
        for _ in range(2):  # the retry fails on the same name: nothing was left behind
            with pytest.raises(ValueError, match=f"clashes with perrequest's .*{taken}"):
                prometheus.instrument(clashing)
        exposition = generate_latest(clashing).decode()
        assert "perrequest_scope_entries" not in exposition
        assert "perrequest_memo_misses" not in exposition
        assert prometheus.is_instrumented()
        with request_scope():
            user(1)
        assert working.get_sample_value("perrequest_memo_misses_total", {"function": NAME}) == 1
    finally:
        prometheus.uninstrument()


def test_a_registry_failing_otherwise_than_by_a_clash_keeps_none_of_perrequests() -> None:
    """Only a clash (ValueError) unregistered the collectors done: a registry of its own
    that failed otherwise kept them, and every later instrument() blamed a clash with
    perrequest's own metrics (a probe, 7 December 2026). All or nothing, as documented."""

    class Flaky(CollectorRegistry):
        fail = True

        def register(self, collector: Any) -> None:
            if self.fail and "perrequest_scope_entries" in str(collector.describe()):
                raise RuntimeError("registry backend unavailable")
            super().register(collector)

    registry = Flaky()
    with pytest.raises(RuntimeError, match="unavailable"):
        prometheus.instrument(registry)
    assert not prometheus.is_instrumented()
    assert list(registry.collect()) == []  # nothing of perrequest's left
    registry.fail = False
    prometheus.instrument(registry)  # no clash with leftovers
    try:
        with request_scope():
            user(1)
        assert registry.get_sample_value("perrequest_memo_misses_total", {"function": NAME}) == 1
    finally:
        prometheus.uninstrument()
