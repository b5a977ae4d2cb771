"""Who waits for whose single-flight computation (threads by id, tasks), so that a caller
never waits for one that waits for it: two threads fetching each other's keys would
otherwise wait forever. Consulted only when a caller is about to wait."""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Any

_waits: dict[object, object] = {}
_waits_lock = threading.Lock()


def may_wait(me: object, owner: object) -> bool:
    """Record that ``me`` waits for ``owner``, unless that closes a cycle (then False)."""
    with _waits_lock:
        who: object = owner
        for _ in range(len(_waits) + 1):
            if who == me:
                return False
            who = _waits.get(who)
            if who is None:
                break
        _waits[me] = owner
        return True


def done_waiting(me: object) -> None:
    _waits.pop(me, None)


# The sync batch fetches whose batch function runs here: in this thread, or in one it
# started with this context copied (asyncio.to_thread) or bound (``bind_scope``). Their
# keys are fetched again here, never waited for: the fetch waits for this code.
within: ContextVar[tuple[Any, ...]] = ContextVar("perrequest.fetching", default=())
