"""The Flask and plain WSGI examples: the permissions query runs once per request."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import httpx
import pytest
from servers import ROOT, free_port, serve_gunicorn, serve_subprocess
from werkzeug.test import Client

pytestmark = pytest.mark.timeout(60)

ALICE_CSV = ["region,amount", "north,120", "south,80", "payroll,9000", "# queries this request: 1"]
BOB_CSV = ["region,amount", "north,120", "south,80", "# queries this request: 1"]


def _load(name: str) -> ModuleType:
    """Import an example afresh, so each test starts with zeroed totals."""
    spec = importlib.util.spec_from_file_location(
        f"_example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(client: Client, path: str, user: str | None = None) -> tuple[int, str]:
    """One request through the in-process client; the response is closed, as a server does."""
    headers = {"X-User": user} if user else {}
    with client.get(path, headers=headers) as response:
        return response.status_code, response.get_data(as_text=True)


def test_flask_example_queries_once_per_request() -> None:
    example = _load("flask_app")
    client = example.app.test_client()
    status, page = _get(client, "/reports/7", "alice")
    assert status == 200
    assert "Edit</a>" in page and "Export</a>" in page  # the template helper asked twice
    assert "SQL queries this request: 1" in page
    status, page = _get(client, "/reports/7", "bob")
    assert "Edit</a>" not in page and "Export</a>" in page
    assert "SQL queries this request: 1" in page
    assert _get(client, "/reports/7/export", "alice") == (200, "\n".join(ALICE_CSV) + "\n")
    assert _get(client, "/reports/7/export", "bob") == (200, "\n".join(BOB_CSV) + "\n")
    with client.get("/me", headers={"X-User": "bob"}) as response:
        assert response.get_json() == {
            "user": "bob",
            "permissions": ["reports:export", "reports:read"],
            "can_export": True,
            "queries_this_request": 1,
        }
    assert _get(client, "/reports/7", "carol")[0] == 403  # refused in before_request
    with client.get("/stats") as response:
        totals = response.get_json()
    # Six requests before /stats, one query each (carol's was refused after hers).
    assert totals["queries"] == 6 and totals["requests"] == 6
    # before_request missed, then hits: audit + 2 template calls (alice, bob), view + 3 rows
    # (each export), 2 (me), 0 (carol).
    assert totals["memo_hits"] == 3 + 3 + 4 + 4 + 2 + 0
    assert totals["audit_log"] == [
        "alice viewed report 7: export=True",
        "bob viewed report 7: export=True",
    ]


def test_wsgi_example_queries_once_per_request() -> None:
    example = _load("wsgi_app")
    client = Client(example.app)
    assert _get(client, "/reports/7/export", "alice") == (200, "\n".join(ALICE_CSV) + "\n")
    assert _get(client, "/reports/8/export", "bob") == (200, "\n".join(BOB_CSV) + "\n")
    assert _get(client, "/reports/9/export", "carol") == (403, "may not export\n")
    assert _get(client, "/nowhere")[0] == 404
    status, stats = _get(client, "/stats")
    # The 404 ran no query; the app's check missed, each of the 3 body rows hit.
    assert status == 200
    assert json.loads(stats) == {"requests": 4, "queries": 3, "memo_hits": 3 + 3 + 0 + 0}


def _wait_for_stats(get: Callable[[], dict[str, Any]], requests: int) -> dict[str, Any]:
    """``/stats`` once ``requests`` earlier requests (and earlier polls) closed their scopes."""
    deadline = time.monotonic() + 10
    polls = 0
    while True:
        totals = get()
        if totals["requests"] >= requests + polls or time.monotonic() > deadline:
            return totals
        polls += 1
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("example", "worker_class"),
    [("flask_app", "sync"), ("flask_app", "gthread"), ("wsgi_app", "gthread")],
)
def test_examples_under_gunicorn(example: str, worker_class: str) -> None:
    spec = f"examples.{example}:app"
    with (
        serve_gunicorn(spec, worker_class=worker_class, threads=4) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        for user, csv in (("alice", ALICE_CSV), ("bob", BOB_CSV), ("alice", ALICE_CSV)):
            response = client.get("/reports/3/export", headers={"X-User": user})
            assert response.status_code == 200
            assert response.text.splitlines() == csv
        totals = _wait_for_stats(lambda: client.get("/stats").json(), 3)
    assert totals["queries"] == 3  # one per request, also for alice's second request


def test_wsgi_example_run_as_a_script() -> None:
    """``python examples/wsgi_app.py``: wsgiref, a real PEP 3333 server that calls close()."""
    port = free_port()
    argv = [sys.executable, "examples/wsgi_app.py"]
    with (
        serve_subprocess(argv, port, env={"PORT": str(port)}) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        for user in ("alice", "bob"):
            response = client.get("/reports/1/export", headers={"X-User": user})
            assert response.text.endswith("# queries this request: 1\n")
        totals = _wait_for_stats(lambda: client.get("/stats").json(), 2)
    assert totals["queries"] == 2 and totals["memo_hits"] == 3 + 3
