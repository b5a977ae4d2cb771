"""Starlette's exception handlers: a handler for a specific exception class
runs inside the request's scope, the 500 handler outside it.

Run it: `python starlette_errors.py`
"""

from perrequest import in_request_scope, request_memo
from perrequest.asgi import RequestScopeMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

queries: list[str] = []  # a stub database: it counts its queries


@request_memo(outside_scope="call")  # the 500 handler calls it uncached
def permissions_for(user: str) -> frozenset[str]:
    queries.append(user)
    return frozenset({"reports:read"})


class ReportNotFound(Exception):
    pass


async def report(request: Request) -> Response:
    permissions_for(request.headers["x-user"])  # the query runs here
    report_id = request.path_params["report_id"]
    if report_id == 0:
        raise ReportNotFound(report_id)
    raise RuntimeError("a bug")


async def not_found(request: Request, exc: Exception) -> Response:
    permissions_for(request.headers["x-user"])  # memo hit: same store
    assert in_request_scope()
    return PlainTextResponse("no such report", status_code=404)


async def server_error(request: Request, exc: Exception) -> Response:
    permissions_for(request.headers["x-user"])  # no store: queries again
    assert not in_request_scope()
    return PlainTextResponse("sorry", status_code=500)


app = Starlette(
    routes=[Route("/reports/{report_id:int}", report)],
    exception_handlers={ReportNotFound: not_found, Exception: server_error},
)
app.add_middleware(RequestScopeMiddleware)

if __name__ == "__main__":
    from starlette.testclient import TestClient

    alice = {"X-User": "alice"}
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/reports/0", headers=alice).status_code == 404
        assert queries == ["alice"]  # the 404 handler hit the memo
        assert client.get("/reports/1", headers=alice).status_code == 500
        assert queries == ["alice"] * 3  # the 500 handler queried again
