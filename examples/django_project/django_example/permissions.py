"""The expensive lookup: a user's permissions, from SQLite, memoized per request."""

from __future__ import annotations

import atexit
import sqlite3
import tempfile
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

from perrequest import ScopeStats, request_memo

_DIR = tempfile.TemporaryDirectory(prefix="perrequest-django-example-")
atexit.register(_DIR.cleanup)
DB = Path(_DIR.name) / "permissions.sqlite3"

_lock = threading.Lock()
TOTALS = {"permission_queries": 0, "requests": 0}
LAST_REQUEST: dict[str, Any] = {}

_SCHEMA = """
CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL);
CREATE TABLE user_roles (user_id INTEGER NOT NULL, role TEXT NOT NULL);
CREATE TABLE role_permissions (role TEXT NOT NULL, permission TEXT NOT NULL);
INSERT INTO users (id, name) VALUES (1, 'alice'), (2, 'bob'), (3, 'guest');
INSERT INTO user_roles VALUES (1, 'staff'), (1, 'customer'), (2, 'customer');
INSERT INTO role_permissions VALUES
    ('customer', 'shop.view'), ('customer', 'orders.view'),
    ('staff', 'shop.view'), ('staff', 'shop.edit'), ('staff', 'orders.view');
"""

_QUERY = """
SELECT DISTINCT rp.permission
FROM users u
JOIN user_roles ur ON ur.user_id = u.id
JOIN role_permissions rp ON rp.role = ur.role
WHERE u.name = ?
"""

with closing(sqlite3.connect(DB)) as _conn, _conn:
    _conn.executescript(_SCHEMA)


@request_memo
def user_permissions(username: str) -> frozenset[str]:
    """The user's permissions. Runs the query once per request and user.

    Returns a frozenset: every caller in the request gets the same object,
    so it must not be mutated.
    """
    with closing(sqlite3.connect(DB)) as conn:
        rows = conn.execute(_QUERY, (username,)).fetchall()
    with _lock:
        TOTALS["permission_queries"] += 1
    return frozenset(permission for (permission,) in rows)


def queries_this_request() -> int:
    """How many times the query ran in the current request (its memo misses)."""
    return user_permissions.cache_info().misses  # type: ignore[attr-defined, no-any-return]


def context_processor(request: Any) -> dict[str, Any]:
    """Templates get ``perms``: the same memoized frozenset, no extra query."""
    return {"perms": sorted(user_permissions(request.username))}


def record_stats(stats: ScopeStats) -> None:
    """settings.PERREQUEST["ON_CLOSE"]: called once per request when its store closes."""
    with _lock:
        TOTALS["requests"] += 1
        LAST_REQUEST.update(hits=stats.hits, misses=stats.misses, entries=stats.entries)
