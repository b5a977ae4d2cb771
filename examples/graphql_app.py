"""Strawberry GraphQL on FastAPI: posts, their authors and their permissions.

The N+1 problem: resolving ``author`` for each of 100 posts runs 100
queries, and ``permissions`` for each author 100 more. With
``@request_batch`` the resolvers stay as simple as
``await load_users.load(self.author_id)``, nothing is created per request
or passed through a context object, and the query runs three SQL queries:
posts, users, permissions. ``/graphql`` is the batched app;
``/graphql-n-plus-1`` is the same schema resolving each object on its own.

Each response says what it cost in its ``extensions``: the SQL queries run
and the keys each batch function received (kept in the request's store, so
concurrent requests never mix their counts).

It needs strawberry-graphql, FastAPI and uvicorn (``pip install strawberry-graphql
perrequest[fastapi] uvicorn``). Run it (from the repository root):

    uvicorn examples.graphql_app:app --reset-contextvars
    python examples/graphql_app.py     # serves on 127.0.0.1:8000 (or $PORT)

Then:

    curl -s http://127.0.0.1:8000/graphql -H 'Content-Type: application/json' \\
      -d '{"query": "{ posts { title author { name permissions } } }"}'
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from typing import Any

import strawberry
from fastapi import FastAPI
from strawberry.extensions import SchemaExtension
from strawberry.fastapi import GraphQLRouter

import perrequest
from perrequest import request_batch
from perrequest.asgi import RequestScopeMiddleware

USERS, POSTS = 500, 5_000
# Kept in the request's store: what this request cost.
_QUERIES, _BATCHES = "example.sql_queries", "example.batches"


def _create_database() -> sqlite3.Connection:
    """Users, their permissions, and posts, two in a row by the same author."""
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.executescript(
        """
        CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
        CREATE TABLE permissions (user_id INTEGER, permission TEXT);
        CREATE TABLE posts (id INTEGER PRIMARY KEY, title TEXT, author_id INT);
        """
    )
    users = [(i, f"user{i}") for i in range(USERS)]
    db.executemany("INSERT INTO users VALUES (?, ?)", users)
    grants = [
        (i, permission)
        for i in range(USERS)
        for permission in ("posts:read", "posts:write")[: 1 + i % 2]
    ]
    db.executemany("INSERT INTO permissions VALUES (?, ?)", grants)
    posts = [(i, f"Post {i}", (i // 2 * 7) % USERS) for i in range(POSTS)]
    db.executemany("INSERT INTO posts VALUES (?, ?, ?)", posts)
    return db


_db = _create_database()
_db_lock = threading.Lock()


async def query(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """Run one SQL query in a worker thread, as a driver would; count it."""

    def run() -> list[tuple[Any, ...]]:
        with _db_lock:
            return _db.execute(sql, params).fetchall()

    rows = await asyncio.to_thread(run)
    perrequest.set(_QUERIES, perrequest.get(_QUERIES, 0) + 1)
    return rows


def _in(keys: list[int]) -> str:
    return f"IN ({', '.join('?' * len(keys))})"


def _record(loader: str, keys: list[int]) -> None:
    """Note the keys a batch function received, for the response."""
    perrequest.get_or_set(_BATCHES, list).append([loader, sorted(keys)])


# -- the batch functions: one query for many keys ---------------------------


# --8<-- [start:loaders]
@request_batch
async def load_users(ids: list[int]) -> dict[int, User]:
    """Users by id: one query for the ids asked for in one tick."""
    _record("users", ids)
    sql = f"SELECT id, name FROM users WHERE id {_in(ids)}"
    return {id_: User(id=id_, name=name) for id_, name in await query(sql, ids)}


@request_batch
async def load_permissions(user_ids: list[int]) -> list[list[str]]:
    """Each user's permissions, in the order of ``user_ids``."""
    _record("permissions", user_ids)
    sql = (
        "SELECT user_id, permission FROM permissions "
        f"WHERE user_id {_in(user_ids)} ORDER BY permission"
    )
    found: dict[int, list[str]] = {user_id: [] for user_id in user_ids}
    for user_id, permission in await query(sql, user_ids):
        found[user_id].append(permission)
    return [found[user_id] for user_id in user_ids]


# --8<-- [end:loaders]


# -- the same lookups one object at a time: the N+1 -------------------------


async def fetch_user(user_id: int) -> User:
    sql = "SELECT id, name FROM users WHERE id = ?"
    ((id_, name),) = await query(sql, [user_id])
    return User(id=id_, name=name)


async def fetch_permissions(user_id: int) -> list[str]:
    sql = "SELECT permission FROM permissions WHERE user_id = ? ORDER BY 1"
    return [permission for (permission,) in await query(sql, [user_id])]


# -- the schema -------------------------------------------------------------


# --8<-- [start:types]
@strawberry.type
class User:
    id: int
    name: str

    @strawberry.field
    async def permissions(self, info: strawberry.Info) -> list[str]:
        if info.context["batched"]:
            return await load_permissions.load(self.id)
        return await fetch_permissions(self.id)  # one query per user


@strawberry.type
class Post:
    id: int
    title: str
    author_id: strawberry.Private[int]

    @strawberry.field
    async def author(self, info: strawberry.Info) -> User:
        if info.context["batched"]:
            return await load_users.load(self.author_id)
        return await fetch_user(self.author_id)  # one query per post


# --8<-- [end:types]


@strawberry.type
class Query:
    @strawberry.field
    async def posts(self, first: int = 100, offset: int = 0) -> list[Post]:
        sql = "SELECT id, title, author_id FROM posts ORDER BY id LIMIT ?, ?"
        return [
            Post(id=id_, title=title, author_id=author_id)
            for id_, title, author_id in await query(sql, [offset, first])
        ]


class QueryCount(SchemaExtension):
    """Adds what the request cost to the response's ``extensions``."""

    def get_results(self) -> dict[str, Any]:
        return {
            "sql_queries": perrequest.get(_QUERIES, 0),
            "batches": perrequest.get(_BATCHES, []),
        }


schema = strawberry.Schema(query=Query, extensions=[QueryCount])


async def batched() -> dict[str, Any]:
    return {"batched": True}


async def one_by_one() -> dict[str, Any]:
    return {"batched": False}


# --8<-- [start:app]
app = FastAPI(title="perrequest GraphQL example")
graphql = GraphQLRouter(schema, context_getter=batched)
n_plus_1 = GraphQLRouter(schema, context_getter=one_by_one)
app.include_router(graphql, prefix="/graphql")
app.include_router(n_plus_1, prefix="/graphql-n-plus-1")
# One store per request: the loaders' values live there, and go with it.
app.add_middleware(RequestScopeMiddleware)
# --8<-- [end:app]


if __name__ == "__main__":
    import uvicorn

    port = int(os.environ.get("PORT", "8000"))
    # reset_contextvars: each request starts in an empty context (docs/security.md).
    uvicorn.run(app, host="127.0.0.1", port=port, reset_contextvars=True)
