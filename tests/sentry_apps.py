"""One app per framework with Sentry on (tracing, Django's middleware spans), for
``test_sentry``. Sentry patches each framework for the whole process, so the app runs in
a server process of its own: ``SENTRY_APP`` (``fastapi``, ``flask``, ``django``) picks it.

Every app serves ``/sync`` and ``/async`` (a view that sets a value and calls a memo
twice, async where the framework allows), ``/boom`` (an error Sentry reports) and
``/_state`` (open scopes, and how many errors Sentry captured).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

import perrequest
from perrequest import request_memo
from perrequest.testing import live_scopes

CAPTURED: list[str] = []  # the types of the errors Sentry sent


class Captured(Transport):
    """Keeps what Sentry would send; sends nothing."""

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            event = item.get_event()
            if event and event.get("exception"):
                error = event["exception"]["values"][-1]
                frames = error.get("stacktrace", {}).get("frames", [])[-6:]
                where = [f"{f.get('module')}:{f.get('lineno')}" for f in frames]
                CAPTURED.append(f"{error['type']}: {error.get('value')} at {where}")


@request_memo
def who(rid: str) -> str:
    time.sleep(0.001)
    return f"{rid}:{uuid.uuid4().hex}"


@request_memo
async def awho(rid: str) -> str:
    await asyncio.sleep(0.001)
    return f"{rid}:{uuid.uuid4().hex}"


def seen(rid: str, first: str, second: str, before: Any) -> dict[str, Any]:
    return {"before": before, "first": first, "second": second, "seen": perrequest.get("rid")}


def state() -> dict[str, Any]:
    return {"live": live_scopes() - 1, "captured": CAPTURED}  # less this request's own


def _init(*integrations: Any) -> None:
    sentry_sdk.init(
        dsn="http://key@127.0.0.1:9/1",  # never reached: Captured sends nothing
        transport=Captured,
        traces_sample_rate=1.0,
        integrations=list(integrations),
    )


def fastapi_app() -> Any:
    _init()
    from fastapi import FastAPI

    from perrequest.asgi import RequestScopeMiddleware

    app = FastAPI()
    app.add_middleware(RequestScopeMiddleware)

    @app.get("/sync")
    def sync_view(rid: str) -> dict[str, Any]:  # in a thread of the pool
        before = perrequest.get("rid")
        perrequest.set("rid", rid)
        return seen(rid, who(rid), who(rid), before)

    @app.get("/async")
    async def async_view(rid: str) -> dict[str, Any]:
        before = perrequest.get("rid")
        perrequest.set("rid", rid)
        first, second = await asyncio.gather(awho(rid), awho(rid))
        return seen(rid, first, second, before)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.get("/_state")(state)
    return app


def flask_app() -> Any:
    _init()
    from flask import Flask, request

    from perrequest.flask import PerRequest

    app = Flask(__name__)
    PerRequest(app)

    @app.get("/sync")
    def sync_view() -> dict[str, Any]:
        rid = request.args["rid"]
        before = perrequest.get("rid")
        perrequest.set("rid", rid)
        return seen(rid, who(rid), who(rid), before)

    @app.get("/async")
    async def async_view() -> dict[str, Any]:  # in an event loop of its own
        rid = request.args["rid"]
        before = perrequest.get("rid")
        perrequest.set("rid", rid)
        first, second = await asyncio.gather(awho(rid), awho(rid))
        return seen(rid, first, second, before)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    app.get("/_state")(state)
    return app


def django_app() -> tuple[Any, Any]:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="sentry-test",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[
            "perrequest.django.RequestScopeMiddleware",
            "django.middleware.common.CommonMiddleware",
        ],
    )
    django.setup()
    from sentry_sdk.integrations.django import DjangoIntegration

    _init(DjangoIntegration(middleware_spans=True))  # each middleware wrapped in a span
    from django.core.asgi import get_asgi_application
    from django.core.wsgi import get_wsgi_application
    from django.http import HttpRequest, JsonResponse
    from django.urls import path

    def sync_view(request: HttpRequest) -> JsonResponse:
        rid = request.GET["rid"]
        before = perrequest.get("rid")
        perrequest.set("rid", rid)
        return JsonResponse(seen(rid, who(rid), who(rid), before))

    async def async_view(request: HttpRequest) -> JsonResponse:
        rid = request.GET["rid"]
        before = perrequest.get("rid")
        perrequest.set("rid", rid)
        first, second = await asyncio.gather(awho(rid), awho(rid))
        return JsonResponse(seen(rid, first, second, before))

    def boom(request: HttpRequest) -> JsonResponse:
        raise RuntimeError("boom")

    global urlpatterns
    urlpatterns = [
        path("sync", sync_view),
        path("async", async_view),
        path("boom", boom),
        path("_state", lambda request: JsonResponse(state())),
    ]
    return get_wsgi_application(), get_asgi_application()


urlpatterns: list[Any] = []
kind = os.environ.get("SENTRY_APP", "")
if kind == "django":
    wsgi, asgi = django_app()
elif kind:
    app = {"fastapi": fastapi_app, "flask": flask_app}[kind]()
