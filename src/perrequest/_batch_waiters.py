"""Who waits for a key of a batch in flight: a future, a ``load_many``'s place
``(_Many, index)``, or a list of those; joining them, handing them a value, and finding
them again when the batch function changed its keys (a model saved: its hash moved)."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any


def joined(waiters: Any, who: Any) -> Any:
    """``waiters`` of a key with ``who`` added (a list once two wait)."""
    if type(waiters) is list:
        if len(waiters) >= 64 and not len(waiters) & (len(waiters) - 1):  # 64, 128, ...
            # Callers that gave up (cancelled) go, while a batch hangs: at most twice
            # as many kept as wait. A load_many's slot, (its _Many, index), once its
            # future is done: it is done only cancelled while a key is in flight.
            waiters[:] = [
                w
                for w in waiters
                if not (w[0].future.done() if type(w) is tuple else w.cancelled())
            ]
        waiters.append(who)
        return waiters
    return [waiters, who]


def hashes(cks: list[Hashable]) -> list[int] | None:
    """The keys' hashes as the batch starts, to tell at its end the keys it changed."""
    try:
        return list(map(hash, cks))
    except Exception:  # one that cannot be hashed now: all are found by identity
        return None


def popped(waiters: dict[Hashable, Any], cks: list[Hashable], hashes: Any) -> list[Any]:
    """The waiters of each key of a batch, popped: by hash while no key's hash changed
    since the batch started; else by identity (``_taken``). A key changed into one equal
    to another key's, found by its hash now, would take the other's waiters."""
    whos: list[Any] = []
    try:
        if hashes is not None and list(map(hash, cks)) == hashes:
            pop = waiters.pop
            for ck in cks:
                whos.append(pop(ck))
    except Exception:  # a key's __hash__ or __eq__ raises now, or it changed
        pass
    if len(whos) < len(cks):
        whos += _taken(waiters, cks[len(whos) :])
    return whos


def _taken(waiters: dict[Hashable, Any], cks: list[Hashable]) -> list[Any]:
    """The waiters of ``cks`` popped by identity, for keys whose hash the batch function
    changed (a model saved) or that raise now; the others filed again under their hashes
    now (one that cannot be hashed any more fails its waiters). None: nobody waits."""
    entries = list(dict.items(waiters))
    waiters.clear()
    at = {id(ck): i for i, ck in enumerate(cks)}  # cks holds them: ids are unique
    found: list[Any] = [None] * len(cks)
    for key, who in entries:
        i = at.get(id(key))
        if i is not None:  # filed twice (loaded again under its new hash): both get it
            found[i] = who if found[i] is None else [*_listed(found[i]), *_listed(who)]
            continue
        try:
            other = waiters.get(key)  # changed into a key equal to another one: both wait
            waiters[key] = who if other is None else [*_listed(other), *_listed(who)]
        except Exception as exc:
            hand(who, exc, True)
    return found


def _listed(who: Any) -> list[Any]:
    return who if type(who) is list else [who]


def hand(who: Any, value: Any, failed: bool) -> Any:
    """Hand ``value`` to a waiter (a future, a ``(_Many, index)``) or a list of them; the
    future now holding the value, if any, for later hits."""
    if type(who) is list:
        kept = None
        for one in who:
            kept = hand(one, value, failed) or kept
        return kept
    if who is None:  # nobody (a key lost by _taken)
        return None
    if type(who) is tuple:
        if not who[0].future.done():
            who[0].put(who[1], value, failed)
        return None
    if who.done():  # that caller was cancelled
        return None
    if failed:
        fail(who, value)
        return None
    who.set_result(value)
    return who


def fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except TypeError:  # StopIteration cannot travel through a future
        future.set_exception(RuntimeError(f"the batch function's value was {exc!r}"))
