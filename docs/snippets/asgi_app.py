"""Any ASGI app: wrap it, and every HTTP request gets its own store.

Run it: `python asgi_app.py` (it calls the app twice, as a server
would), or serve it: `uvicorn asgi_app:app`.
"""

import asyncio

from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware

calls: list[str] = []


@request_memo
def expensive(path: str) -> bytes:
    calls.append(path)
    return path.upper().encode()


async def app(scope, receive, send):  # any ASGI 3 application
    if scope["type"] != "http":  # no lifespan events here
        return
    body = expensive(scope["path"]) + expensive(scope["path"])  # one call
    start = {"type": "http.response.start", "status": 200, "headers": []}
    await send(start)
    await send({"type": "http.response.body", "body": body})


app = RequestScopeMiddleware(app)


async def serve(path: str) -> bytes:
    """What a server does for one request."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path}, receive, send)
    return sent[-1]["body"]


if __name__ == "__main__":
    assert asyncio.run(serve("/a")) == b"/A/A"
    assert asyncio.run(serve("/a")) == b"/A/A"
    assert calls == ["/a", "/a"]  # once per request
