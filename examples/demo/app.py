"""One FastAPI app, two memo strategies, picked by ``PERREQUEST_DEMO_MODE``.

- ``naive``: the expensive lookup is memoized in a module-level dict keyed by
  the request id. Every request adds an entry and nothing ever removes one:
  the slow leak behind the sawtooth memory graph.
- ``perrequest``: the same lookup under ``@request_memo``, with
  ``RequestScopeMiddleware`` opening a store per request and clearing it when
  the response is complete.

Each request asks for the profile four times (a dependency, the endpoint, a
helper called twice), so in both modes the memo saves real work within the
request; only the naive one keeps the results forever. ``GET /stats`` reports
lookups computed, lookup calls and the process's resident memory.

Run it: ``PERREQUEST_DEMO_MODE=naive uvicorn examples.demo.app:app``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any

import psutil
from fastapi import Depends, FastAPI

from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware

MODES = ("naive", "perrequest")
MODE = os.environ.get("PERREQUEST_DEMO_MODE", "perrequest")
if MODE not in MODES:
    raise RuntimeError(f"PERREQUEST_DEMO_MODE must be one of {MODES}, not {MODE!r}")

Profile = dict[str, Any]

# Counters for /stats. Everything runs on the event loop thread, so plain ints do.
COUNTS = {"calls": 0, "computed": 0}

# The leak: things go in, nothing comes out.
_seen: dict[str, Profile] = {}

_PROCESS = psutil.Process()
_RESOURCES = ("projects", "invoices", "reports", "billing", "users", "audit", "api-keys", "teams")
_ACTIONS = ("read", "write", "delete", "share", "admin")


def build_profile(request_id: str) -> Profile:
    """A realistic user profile with permissions: about 2 KB as JSON, more as Python objects."""
    return {
        "id": request_id,
        "name": f"User {request_id[:8]}",
        "email": f"user-{request_id}@example.com",
        "address": {"street": f"{len(request_id)} Main Street", "city": "Springfield"},
        "roles": [f"role-{request_id[:6]}-{n}" for n in range(4)],
        "permissions": [f"{res}:{request_id[:12]}:{act}" for res in _RESOURCES for act in _ACTIONS],
        "flags": {f"feature-{n}": (n % 3 == 0) for n in range(12)},
        "recent": [{"at": 1_700_000_000 + n, "event": f"login:{request_id[:8]}"} for n in range(8)],
    }


async def fetch_profile(request_id: str) -> Profile:
    """The expensive lookup: stands in for a database or auth-service round trip."""
    COUNTS["computed"] += 1
    await asyncio.sleep(0.001)
    return build_profile(request_id)


async def _naive_lookup(request_id: str) -> Profile:
    if request_id not in _seen:
        _seen[request_id] = await fetch_profile(request_id)
    return _seen[request_id]


@request_memo
async def _scoped_lookup(request_id: str) -> Profile:
    return await fetch_profile(request_id)


async def lookup_profile(request_id: str) -> Profile:
    """What the app calls, several times per request; the memo makes repeats free."""
    COUNTS["calls"] += 1
    if MODE == "naive":
        return await _naive_lookup(request_id)
    return await _scoped_lookup(request_id)


async def current_user(request_id: str) -> Profile:
    """A FastAPI dependency: the first lookup of each request."""
    return await lookup_profile(request_id)


async def can(request_id: str, permission: str) -> bool:
    """A helper deeper in the call stack that needs the profile too."""
    profile = await lookup_profile(request_id)
    return any(p.endswith(permission) for p in profile["permissions"])


app = FastAPI(title=f"perrequest demo ({MODE})")
if MODE == "perrequest":
    app.add_middleware(RequestScopeMiddleware)


@app.get("/profile")
async def profile(request_id: str, user: Annotated[Profile, Depends(current_user)]) -> Profile:
    """One request: the dependency, the endpoint and the helper (twice) all need the profile."""
    again = await lookup_profile(request_id)
    return {
        "name": user["name"],
        "same": again is user,
        "can_write": await can(request_id, ":write"),
        "is_admin": await can(request_id, ":admin"),
    }


@app.get("/stats")
async def stats() -> dict[str, Any]:
    """Lookups computed against calls, and what the process holds in memory."""
    return {
        "mode": MODE,
        "pid": os.getpid(),
        "calls": COUNTS["calls"],
        "computed": COUNTS["computed"],
        "avoided": COUNTS["calls"] - COUNTS["computed"],
        "memo_entries": len(_seen),
        "rss_bytes": _PROCESS.memory_info().rss,
    }
