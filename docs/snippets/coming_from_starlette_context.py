"""Coming from starlette-context: per-request values, pure ASGI.

Run it: `python coming_from_starlette_context.py`
"""

import uuid

import perrequest
from perrequest.asgi import RequestScopeMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send


class RequestIdMiddleware:  # pure ASGI, inside RequestScopeMiddleware
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            given = headers.get(b"x-request-id", b"").decode()
            perrequest.set("request_id", given or uuid.uuid4().hex)
        await self.app(scope, receive, send)


def request_id() -> str:  # anywhere in the request, no request object
    return perrequest.get("request_id", "-")


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request_id())


app = Starlette(
    routes=[Route("/", home)],
    middleware=[  # the first is the outermost
        Middleware(RequestScopeMiddleware),
        Middleware(RequestIdMiddleware),
    ],
)

if __name__ == "__main__":
    from starlette.testclient import TestClient

    with TestClient(app) as client:
        response = client.get("/", headers={"X-Request-ID": "abc"})
        assert response.text == "abc"
        assert len(client.get("/").text) == 32  # a new one
