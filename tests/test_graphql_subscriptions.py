"""batching.md, "Subscriptions": a Strawberry subscription gives each event a scope of its
own, held across its ``yield`` while the event's fields resolve: each event's loads batch
(2 calls an event here) and read fresh values. Without it (the HTTP middleware's recipe) the
loads ran outside any scope, one call each; with a websocket scope, the connection's one
store served the first event's values to every later event (a GraphQL probe, 7 December)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

import pytest
import strawberry
from fastapi import FastAPI
from fastapi.testclient import TestClient
from strawberry.fastapi import GraphQLRouter

from perrequest import memo, request_batch, request_scope
from perrequest.asgi import RequestScopeMiddleware
from perrequest.testing import live_scopes

NAMES = {i: f"user{i}" for i in range(1, 9)}
FOLLOWS = {i: [i % 8 + 1, (i + 3) % 8 + 1] for i in range(1, 9)}
CALLS: list[list[int]] = []


@request_batch
async def users(ids: list[int]) -> list[User]:
    CALLS.append(list(ids))
    return [User(id=i, name=NAMES[i]) for i in ids]


@strawberry.type
class User:
    id: int
    name: str

    @strawberry.field
    async def follows(self) -> list[User]:
        return list(await asyncio.gather(*[users.load(i) for i in FOLLOWS[self.id]]))


def _tick(k: int) -> None:
    for i in NAMES:
        NAMES[i] = f"tick{k}-user{i}"


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def plain(self) -> AsyncGenerator[list[User], None]:
        for k in range(3):
            _tick(k)
            yield list(await asyncio.gather(*[users.load(i) for i in (1, 2, 3, 4)]))

    @strawberry.subscription
    async def scoped(self) -> AsyncGenerator[list[User], None]:
        for k in range(3):
            _tick(k)
            with request_scope():  # held while the event's fields resolve
                yield list(await asyncio.gather(*[users.load(i) for i in (1, 2, 3, 4)]))


@strawberry.type
class Query:
    hello: str = "hi"


def _events(field: str, scope_types: tuple[str, ...]) -> list[list[str]]:
    app = FastAPI()
    app.include_router(
        GraphQLRouter(strawberry.Schema(Query, subscription=Subscription)), prefix="/graphql"
    )
    app.add_middleware(RequestScopeMiddleware, scope_types=scope_types)
    CALLS.clear()
    events: list[list[str]] = []
    query = "subscription { FIELD { name follows { name } } }".replace("FIELD", field)
    with (
        TestClient(app) as client,
        client.websocket_connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws,
    ):
        ws.send_json({"type": "connection_init"})
        ws.receive_json()
        ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": query}})
        while (message := ws.receive_json())["type"] == "next":
            data: Any = message["payload"]["data"][field]
            events.append([user["name"] for user in data])
    return events


def test_a_subscription_event_in_a_scope_of_its_own_batches_and_reads_fresh_values(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memo, "warned_outside", set())  # logged once a process: again here
    events = _events("scoped", ("http",))
    assert len(CALLS) == 6  # two batches an event: the users, then whom they follow
    assert [{name.split("-")[0] for name in event} for event in events] == [
        {"tick0"}, {"tick1"}, {"tick2"},
    ]  # fmt: skip
    assert live_scopes() == 0
    with caplog.at_level(logging.WARNING, logger="perrequest"):
        _events("plain", ("http",))  # the recipe's middleware alone: outside any scope
    assert len(CALLS) > 6 and "outside a request scope" in caplog.text
    stale = _events("plain", ("http", "websocket"))  # one store for the connection
    assert {name.split("-")[0] for event in stale for name in event} == {"tick0"}
