"""Flask example: one permissions query per request, however many places ask.

The current user's permissions (a three-table SQLite join) are needed by a
``before_request`` guard, the view, a template helper, an audit helper and,
for ``/reports/<id>/export``, every row of a streamed CSV body. ``@request_memo``
makes all of that one query per request, and the memo is dropped when the
response is closed: nothing is kept between requests, so nothing grows.

Run it (from the repository root):

    flask --app examples/flask_app run      # serves on 127.0.0.1:5000
    python examples/flask_app.py            # serves on 127.0.0.1:5000 (or $PORT)
    gunicorn --bind 127.0.0.1:8000 examples.flask_app:app
    gunicorn --bind 127.0.0.1:8000 --worker-class gthread --threads 4 examples.flask_app:app

Then:

    curl -H 'X-User: alice' http://127.0.0.1:5000/reports/7
    curl -H 'X-User: bob' http://127.0.0.1:5000/reports/7/export
    curl http://127.0.0.1:5000/stats

``/stats`` counts per process: under gunicorn with several workers, each has its own.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, abort, render_template_string, request, stream_with_context

import perrequest
from perrequest import ScopeStats, request_memo
from perrequest.flask import PerRequest

_QUERIES = "example.sql_queries"  # this request's query count, kept in its store

ROWS = [  # (region, amount, the permission needed to see the row)
    ("north", 120, "reports:read"),
    ("south", 80, "reports:read"),
    ("payroll", 9000, "reports:write"),
]

PAGE = """\
<h1>Report {{ report_id }} for {{ user }}</h1>
{% if can("reports:write") %}<a href="/reports/{{ report_id }}/edit">Edit</a>{% endif %}
{% if can("reports:export") %}<a href="/reports/{{ report_id }}/export">Export</a>{% endif %}
<p>SQL queries this request: {{ queries() }}</p>
"""


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
_db_lock = threading.Lock()  # gunicorn gthread (or flask run) serves requests from threads
totals = {"requests": 0, "queries": 0, "memo_hits": 0}
audit_log: list[str] = []  # kept short below: even an example must say what removes from it


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


def current_user() -> str:
    return request.headers.get("X-User", "carol")


def can(permission: str) -> bool:
    """A helper far from the view: no request or user argument is passed down to it."""
    return permission in permissions_for(current_user())


def _audit(action: str) -> None:
    audit_log.append(f"{current_user()} {action}: export={can('reports:export')}")
    del audit_log[:-100]


def _record(stats: ScopeStats) -> None:
    """on_close: process-wide totals from each request's final stats."""
    with _db_lock:
        totals["requests"] += 1
        totals["memo_hits"] += stats.hits


app = Flask(__name__)
PerRequest(app, on_close=_record)
app.jinja_env.globals.update(can=can, queries=lambda: perrequest.get(_QUERIES, 0))


@app.before_request
def require_read() -> None:
    """Every report route needs reports:read: the first call runs the query."""
    if request.endpoint != "stats" and not can("reports:read"):
        abort(403, f"{current_user()} may not read reports")


@app.get("/reports/<int:report_id>")
def report(report_id: int) -> str:
    _audit(f"viewed report {report_id}")
    return render_template_string(PAGE, report_id=report_id, user=current_user())


@app.get("/reports/<int:report_id>/export")
def export(report_id: int) -> Response:
    if not can("reports:export"):
        abort(403, f"{current_user()} may not export reports")

    def csv() -> Iterator[str]:
        # Runs while the server sends the body, after the view returned: same store.
        yield "region,amount\n"
        for region, amount, needed in ROWS:
            if can(needed):
                yield f"{region},{amount}\n"
        yield f"# queries this request: {perrequest.get(_QUERIES, 0)}\n"

    return Response(stream_with_context(csv()), mimetype="text/csv")


@app.get("/me")
def me() -> dict[str, Any]:
    user = current_user()
    return {
        "user": user,
        "permissions": sorted(permissions_for(user)),
        "can_export": can("reports:export"),
        "queries_this_request": perrequest.get(_QUERIES, 0),
    }


@app.get("/stats")
def stats() -> dict[str, Any]:
    """How many requests completed and how many SQL queries they ran in total."""
    with _db_lock:
        return {**totals, "audit_log": audit_log[-10:]}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
