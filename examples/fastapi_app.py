"""FastAPI example: the current user's permissions are queried once per request.

The permission check runs in a dependency, again in the endpoint, and again in
a helper; ``@request_memo`` makes the three calls share one SQLite query, and
the next request starts from an empty store, so nothing grows with the process.

Run it (from the repository root):

    uvicorn examples.fastapi_app:app --reset-contextvars
    python examples/fastapi_app.py          # serves on 127.0.0.1:8000 (or $PORT)

Then:

    curl -H 'X-User: alice' http://127.0.0.1:8000/reports/7
    curl http://127.0.0.1:8000/stats
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException

import perrequest
from perrequest import ScopeStats, request_memo
from perrequest.asgi import RequestScopeMiddleware

_QUERIES = "example.sql_queries"  # this request's query count, kept in its store


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
_db_lock = threading.Lock()  # sync endpoints and dependencies run in a thread pool
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


def current_user(x_user: Annotated[str, Header()] = "carol") -> str:
    return x_user


def require_read(user: Annotated[str, Depends(current_user)]) -> str:
    """Dependency: refuse users who may not read reports (first permission lookup)."""
    if "reports:read" not in permissions_for(user):
        raise HTTPException(status_code=403, detail=f"{user} may not read reports")
    return user


def can_export(user: str) -> bool:
    """A helper deep in the code: asks again, costs nothing."""
    return "reports:export" in permissions_for(user)


def _record(stats: ScopeStats) -> None:
    """on_close: process-wide totals from each request's final stats."""
    totals["requests"] += 1
    totals["memo_hits"] += stats.hits


app = FastAPI(title="perrequest FastAPI example")
app.add_middleware(RequestScopeMiddleware, on_close=_record)


@app.get("/reports/{report_id}")
def read_report(report_id: int, user: Annotated[str, Depends(require_read)]) -> dict[str, object]:
    permissions = permissions_for(user)  # second lookup: a memo hit
    return {
        "report": report_id,
        "user": user,
        "can_edit": "reports:write" in permissions,
        "can_export": can_export(user),  # third lookup: a memo hit
        "queries_this_request": perrequest.get(_QUERIES, 0),
    }


@app.get("/me")
async def me(user: Annotated[str, Depends(current_user)]) -> dict[str, object]:
    return {
        "user": user,
        "permissions": sorted(permissions_for(user)),
        "can_export": can_export(user),
        "queries_this_request": perrequest.get(_QUERIES, 0),
    }


@app.get("/stats")
def stats() -> dict[str, int]:
    """How many requests completed and how many SQL queries they ran in total."""
    return dict(totals)


if __name__ == "__main__":
    import uvicorn

    # reset_contextvars: each request starts in an empty context (docs/security.md).
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(app, host="127.0.0.1", port=port, reset_contextvars=True)
