"""Starlette: the endpoint, the streamed body and the background task
share one permissions query.

Run it: `python starlette_app.py`
"""

from collections.abc import AsyncIterator

from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

# A stub database that counts its queries.
PERMISSIONS = {"alice": {"reports:read", "reports:export"}, "bob": set()}
queries: list[str] = []

ROWS = [("north", 120, "reports:read"), ("payroll", 9000, "reports:write")]
audit_log: list[str] = []


def fetch_permissions(user: str) -> set[str]:
    queries.append(user)
    return PERMISSIONS.get(user, set())


@request_memo
def permissions_for(user: str) -> frozenset[str]:
    return frozenset(fetch_permissions(user))


async def csv_rows(user: str) -> AsyncIterator[str]:
    yield "region,amount\n"
    for region, amount, needed in ROWS:
        if needed in permissions_for(user):  # memo hits while streaming
            yield f"{region},{amount}\n"


def audit(user: str) -> None:
    exported = "reports:export" in permissions_for(user)  # and here
    audit_log.append(f"{user} exported: {exported}")
    del audit_log[:-100]  # bounded too


async def export(request: Request) -> Response:
    user = request.headers["x-user"]
    if "reports:export" not in permissions_for(user):  # the query runs here
        return PlainTextResponse("forbidden", status_code=403)
    return StreamingResponse(
        csv_rows(user), background=BackgroundTask(audit, user)
    )


app = Starlette(routes=[Route("/export", export)])
# Add it last: it becomes the outermost middleware.
app.add_middleware(RequestScopeMiddleware)

if __name__ == "__main__":
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        response = client.get("/export", headers={"X-User": "alice"})
    assert response.text == "region,amount\nnorth,120\n"
    assert audit_log == ["alice exported: True"]
    assert queries == ["alice"]  # endpoint, body and background task
