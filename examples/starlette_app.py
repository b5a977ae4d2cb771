"""Starlette example: one permissions query per request, from the endpoint, the
streaming body and the background task alike.

``GET /reports/{id}/export`` checks the user's permissions in the endpoint,
filters every streamed CSV row by them, and writes an audit line in a
background task; ``@request_memo`` makes all of that one SQLite query, and the
store is dropped once the background task is done.

Run it (from the repository root):

    uvicorn examples.starlette_app:app --reset-contextvars
    python examples/starlette_app.py        # serves on 127.0.0.1:8000 (or $PORT)

Then:

    curl -H 'X-User: bob' http://127.0.0.1:8000/reports/7/export
    curl http://127.0.0.1:8000/stats
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import perrequest
from perrequest import ScopeStats, request_memo
from perrequest.asgi import RequestScopeMiddleware

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
_db_lock = threading.Lock()  # background tasks and sync code may run in a thread pool
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


def _user(request: Request) -> str:
    return request.headers.get("x-user", "carol")


async def _csv(user: str) -> AsyncIterator[str]:
    """The streaming body: runs after the endpoint returned, in the same request store."""
    yield "region,amount\n"
    for region, amount, needed in ROWS:
        if needed in permissions_for(user):
            yield f"{region},{amount}\n"
    yield f"# queries this request: {perrequest.get(_QUERIES, 0)}\n"


def _audit(user: str, report_id: int) -> None:
    """The background task: runs after the body was sent, still in the same store."""
    exported = "reports:export" in permissions_for(user)
    audit_log.append(f"{user} exported report {report_id}: {exported}")
    del audit_log[:-100]


async def export(request: Request) -> Response:
    user = _user(request)
    report_id = int(request.path_params["report_id"])
    if "reports:export" not in permissions_for(user):
        return PlainTextResponse(f"{user} may not export reports\n", status_code=403)
    return StreamingResponse(
        _csv(user), media_type="text/csv", background=BackgroundTask(_audit, user, report_id)
    )


async def me(request: Request) -> Response:
    user = _user(request)
    return JSONResponse(
        {
            "user": user,
            "permissions": sorted(permissions_for(user)),
            "can_export": "reports:export" in permissions_for(user),
            "queries_this_request": perrequest.get(_QUERIES, 0),
        }
    )


async def stats(request: Request) -> Response:
    """How many requests completed and how many SQL queries they ran in total."""
    return JSONResponse({**totals, "audit_log": audit_log[-10:]})


def _record(stats: ScopeStats) -> None:
    """on_close: process-wide totals from each request's final stats."""
    totals["requests"] += 1
    totals["memo_hits"] += stats.hits


app = Starlette(
    routes=[
        Route("/reports/{report_id:int}/export", export),
        Route("/me", me),
        Route("/stats", stats),
    ]
)
app.add_middleware(RequestScopeMiddleware, on_close=_record)


if __name__ == "__main__":
    import uvicorn

    # reset_contextvars: each request starts in an empty context (docs/security.md).
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(app, host="127.0.0.1", port=port, reset_contextvars=True)
