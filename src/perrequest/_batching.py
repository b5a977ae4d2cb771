"""A batch function's spec (options, keys, results) and its sync loads, whose keys
threads sharing a scope wait for together on an ``Outcome`` (``_waits``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Set
from typing import Any

from ._active import here, logger
from ._active import within as _within
from ._batch_outcomes import Unhashed, missing_keys, pick, put_all, same, settled
from ._checks import is_async_callable, unhashable_because
from ._flight import MISSING
from ._records import take_out
from ._results import one_shots_failed, refuse_coroutine
from ._signals import is_time_limit
from ._stats import Counter, function_name
from ._waits import RESTART, Outcome, done_waiting, gone, may_wait, result
from .errors import ScopeClosed, UnhashableArguments
from .memo import OUTSIDE_FIX, refuse_or_warn
from .store import MemoStore

UNTIMED = Counter(timed=False)  # outside any scope: nothing is counted
now = time.perf_counter
# Each thread's own dict (``THREAD.__dict__``), kept with the futures that async hits hand back
# (``batch._async_load``): told by identity, cheaper than a thread id, never another thread's
# while it is held.
THREAD = threading.local()
_UNSTORED = "perrequest: @request_batch %s could not store key %r: its hash raised after it ran"


def _get(result: Mapping[Any, Any], key: Any) -> Any:
    try:
        return result.get(key, MISSING)
    except TypeError:  # an unhashable load key: the mapping is by cache key
        return MISSING


class _BatchSpec:
    """One decorated batch function. It owns the loader's entries in a store, as a memo's
    spec does (``store._subs[spec][cache_key]``, bounded by its ``max_entries``)."""

    load: Callable[[Any], Any]  # an async loader's, which a miss calls again

    def __init__(
        self, fn: Callable[..., Any], max_batch_size: int | None, key_fn: Any,
        max_entries: int | None, outside_scope: str,
    ) -> None:  # fmt: skip
        self.fn, self.is_async, self.key_fn = fn, is_async_callable(fn), key_fn
        self.max_batch_size, self.outside_scope = max_batch_size, outside_scope
        self.max_entries = max_entries  # read by the store: this loader's own bound
        self.name = function_name(fn)  # never the repr: a partial's shows its arguments

    def __repr__(self) -> str:
        return f"<request_batch {self.name}>"

    def keys_of(self, keys: Iterable[Any]) -> tuple[list[Any], list[Hashable]]:
        """The load keys as a list, and their cache keys, checked hashable."""
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
            raise TypeError(
                f"@request_batch {self.name}: load_many() takes an iterable of keys, not "
                f"{type(keys).__name__} {keys!r}. Use load(key) for one key."
            )
        keys = keys if type(keys) is list else list(keys)
        cache_keys = keys if self.key_fn is None else [self.key_fn(key) for key in keys]
        try:
            set(cache_keys)
        except TypeError:
            raise self.unhashable(keys, cache_keys) from None
        return keys, cache_keys

    def unhashable(self, keys: list[Any], cache_keys: list[Any]) -> UnhashableArguments:
        for key, cache_key in zip(keys, cache_keys, strict=True):
            if (why := unhashable_because(cache_key)) is not None:
                if self.key_fn is not None:
                    return UnhashableArguments(
                        f"the key= function of @request_batch {self.name} returned an "
                        f"unhashable value ({why}) for key {key!r}. Make it "
                        "return a hashable value, such as a tuple of strings and numbers."
                    )
                return UnhashableArguments(
                    f"@request_batch {self.name}: key {key!r} is unhashable "
                    f"({why}), so it cannot be cached. Pass hashable keys (a "
                    "tuple instead of a list), or give the decorator key=, a function of one "
                    "key that returns a hashable cache key."
                )
        return UnhashableArguments(f"@request_batch {self.name}: a key cannot be hashed")

    def spread(
        self, keys: list[Any], cache_keys: list[Hashable], result: Any, passed: list[Any]
    ) -> list[Any]:
        """One value per key (an ``Exception`` where it failed), in a list of our own, from
        what the batch function returned given ``passed`` (a copy of ``keys``); ``TypeError``
        when its shape is wrong, or when it changed ``passed`` and returned a sequence."""
        if isinstance(result, Mapping):
            return one_shots_failed(self.name, keys, self._from_mapping(keys, cache_keys, result))
        if len(passed) != len(keys) or any(a is not b for a, b in zip(passed, keys, strict=True)):
            raise TypeError(  # told by identity: no key's __eq__ runs
                f"@request_batch {self.name} changed the list of keys it was given (sorted, "
                "converted or drained it in place), so which value is whose is unknown: work "
                "on a copy (sorted(keys), list(keys)) and return the values in the order of "
                "the keys as given, or a mapping from key to value."
            )
        if isinstance(result, (str, bytes, Set, Awaitable)) or not isinstance(result, Iterable):
            raise TypeError(  # an Awaitable: a Future a plain def returned (gather(...))
                f"@request_batch {self.name} returned {type(result).__name__}: a batch "
                "function returns a sequence of values in the order of its keys, or a "
                "mapping from key to value (awaiting what it needs: an async def)."
            )
        result = list(result)  # ours: the function may reuse or change its list later
        if len(result) != len(keys):
            raise TypeError(
                f"@request_batch {self.name} returned {len(result)} values for {len(keys)} "
                "keys: it must return one value per key, in the order of the keys it was "
                "given (an Exception instance fails one key), or a mapping from key to value."
            )
        return one_shots_failed(self.name, keys, result)

    def _from_mapping(self, keys: list[Any], cks: list[Hashable], result: Any) -> list[Any]:
        """With ``key=``, a mapping keyed by load keys or by cache keys: whichever finds
        more of the batch's keys, never a mix (a load key may be another key's cache key)."""
        values = [_get(result, key) for key in keys]
        if self.key_fn is not None:  # (a key read twice may give two equal values)
            pairs = zip(keys, cks, values, strict=True)
            other = [v if same(k, c) else _get(result, c) for k, c, v in pairs]
            found = [sum(value is not MISSING for value in kind) for kind in (values, other)]
            differ = any(a is not b for a, b in zip(values, other, strict=True))
            if differ and found[0] <= found[1]:
                if found[0] == found[1]:
                    raise TypeError(
                        f"@request_batch {self.name} returned a mapping that finds as many of "
                        "its keys by their load keys as by their cache keys (key=), with other "
                        "values: key it by one kind only, or return a sequence in key order."
                    )
                values = other
        missing = "Map every key it is given (to None, if that means absent)."
        return [
            KeyError(f"@request_batch {self.name} returned a mapping without key {k!r}. {missing}")
            if v is MISSING
            else v
            for k, v in zip(keys, values, strict=True)
        ]

    def chunks(self, items: list[Any]) -> list[list[Any]]:
        size = self.max_batch_size or len(items) or 1  # nothing to fetch: no call
        return [items[i : i + size] for i in range(0, len(items), size)]

    def counter_in(self, store: MemoStore | None) -> Counter | None:
        """This loader's counter in ``store``; None outside any scope or once it ended."""
        if store is None or store._closed:
            return None
        try:
            return store._counter(self.name)
        except ScopeClosed:
            return None

    def look(
        self, store: MemoStore, counter: Counter, keys: list[Any], cks: list[Hashable]
    ) -> tuple[list[Any], dict[Hashable, Any]]:
        """The stored values (MISSING where none), and the keys missing (cache key to load
        key, in first-asked order); what is found, or asked for twice, is a hit."""
        values = [store._lookup((self, ck)) for ck in cks]
        wanted = missing_keys(keys, cks, values)
        counter.hits += len(values) - len(wanted)
        return values, wanted

    def fetch(
        self, counter: Counter, wanted: dict[Hashable, Any], out: dict[Hashable, Any]
    ) -> None:
        """Each wanted key's value, or the ``Exception`` it failed with, into ``out``."""
        for cks in self.chunks(list(wanted)):
            keys = [wanted[ck] for ck in cks]
            start = now() if counter.timed else 0.0
            try:
                result: Any = self.fn(passed := list(keys))
                refuse_coroutine(result, self.fn, f"@request_batch {self.name}")
                values = self.spread(keys, cks, result, passed)
            except Exception as exc:
                values = [exc] * len(keys)
            finally:
                if start:
                    counter.compute_s += now() - start
            put_all(out, cks, values)

    async def fetch_async(
        self, counter: Counter, wanted: dict[Hashable, Any], out: dict[Hashable, Any]
    ) -> None:
        """``fetch`` of an async batch function, counting each call's keys as it starts."""
        for cks in self.chunks(list(wanted)):
            keys = [wanted[ck] for ck in cks]
            counter.misses += len(keys) if counter is not UNTIMED else 0
            start = now() if counter.timed else 0.0
            try:
                values = self.spread(keys, cks, await self.fn(passed := list(keys)), passed)
            except Exception as exc:
                values = [exc] * len(keys)
            finally:
                if start:
                    counter.compute_s += now() - start
            put_all(out, cks, values)

    def keep(self, store: MemoStore, counter: Counter, fetched: dict[Hashable, Any]) -> None:
        """Store what was fetched, lock held; failures are not cached. A value stored since
        (the key fetched twice: a cycle of threads, trio) stays, and is what its loads get."""
        for ck, value in list(fetched.items()):
            if type(ck) is Unhashed:
                logger.error(_UNSTORED, self.name, ck.key)
            elif not issubclass(type(value), Exception):  # type(): runs no code of the value
                stored = store._lookup((self, ck), touch=False)
                if stored is MISSING:
                    store._fill((self, ck), value, counter, None)
                else:
                    fetched[ck] = stored  # one value per key

    def outside(self, keys: list[Any], cks: list[Hashable]) -> dict[Hashable, Any]:
        """Outside any scope, after its rule: every key is wanted, and nothing is cached."""
        how = self.outside_scope
        refuse_or_warn("request_batch", self.name, how, "batched or cached", OUTSIDE_FIX)
        return missing_keys(keys, cks)

    # -- sync loads: threads sharing a scope never fetch a key twice at once -------------

    def load_many(self, keys: Iterable[Any]) -> list[Any]:
        keys, cks = self.keys_of(keys)
        store = here()
        counter = self.counter_in(store)
        got: dict[Hashable, Any] = {}
        if store is None or counter is None:
            values: list[Any] = [MISSING] * len(cks)
            self.fetch(UNTIMED, self.outside(keys, cks), got)
        else:
            values, wanted = self.look(store, counter, keys, cks)
            alone: set[Hashable] = set()  # keys whose fetch waits for this thread's
            while wanted:
                wanted = self._fetch(store, counter, wanted, got, alone)
        try:
            return settled(cks, values, got)
        finally:  # a failure's traceback holds this frame: not what it fetched (a cycle)
            got = values = None  # type: ignore[assignment]

    def _fetch(
        self, store: MemoStore, counter: Counter, wanted: dict[Hashable, Any],
        got: dict[Hashable, Any], alone: set[Hashable],
    ) -> dict[Hashable, Any]:  # fmt: skip
        """Into ``got``: fetch what nobody is fetching, wait for the rest; what to ask for
        again (an interrupted fetch, or one that waits for this thread's). A key of a fetch
        whose batch function runs this code is fetched again, never waited for."""
        me = _Fetch(threading.get_ident())  # as in _flight.run
        flights = store._flights
        mine: dict[Hashable, Any] = {}
        theirs: list[tuple[Hashable, _Fetch, Outcome]] = []
        outcomes: dict[Hashable, Any] = {}
        within = _within.get()
        token = _within.set((*within, me))
        try:
            with store._lock:
                for ck, key in wanted.items():
                    value = store._lookup((self, ck))
                    if value is not MISSING:
                        got[ck] = value
                        counter.hits += 1
                        continue
                    other = flights.get((self, ck))
                    if other is not None and (other.ended or gone(other.owner)):
                        other = None  # left by a failed unregister, or in a forked parent
                    if other is None or other in within or ck in alone:
                        if other is None:
                            flights[(self, ck)] = me
                            me.keys.append(ck)
                        mine[ck] = key
                        counter.misses += 1
                    else:
                        if other.future is None:  # the first to wait makes it
                            other.future = Outcome()
                        theirs.append((ck, other, other.future))  # a hit once it answers
            if mine:
                self.fetch(counter, mine, outcomes)
        finally:  # interrupted, or a key's __eq__ raised: its waiters ask again
            try:
                if mine or me.keys:  # (a key registered, then its hash raised)
                    try:
                        self._end(store, counter, me, outcomes)
                    except BaseException:  # a signal as it began: once more, unless it ended
                        if not me.ended:
                            self._end(store, counter, me, outcomes)
                        raise
            finally:
                _within.reset(token)
        got.update(outcomes)
        again = {}
        for ck, other, future in theirs:
            if not future.done() and not may_wait(me.owner, other.owner, future):  # waits for us
                alone.add(ck)
                again[ck] = wanted[ck]
                continue
            try:  # looked at every second: a fetch may end without a word (as a memo's)
                outcome = result(future, flights, (self, ck), other)
            finally:
                done_waiting(me.owner, future)
            value = MISSING if outcome is RESTART else pick(outcome, ck)
            if value is MISSING:
                again[ck] = wanted[ck]
            else:
                put_all(got, [ck], [value])
                counter.hits += 1  # (asked again, it would count a miss: not both)
        return again

    def _end(self, store: MemoStore, counter: Counter, me: _Fetch, out: dict[Any, Any]) -> None:
        """Store, unregister, hand the outcomes to the waiters; a key's ``__eq__`` raising
        meanwhile strands nobody (the fetch has ended regardless)."""
        with store._lock:  # held throughout: no waiter joins meanwhile
            left = len(me.keys)
            try:
                self.keep(store, counter, out)
                for ck in me.keys:
                    try:
                        left -= store._flights.pop((self, ck), None) is me
                    except Exception as exc:  # its hash raises now: taken out below
                        if is_time_limit(exc):  # a soft time limit: the task's
                            raise
            finally:
                # Keys whose hash changed, or whose __hash__/__eq__ raised: by identity.
                if left and any(record is me for record in list(store._flights.values())):
                    take_out(store._flights, lambda _, record: record is me)
                if me.future is not None and not me.future.done():  # (done: run again)
                    me.future.set_result(out)
                me.ended = True  # none joins it now, even if a key stays registered
                # Its waiters hold the future; a function bound in its batch function holds
                me.future, me.keys = None, []  # the fetch (maybe past the request): no values


class _Fetch:
    """One thread's fetch, registered in ``_flights`` for each of its keys. The first
    thread to wait for it makes its ``Outcome``, whose result is its outcomes (a key
    without one was interrupted: ask again)."""

    __slots__ = ("ended", "future", "keys", "owner")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.keys: list[Hashable] = []
        self.future: Outcome | None = None
        self.ended = False
