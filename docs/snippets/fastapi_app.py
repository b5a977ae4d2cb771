"""FastAPI: one permissions query per request, however many places ask.

Run it: `python fastapi_app.py` (it serves three requests through
FastAPI's test client), or serve it:
`uvicorn fastapi_app:app --reset-contextvars`.
"""

from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException
from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware

# A stub database that counts its queries.
PERMISSIONS = {"alice": {"reports:read", "reports:export"}, "bob": set()}
queries: list[str] = []


def fetch_permissions(user: str) -> set[str]:
    queries.append(user)
    return PERMISSIONS.get(user, set())


@request_memo
def permissions_for(user: str) -> frozenset[str]:
    return frozenset(fetch_permissions(user))  # runs once per request


def current_user(x_user: Annotated[str, Header()]) -> str:
    return x_user


def require_read(user: Annotated[str, Depends(current_user)]) -> str:
    if "reports:read" not in permissions_for(user):  # the query runs here
        raise HTTPException(403)
    return user


def can_export(user: str) -> bool:  # a helper deep in the code
    return "reports:export" in permissions_for(user)  # memo hit


app = FastAPI()
# Add it last: it becomes the outermost middleware.
app.add_middleware(RequestScopeMiddleware)


@app.get("/reports/{report_id}")
def read_report(
    report_id: int, user: Annotated[str, Depends(require_read)]
) -> dict[str, object]:
    permissions = permissions_for(user)  # memo hit
    return {
        "report": report_id,
        "can_edit": "reports:write" in permissions,
        "can_export": can_export(user),
    }


if __name__ == "__main__":
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        alice = {"X-User": "alice"}
        response = client.get("/reports/7", headers=alice)
        assert response.json() == {
            "report": 7,
            "can_edit": False,
            "can_export": True,
        }
        assert queries == ["alice"]  # three lookups, one query
        client.get("/reports/8", headers=alice)
        assert queries == ["alice", "alice"]  # one more request, one more
        bob = {"X-User": "bob"}
        assert client.get("/reports/7", headers=bob).status_code == 403
