"""Prometheus metrics from a Flask app, served at /metrics.

Run it: `python prometheus_flask.py` (it serves two requests through
Flask's test client, then scrapes /metrics).
"""

import perrequest.prometheus
from flask import Flask
from perrequest import request_memo
from perrequest.flask import PerRequest
from prometheus_client import make_wsgi_app
from werkzeug.middleware.dispatcher import DispatcherMiddleware

perrequest.prometheus.instrument()

app = Flask(__name__)
PerRequest(app)
app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": make_wsgi_app()})


@request_memo
def load_user(user_id: int) -> str:
    return f"user {user_id}"  # a stub database query


@app.get("/users/<int:user_id>")
def show_user(user_id: int) -> dict[str, str]:
    load_user(user_id)
    return {"name": load_user(user_id)}  # a memo hit


if __name__ == "__main__":
    client = app.test_client()
    for user_id in (7, 8):
        # Close the response, as a server does: the request's scope closes.
        with client.get(f"/users/{user_id}") as response:
            assert response.json == {"name": f"user {user_id}"}
    scraped = client.get("/metrics").text
    function = 'function="__main__.load_user"'
    assert f"perrequest_memo_hits_total{{{function}}} 2.0" in scraped
    assert f"perrequest_memo_misses_total{{{function}}} 2.0" in scraped
    assert "perrequest_scope_entries_count 2.0" in scraped  # per request
