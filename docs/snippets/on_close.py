"""on_close: every scope's stats, for metrics, once per request.

Run it: `python on_close.py`
"""

from perrequest import ScopeStats, request_memo
from perrequest.asgi import RequestScopeMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

hits_per_request: list[int] = []  # a stand-in for your metrics client


def report(stats: ScopeStats) -> None:
    hits_per_request.append(stats.hits)  # metrics.histogram(...)


@request_memo
def greeting(name: str) -> str:
    return f"hello {name}"


async def hello(request: Request) -> PlainTextResponse:
    greeting("ada")
    return PlainTextResponse(greeting("ada"))  # a memo hit


app = Starlette(routes=[Route("/", hello)])
app.add_middleware(RequestScopeMiddleware, max_entries=2_000, on_close=report)

if __name__ == "__main__":
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/").text == "hello ada"
        assert client.get("/").text == "hello ada"
    assert hits_per_request == [1, 1]
