"""Coming from FastAPI's Depends(use_cache=True).

Run it: `python coming_from_fastapi_depends.py`
"""

from typing import Annotated

from fastapi import Depends, FastAPI, Header
from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware

queries: list[str] = []  # a stub database: it counts its queries


def fetch_permissions(user: str) -> set[str]:
    queries.append(user)
    return {"reports:read", "reports:export"}


def current_user(x_user: Annotated[str, Header()]) -> str:
    return x_user


@request_memo
def permissions_for(user: str) -> frozenset[str]:
    return frozenset(fetch_permissions(user))


def permissions(
    user: Annotated[str, Depends(current_user)],
) -> frozenset[str]:
    return permissions_for(user)  # the dependency can stay


def can_export(user: str) -> bool:  # not a dependency: a plain call
    return "reports:export" in permissions_for(user)  # a memo hit


app = FastAPI()
app.add_middleware(RequestScopeMiddleware)


@app.get("/reports/{report_id}")
def read_report(
    report_id: int,
    user: Annotated[str, Depends(current_user)],
    granted: Annotated[frozenset[str], Depends(permissions)],
) -> dict[str, object]:
    return {"read": "reports:read" in granted, "export": can_export(user)}


if __name__ == "__main__":
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        response = client.get("/reports/7", headers={"X-User": "alice"})
    assert response.json() == {"read": True, "export": True}
    assert queries == ["alice"]  # the dependency and the helper: one query
