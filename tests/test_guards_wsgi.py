"""Guards of the WSGI middleware (wsgi) that no other test needed: each test here fails with
its guard deleted (a block-deletion mutation pass, 5 December 2026)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import perrequest
from perrequest.wsgi import RequestScopeMiddleware


def _environ() -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "wsgi.url_scheme": "http"}


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    pass


class Chunks:
    """A body of the app's own that can be iterated again after ``close()`` (a class
    with ``__iter__``, not a generator), counting how often app code ran in it."""

    def __init__(self) -> None:
        self.runs: list[bool] = []

    def __iter__(self) -> Iterator[bytes]:
        self.runs.append(perrequest.in_request_scope())
        yield b"chunk"


def test_a_body_iterated_again_after_close_runs_no_app_code() -> None:
    """wsgi.ScopedBody._start: once close() has ended the scope, the body is empty. A server
    (or code driving the app) that iterates it again, against PEP 3333, must not run the
    app's code outside its request's scope. Unguarded, the closed body's iterable runs
    again, with no scope, and its chunks are sent a second time."""
    chunks = Chunks()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Chunks:
        start_response("200 OK", [])
        return chunks

    body: Any = RequestScopeMiddleware(app)(_environ(), _start_response)
    assert b"".join(body) == b"chunk"
    body.close()
    assert list(body) == []
    assert list(iter(body)) == []
    assert chunks.runs == [True]
