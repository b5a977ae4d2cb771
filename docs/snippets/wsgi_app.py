"""Any WSGI app: wrap it; a lazy body still sees the request's store.

Run it: `python wsgi_app.py` (it calls the app as a server would),
or serve it: `gunicorn wsgi_app:app`.
"""

from collections.abc import Iterator
from wsgiref.util import setup_testing_defaults

from perrequest import request_memo
from perrequest.wsgi import RequestScopeMiddleware

# A stub database that counts its queries.
PERMISSIONS = {"alice": {"reports:read"}, "bob": set()}
queries: list[str] = []

ROWS = [("north", 120, "reports:read"), ("payroll", 9000, "reports:write")]


def fetch_permissions(user: str) -> set[str]:
    queries.append(user)
    return PERMISSIONS.get(user, set())


@request_memo
def permissions_for(user: str) -> frozenset[str]:
    return frozenset(fetch_permissions(user))


def csv_rows(user: str) -> Iterator[bytes]:  # runs after app() returned
    yield b"region,amount\n"
    for region, amount, needed in ROWS:
        if needed in permissions_for(user):  # one query for every row
            yield f"{region},{amount}\n".encode()


def app(environ, start_response):  # any WSGI application
    start_response("200 OK", [("Content-Type", "text/csv")])
    return csv_rows(environ.get("HTTP_X_USER", "bob"))


app = RequestScopeMiddleware(app)

if __name__ == "__main__":
    environ = {"HTTP_X_USER": "alice"}
    setup_testing_defaults(environ)
    # --8<-- [start:drive]
    body = app(environ, lambda status, headers: None)
    try:
        chunks = list(body)
    finally:
        if hasattr(body, "close"):  # PEP 3333: a list body has none
            body.close()  # the store closes here
    # --8<-- [end:drive]
    assert b"".join(chunks) == b"region,amount\nnorth,120\n"
    assert queries == ["alice"]
