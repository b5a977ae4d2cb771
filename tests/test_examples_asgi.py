"""The FastAPI and Starlette examples: the permissions query runs once per request."""

from __future__ import annotations

import importlib.util
import sys
import time
from types import ModuleType
from typing import Any

import httpx
import pytest
from servers import ROOT, free_port, serve_subprocess
from starlette.testclient import TestClient

pytestmark = pytest.mark.timeout(90)


def _load(name: str) -> ModuleType:
    """Import an example afresh, so each test starts with zeroed totals."""
    spec = importlib.util.spec_from_file_location(
        f"_example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_for_requests(client: httpx.Client | TestClient, count: int) -> dict[str, Any]:
    """``/stats`` once ``count`` earlier requests (and earlier polls) have closed their scopes."""
    deadline = time.monotonic() + 5
    polls = 0
    while True:
        totals: dict[str, Any] = client.get("/stats").json()
        if totals["requests"] >= count + polls or time.monotonic() > deadline:
            return totals
        polls += 1
        time.sleep(0.02)


def test_fastapi_example_queries_once_per_request() -> None:
    example = _load("fastapi_app")
    with TestClient(example.app) as client:
        alice = client.get("/reports/7", headers={"X-User": "alice"}).json()
        bob = client.get("/reports/8", headers={"X-User": "bob"}).json()
        me = client.get("/me", headers={"X-User": "bob"}).json()
        denied = client.get("/reports/9", headers={"X-User": "carol"})
        totals = _wait_for_requests(client, 4)
    assert alice == {
        "report": 7,
        "user": "alice",
        "can_edit": True,
        "can_export": True,
        "queries_this_request": 1,
    }
    assert (bob["can_edit"], bob["can_export"], bob["queries_this_request"]) == (False, True, 1)
    assert me["permissions"] == ["reports:export", "reports:read"]
    assert me["queries_this_request"] == 1
    assert denied.status_code == 403
    # Four requests, one query each: the dependency, the endpoint and the helper shared it.
    assert totals["queries"] == 4
    assert totals["memo_hits"] == 2 + 2 + 1 + 0


def test_starlette_example_queries_once_per_request() -> None:
    example = _load("starlette_app")
    with TestClient(example.app) as client:
        alice = client.get("/reports/7/export", headers={"X-User": "alice"})
        bob = client.get("/reports/8/export", headers={"X-User": "bob"})
        denied = client.get("/reports/9/export", headers={"X-User": "carol"})
        totals = _wait_for_requests(client, 3)
    assert alice.text.splitlines() == [
        "region,amount",
        "north,120",
        "south,80",
        "payroll,9000",
        "# queries this request: 1",
    ]
    assert bob.text.splitlines()[1:] == ["north,120", "south,80", "# queries this request: 1"]
    assert denied.status_code == 403
    assert totals["queries"] == 3
    # Endpoint miss, then 3 row checks in the body and 1 in the background task: 4 hits each.
    assert totals["memo_hits"] == 4 + 4
    assert totals["audit_log"] == [
        "alice exported report 7: True",
        "bob exported report 8: True",
    ]


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("fastapi", [sys.executable, "examples/fastapi_app.py"]),
        (
            "starlette",
            [
                *(sys.executable, "-m", "uvicorn", "examples.starlette_app:app"),
                *("--host", "127.0.0.1", "--reset-contextvars"),
            ],
        ),
    ],
    ids=["python-fastapi_app", "uvicorn-starlette_app"],
)
def test_examples_under_a_real_uvicorn(name: str, argv: list[str]) -> None:
    """The two documented ways to run an example, as real processes."""
    port = free_port()
    if "uvicorn" in argv:
        argv = [*argv, "--port", str(port)]
    path = "/reports/1" if name == "fastapi" else "/reports/1/export"
    with (
        serve_subprocess(argv, port, env={"PORT": str(port)}) as base,
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        for user in ("alice", "bob", "alice"):
            response = client.get(path, headers={"X-User": user})
            assert response.status_code == 200
            if name == "fastapi":
                assert response.json()["queries_this_request"] == 1
            else:
                assert response.text.endswith("# queries this request: 1\n")
        totals = _wait_for_requests(client, 3)
    assert totals["queries"] == 3  # one per request, also for alice's second request
    assert totals["requests"] >= 3
