"""Coming from flask.g: memoized by argument, and alive while streaming.

Run it: `python coming_from_flask_g.py`
"""

from collections.abc import Iterator

from flask import Flask, Response, request
from perrequest import request_memo
from perrequest.flask import PerRequest

queries: list[str] = []  # a stub database: it counts its queries
ROWS = [("north", "reports:read"), ("payroll", "reports:write")]


def fetch_permissions(user: str) -> set[str]:
    queries.append(user)
    return {"reports:read"}


@request_memo  # one entry per user: permissions_for("alice"), ("bob")
def permissions_for(user: str) -> frozenset[str]:
    return frozenset(fetch_permissions(user))


app = Flask(__name__)
PerRequest(app)


@app.get("/export")
def export() -> Response:
    user = request.headers["X-User"]

    def rows() -> Iterator[str]:  # runs after the view: g is gone by then
        for region, needed in ROWS:
            if needed in permissions_for(user):  # the store is not
                yield f"{region}\n"

    return Response(rows())


if __name__ == "__main__":
    client = app.test_client()
    with client.get("/export", headers={"X-User": "alice"}) as response:
        assert response.text == "north\n"
    assert queries == ["alice"]
