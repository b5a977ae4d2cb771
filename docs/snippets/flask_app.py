"""Flask: the before_request guard and the view share one query.

Run it: `python flask_app.py` (it serves two requests through
Flask's test client), or serve it: `flask --app flask_app run`.
"""

from flask import Flask, abort, request
from perrequest import request_memo
from perrequest.flask import PerRequest
from perrequest.testing import live_scopes

# A stub database that counts its queries.
PERMISSIONS = {"alice": {"reports:read"}, "bob": set()}
queries: list[str] = []


def fetch_permissions(user: str) -> set[str]:
    queries.append(user)
    return PERMISSIONS.get(user, set())


@request_memo
def permissions_for(user: str) -> frozenset[str]:
    return frozenset(fetch_permissions(user))


def current_user() -> str:
    return request.headers.get("X-User", "anonymous")


app = Flask(__name__)
PerRequest(app)


@app.before_request
def require_read() -> None:
    if "reports:read" not in permissions_for(current_user()):
        abort(403)


@app.get("/reports/<int:report_id>")
def report(report_id: int) -> dict[str, object]:
    permissions = permissions_for(current_user())  # memo hit
    return {"report": report_id, "can_edit": "reports:write" in permissions}


if __name__ == "__main__":
    client = app.test_client()
    alice = {"X-User": "alice"}
    # Close the response, as a server does: the request's store closes then.
    with client.get("/reports/7", headers=alice) as response:
        assert response.json == {"report": 7, "can_edit": False}
    assert queries == ["alice"]  # two lookups, one query
    assert live_scopes() == 0
    with client.get("/reports/7", headers={"X-User": "bob"}) as response:
        assert response.status_code == 403
