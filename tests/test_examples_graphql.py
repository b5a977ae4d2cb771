"""The Strawberry GraphQL example under a real uvicorn: one SQL query per kind of object.

Each response reports, in its GraphQL ``extensions``, the SQL queries its request
ran and the keys every batch function call received, both kept in the request's
own store, so they are right per request however many requests run at once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest
from servers import ROOT, serve_uvicorn

from perrequest.testing import live_scopes

pytestmark = pytest.mark.timeout(120)

QUERY = """
query Posts($first: Int!, $offset: Int!) {
  posts(first: $first, offset: $offset) { id title author { id name permissions } }
}
"""


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_example_graphql", ROOT / "examples/graphql_app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Strawberry resolves the annotations through it
    spec.loader.exec_module(module)
    return module


class Overlap:
    """Counts the requests in progress at once: proof that they really ran together."""

    def __init__(self, app: Any) -> None:
        self.app, self.now, self.peak = app, 0, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await self.app(scope, receive, send)
        finally:
            self.now -= 1


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ModuleType, str, Overlap]]:
    example = _load()
    overlap = Overlap(example.app)
    with serve_uvicorn(overlap) as url:
        yield example, url, overlap


def expected(example: ModuleType, first: int, offset: int) -> list[dict[str, Any]]:
    """What the posts query must answer, straight from the example's database."""
    posts = []
    for post_id in range(offset, offset + first):
        author = (post_id // 2 * 7) % example.USERS
        permissions = ["posts:read", "posts:write"][: 1 + author % 2]
        posts.append(
            {
                "id": post_id,
                "title": f"Post {post_id}",
                "author": {"id": author, "name": f"user{author}", "permissions": permissions},
            }
        )
    return posts


def post(url: str, path: str, first: int = 100, offset: int = 0) -> dict[str, Any]:
    response = httpx.post(
        url + path, json={"query": QUERY, "variables": {"first": first, "offset": offset}}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert "errors" not in body, body["errors"]
    return body


def test_one_query_per_kind_of_object_where_the_n_plus_1_runs_201(
    served: tuple[ModuleType, str, Overlap],
) -> None:
    example, url, _ = served
    batched = post(url, "/graphql")
    one_by_one = post(url, "/graphql-n-plus-1")
    assert batched["data"]["posts"] == one_by_one["data"]["posts"] == expected(example, 100, 0)
    # posts, users, permissions: 3 queries. Without batching: 1 + 100 authors + 100 authors'
    # permissions (50 distinct authors, asked for once per post).
    assert batched["extensions"]["sql_queries"] == 3
    assert one_by_one["extensions"]["sql_queries"] == 1 + 100 + 100
    authors = sorted({p["author"]["id"] for p in batched["data"]["posts"]})
    assert len(authors) == 50
    assert batched["extensions"]["batches"] == [["users", authors], ["permissions", authors]]
    assert one_by_one["extensions"]["batches"] == []


def test_fifty_concurrent_clients_each_get_their_own_batches_and_count(
    served: tuple[ModuleType, str, Overlap],
) -> None:
    example, url, overlap = served
    overlap.peak = 0

    async def client(i: int, http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
        variables = {"first": 100, "offset": 40 * i}  # windows overlap: 60 posts in common
        response = await http.post(url + "/graphql", json={"query": QUERY, "variables": variables})
        return i, response.json()

    async def run() -> list[tuple[int, dict[str, Any]]]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            return await asyncio.gather(*(client(i, http) for i in range(50)))

    for i, body in asyncio.run(run()):
        assert "errors" not in body
        assert body["data"]["posts"] == expected(example, 100, 40 * i)
        assert body["extensions"]["sql_queries"] == 3, (i, body["extensions"])
        authors = sorted({p["author"]["id"] for p in body["data"]["posts"]})
        # Every batch holds this request's keys and no other request's.
        assert body["extensions"]["batches"] == [["users", authors], ["permissions", authors]]
    assert overlap.peak >= 5  # the requests did run concurrently
    # The server is still running: a request's scope closes as its app returns, after the
    # last byte is sent, so the client may be done a moment before the last scope closes.
    deadline = time.monotonic() + 10
    while live_scopes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live_scopes() == 0
