"""The Django example: one permission query per request, however many places ask."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import django_project
import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_project"
sys.path.insert(0, str(EXAMPLE))
django_project.setup()

from django.test import AsyncClient, Client  # noqa: E402
from django_example import permissions  # noqa: E402
from django_example import settings as example_settings  # noqa: E402

from perrequest.testing import live_scopes  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _example() -> Iterator[None]:
    with django_project.use_settings(example_settings):
        yield


def _queries() -> int:
    return permissions.TOTALS["permission_queries"]


@pytest.mark.parametrize(
    ("user", "perms", "edit_link"),
    [
        ("alice", "orders.view, shop.edit, shop.view", True),
        ("bob", "orders.view, shop.view", False),
    ],
)
def test_dashboard_runs_the_query_once_per_request(user: str, perms: str, edit_link: bool) -> None:
    client = Client(headers={"X-User": user})
    for _ in range(3):
        before = _queries()
        response = client.get("/")
        assert response.status_code == 200
        html = response.content.decode()
        assert f"Your permissions: {perms}" in html  # the template, via the context processor
        assert ("Edit the shop" in html) is edit_link  # the view's own check
        # Middleware, view and context processor asked; SQLite was queried once.
        assert response["X-Permission-Queries"] == "1"
        assert _queries() == before + 1  # ... and again on the next request: nothing kept
    assert permissions.LAST_REQUEST == {"hits": 2, "misses": 1, "entries": 1}
    assert live_scopes() == 0


async def test_async_view_shares_the_middlewares_lookup() -> None:
    before = _queries()
    # Per request: this Django's AsyncClient(headers=...) sends them as "Http-X-User".
    response = await AsyncClient().get("/api/orders/", headers={"X-User": "bob"})
    assert response.status_code == 200
    assert response.json() == {
        "user": "bob",
        "orders": [{"id": 2, "total": 7}, {"id": 3, "total": 19}],
    }
    assert response["X-Permission-Queries"] == "1"
    assert _queries() == before + 1
    assert permissions.LAST_REQUEST == {"hits": 1, "misses": 1, "entries": 1}


def test_guest_is_refused_after_one_query() -> None:
    before = _queries()
    response = Client().get("/")
    assert response.status_code == 403
    assert _queries() == before + 1


def test_stats_endpoint_counts_queries_and_requests() -> None:
    client = Client(headers={"X-User": "alice"})
    first = client.get("/stats/").json()
    client.get("/")
    client.get("/api/orders/")
    second = client.get("/stats/").json()
    assert second["permission_queries"] == first["permission_queries"] + 2
    # the first /stats/ request closed after it reported, so it counts here too
    assert second["requests"] == first["requests"] + 3


def test_example_project_passes_djangos_checks() -> None:
    # This checkout's src first: from another worktree, the editable install would
    # otherwise bring in another checkout's perrequest.
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parent.parent / "src")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "manage.py"), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "no issues" in done.stdout
