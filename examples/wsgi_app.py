"""Plain WSGI example (no framework): one permissions query per request.

``GET /reports/<id>/export`` checks the user's permissions in the app, then
returns a lazy body (a generator) that checks them again for every CSV row
while the server sends it. ``RequestScopeMiddleware`` keeps the request's
store active around each chunk and closes it when the server calls
``close()`` on the response, so all of that is one SQLite query.

Run it (from the repository root):

    python examples/wsgi_app.py             # wsgiref, serves on 127.0.0.1:8000 (or $PORT)
    gunicorn --bind 127.0.0.1:8000 examples.wsgi_app:app

Then:

    curl -H 'X-User: bob' http://127.0.0.1:8000/reports/7/export
    curl http://127.0.0.1:8000/stats
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import perrequest
from perrequest import ScopeStats, request_memo
from perrequest.wsgi import RequestScopeMiddleware

StartResponse = Callable[..., Any]

_QUERIES = "example.sql_queries"  # this request's query count, kept in its store

ROWS = [  # (region, amount, the permission needed to see the row)
    ("north", 120, "reports:read"),
    ("south", 80, "reports:read"),
    ("payroll", 9000, "reports:write"),
]


def _create_database() -> sqlite3.Connection:
    """An in-memory database of users, roles and permissions, built at start-up."""
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.executescript(
        """
        CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT UNIQUE);
        CREATE TABLE user_roles (user_id INTEGER, role TEXT);
        CREATE TABLE role_permissions (role TEXT, permission TEXT);
        INSERT INTO users VALUES (1, 'alice'), (2, 'bob'), (3, 'carol');
        INSERT INTO user_roles VALUES (1, 'admin'), (2, 'analyst'), (3, 'guest');
        INSERT INTO role_permissions VALUES
            ('admin', 'reports:read'), ('admin', 'reports:write'), ('admin', 'reports:export'),
            ('analyst', 'reports:read'), ('analyst', 'reports:export'),
            ('guest', 'public:read');
        """
    )
    return db


_db = _create_database()
_db_lock = threading.Lock()  # threaded servers (gunicorn gthread) call the app from threads
totals = {"requests": 0, "queries": 0, "memo_hits": 0}


def run_query(sql: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
    """Run one SQL query and count it against the current request."""
    with _db_lock:
        rows = _db.execute(sql, params).fetchall()
        totals["queries"] += 1
    perrequest.set(_QUERIES, perrequest.get(_QUERIES, 0) + 1)
    return rows


@request_memo
def permissions_for(user: str) -> frozenset[str]:
    """The expensive lookup: a three-table join, memoized for the rest of the request."""
    rows = run_query(
        """
        SELECT rp.permission FROM users u
        JOIN user_roles ur ON ur.user_id = u.id
        JOIN role_permissions rp ON rp.role = ur.role
        WHERE u.name = ?
        """,
        (user,),
    )
    return frozenset(str(row[0]) for row in rows)


def _csv(user: str) -> Iterator[bytes]:
    """The lazy body: runs while the server sends it, after the app returned."""
    yield b"region,amount\n"
    for region, amount, needed in ROWS:
        if needed in permissions_for(user):
            yield f"{region},{amount}\n".encode()
    yield f"# queries this request: {perrequest.get(_QUERIES, 0)}\n".encode()


def _respond(start_response: StartResponse, status: str, body: bytes, kind: str) -> list[bytes]:
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]


def reports(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI app: ``/reports/<id>/export`` and ``/stats``."""
    path = environ.get("PATH_INFO", "")
    if path == "/stats":
        with _db_lock:
            body = json.dumps(totals).encode()
        return _respond(start_response, "200 OK", body, "application/json")
    parts = path.strip("/").split("/")
    if len(parts) != 3 or parts[0] != "reports" or not parts[1].isdigit() or parts[2] != "export":
        return _respond(start_response, "404 Not Found", b"not found\n", "text/plain")
    user = environ.get("HTTP_X_USER", "carol")
    if "reports:export" not in permissions_for(user):
        return _respond(start_response, "403 Forbidden", b"may not export\n", "text/plain")
    start_response("200 OK", [("Content-Type", "text/csv")])
    return _csv(user)


def _record(stats: ScopeStats) -> None:
    """on_close: process-wide totals from each request's final stats."""
    with _db_lock:
        totals["requests"] += 1
        totals["memo_hits"] += stats.hits


app = RequestScopeMiddleware(reports, on_close=_record)


if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    port = int(os.environ.get("PORT", "8000"))
    with make_server("127.0.0.1", port, app) as server:
        print(f"Serving on http://127.0.0.1:{port}")
        server.serve_forever()
