"""What the attack project observed, reported at ``/_live``; and its memoized functions."""

from __future__ import annotations

import threading
import time
from typing import Any

import perrequest
from perrequest import request_memo

EVENTS: dict[str, Any] = {
    "leaked": [],  # a store found where no scope was open (must stay empty)
    "cleanups": [],  # what each streaming body's ``finally`` saw
    "finished": [],  # what each ``request_finished`` receiver saw
    "errors": [],  # exceptions raised where nobody would see them (threads, cleanups)
    "calls": {},  # real calls of the memoized computations, by key
}
_lock = threading.Lock()


def count(key: str) -> None:
    with _lock:
        EVENTS["calls"][key] = EVENTS["calls"].get(key, 0) + 1


@request_memo(outside_scope="call")
def who() -> Any:
    """This request's marker, memoized: a store shared across requests hands out another's."""
    return perrequest.get("marker")


@request_memo
def slow(key: str, delay: float = 0.3) -> str:
    """A sync computation that threads and tasks of one view ask for at once."""
    count(key)
    time.sleep(delay)
    return f"{key}:{perrequest.get('marker')}"


@request_memo
async def aslow(key: str, delay: float = 0.3) -> str:
    import asyncio

    count(key)
    await asyncio.sleep(delay)
    return f"{key}:{perrequest.get('marker')}"


@request_memo
def big(key: str) -> str:
    """A near-unique key and a 4 KB value: what 20,000 requests must not accumulate."""
    return key * (4096 // max(len(key), 1))
