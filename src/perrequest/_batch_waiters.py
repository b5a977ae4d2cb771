"""Who waits for a key of a batch in flight: its slot, a list of futures and ``load_many``
places ``(_Many, index)``. The batch holds each key's slot, so it hands each caller its
value whatever its batch function did to the keys' hashes (a model saved)."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from contextlib import suppress
from typing import Any


def joined(slot: list[Any], who: Any) -> None:
    """``who`` added to the waiters of a key in flight."""
    if len(slot) >= 64 and not len(slot) & (len(slot) - 1):  # 64, 128, ...
        # Callers that gave up (cancelled) go, while a batch hangs: at most twice
        # as many kept as wait. A load_many's slot, (its _Many, index), once its
        # future is done: it is done only cancelled while a key is in flight.
        slot[:] = [
            w for w in slot if not (w[0].future.done() if type(w) is tuple else w.cancelled())
        ]
    slot.append(who)


def unfiled(waiters: dict[Hashable, Any], cks: list[Hashable], slots: list[list[Any]]) -> None:
    """A batch's keys no longer joined: each removed by its key while that still finds its
    slot; else (the batch function changed a key's hash, or its __hash__ raises now) the
    others filed again under their hashes now. A key that cannot be filed, or that now
    equals another key in flight, is joined no more: its own batch still hands its slot."""
    try:
        for ck, slot in zip(cks, slots, strict=True):
            if waiters.get(ck) is not slot:
                break
            del waiters[ck]
        else:
            return
    except Exception:  # a key's __hash__ or __eq__ raises now
        pass
    ended = {id(slot) for slot in slots}
    others = [(ck, slot) for ck, slot in dict.items(waiters) if id(slot) not in ended]
    waiters.clear()
    for ck, slot in others:
        with suppress(Exception):
            waiters.setdefault(ck, slot)


def hand(slot: list[Any], value: Any, failed: bool) -> Any:
    """Hand ``value`` to a key's waiters (futures, ``(_Many, index)`` places); the future
    now holding the value, if any, for later hits."""
    kept = None
    for who in slot:
        if type(who) is tuple:
            if not who[0].future.done():
                who[0].put(who[1], value, failed)
        elif who.done():  # that caller was cancelled
            pass
        elif failed:
            fail(who, value)
        else:
            who.set_result(value)
            kept = who
    return kept


def fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except TypeError:  # StopIteration cannot travel through a future
        future.set_exception(RuntimeError(f"the batch function's value was {exc!r}"))
