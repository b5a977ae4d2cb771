"""Tests of the FastAPI app above.

Run it: `pytest test_fastapi_app.py`
"""

from fastapi.testclient import TestClient
from perrequest.testing import live_scopes

from fastapi_app import app, queries


def test_permissions_are_queried_once() -> None:
    queries.clear()
    with TestClient(app) as client:
        response = client.get("/reports/7", headers={"X-User": "alice"})
    assert response.status_code == 200
    assert queries == ["alice"]
    assert live_scopes() == 0  # the request's store is closed
