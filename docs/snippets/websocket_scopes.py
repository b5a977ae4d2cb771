"""Websockets: a store for the whole connection, or one per message.

Run it: `python websocket_scopes.py`
"""

from perrequest import request_memo, request_scope
from perrequest.asgi import RequestScopeMiddleware
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

calls: list[str] = []


@request_memo
def lookup(text: str) -> str:
    calls.append(text)
    return text.upper()


async def per_connection(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(lookup(text))


# The store lives as long as the connection: bound it.
connection_app = Starlette(routes=[WebSocketRoute("/ws", per_connection)])
connection_app.add_middleware(
    RequestScopeMiddleware, scope_types=("http", "websocket"), max_entries=500
)


async def per_message(websocket: WebSocket) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        with request_scope():  # a fresh store for each message
            await websocket.send_text(lookup(text))


message_app = Starlette(routes=[WebSocketRoute("/ws", per_message)])
message_app.add_middleware(RequestScopeMiddleware)  # http only

if __name__ == "__main__":
    from starlette.testclient import TestClient

    for app, expected_calls in ((connection_app, 1), (message_app, 3)):
        calls.clear()
        with TestClient(app) as client, client.websocket_connect("/ws") as ws:
            for _ in range(3):
                ws.send_text("hi")
                assert ws.receive_text() == "HI"
        assert len(calls) == expected_calls
