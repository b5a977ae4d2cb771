"""Prometheus metrics from a FastAPI app, at /metrics/ (/metrics redirects).

Run it: `python prometheus_fastapi.py` (it serves two requests through
FastAPI's test client, then scrapes /metrics).
"""

import perrequest.prometheus
from fastapi import FastAPI
from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware
from prometheus_client import make_asgi_app

perrequest.prometheus.instrument()

app = FastAPI()
app.add_middleware(RequestScopeMiddleware)
app.mount("/metrics", make_asgi_app())


@request_memo
def load_user(user_id: int) -> str:
    return f"user {user_id}"  # a stub database query


@app.get("/users/{user_id}")
def show_user(user_id: int) -> dict[str, str]:
    load_user(user_id)
    return {"name": load_user(user_id)}  # a memo hit


if __name__ == "__main__":
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        client.get("/users/7")
        client.get("/users/8")
        scraped = client.get("/metrics/").text
    function = 'function="__main__.load_user"'
    assert f"perrequest_memo_hits_total{{{function}}} 2.0" in scraped
    assert f"perrequest_memo_misses_total{{{function}}} 2.0" in scraped
    assert "perrequest_scope_entries_count 2.0" in scraped  # per request
