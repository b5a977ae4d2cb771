"""Property tests: memoized results equal plain results, bounds hold, nothing stays open."""

from __future__ import annotations

import asyncio
import inspect
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from perrequest import MemoStore, _wrappers, request_memo, request_scope
from perrequest.testing import live_scopes

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # nan, inf and -0.0 included
    st.text(max_size=8),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.tuples(inner, inner), st.frozensets(inner, max_size=3)),
    max_leaves=6,
)
calls = st.tuples(
    st.lists(values, max_size=3).map(tuple),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=2),
)


def _plain(*args: Any, **kwargs: Any) -> Any:
    return (args, sorted(kwargs.items()))


_typed_memo = request_memo(typed=True)(_plain)


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down and the same sign of zero."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, frozenset):
        return a == b and all(any(_same(x, y) for y in b) for x in a)
    return bool(a == b)


@settings(max_examples=200, deadline=None)
@given(st.lists(calls, min_size=1, max_size=20))
def test_typed_memo_returns_exactly_what_the_plain_function_returns(sequence: list[Any]) -> None:
    with request_scope():
        for args, kwargs in sequence:
            assert _same(_typed_memo(*args, **kwargs), _plain(*args, **kwargs))
    assert live_scopes() == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(calls, min_size=1, max_size=20))
def test_untyped_memo_returns_an_equal_result(sequence: list[Any]) -> None:
    memo = request_memo(_plain)
    with request_scope():
        for args, kwargs in sequence:
            # Untyped, equal arguments (1, 1.0, True) are one call, as with lru_cache.
            got, want = memo(*args, **kwargs), _plain(*args, **kwargs)
            assert got == want or repr(want).count("nan")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=30))
def test_two_functions_never_share_entries(sequence: list[tuple[bool, int]]) -> None:
    @request_memo
    def left(x: int) -> tuple[str, int]:
        return ("left", x)

    @request_memo
    def right(x: int) -> tuple[str, int]:
        return ("right", x)

    with request_scope():
        for use_left, x in sequence:
            fn, tag = (left, "left") if use_left else (right, "right")
            assert fn(x) == (tag, x)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 30)),
        st.tuples(st.just("get"), st.integers(0, 30)),
        st.tuples(st.just("del"), st.integers(0, 30)),
        st.tuples(st.just("memo"), st.integers(0, 30)),
        st.tuples(st.just("get_or_set"), st.integers(0, 30)),
        st.tuples(st.just("clear"), st.just(0)),
    ),
    max_size=80,
)


@request_memo
def _ident(x: int) -> int:
    return x


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), operations)
def test_store_never_exceeds_its_bound_and_closes_clean(
    bound: int, ops: list[tuple[str, int]]
) -> None:
    with request_scope(max_entries=bound) as store:
        model: dict[int, int] = {}
        for op, key in ops:
            if op == "set":
                store[key] = key
                model[key] = key
            elif op == "get":
                assert store.get(key, key) == key
            elif op == "del":
                store.pop(key, None)
                model.pop(key, None)
            elif op == "memo":
                assert _ident(key) == key
            elif op == "get_or_set":
                assert store.get_or_set(("g", key), lambda k=key: k) == key
            else:
                store.clear()
                model.clear()
            assert len(store) <= bound
            assert len(store) == len(list(store))  # every entry is reachable, once
            assert store.stats.peak_entries <= bound
            # Whatever survived eviction holds the value that was stored.
            for k, v in model.items():
                if k in store:
                    assert store[k] == v
    assert store.closed and len(store) == 0 and live_scopes() == 0


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(0, 10), max_size=40))
def test_a_standalone_store_is_bounded(bound: int, keys: list[int]) -> None:
    store = MemoStore(max_entries=bound)
    for k in keys:
        store[k] = k
        assert len(store) <= bound
    if keys:
        assert keys[-1] in store


# -- the generated hit path behaves as the plain closure -------------------------------

# A signature: positional-only, positional-or-keyword and keyword-only parameter counts,
# and how many of the positional-or-keyword ones have a default.
signatures = st.tuples(
    st.integers(0, 1), st.integers(0, 3), st.integers(0, 2), st.integers(0, 1)
).filter(lambda s: s[0] + s[1] + s[2] > 0 and s[3] <= s[1])
arguments = st.one_of(st.integers(0, 3), st.just([0]))  # [0]: unhashable


def _function(signature: tuple[int, int, int, int], log: list[Any], is_async: bool = False) -> Any:
    """A plain function of that signature, recording its calls and returning them;
    it raises when an argument is 3 (errors are not cached)."""
    positional_only, either, keyword_only, defaults = signature
    names = [f"p{i}" for i in range(positional_only)]
    params = [*names, "/"] if names else []
    either_names = [f"e{i}" for i in range(either)]
    params += [f"{n}=0" if i >= either - defaults else n for i, n in enumerate(either_names)]
    kw_names = [f"k{i}" for i in range(keyword_only)]
    if kw_names:
        params += ["*", *kw_names]
    everything = names + either_names + kw_names
    source = (
        f"{'async ' if is_async else ''}def fn({', '.join(params)}):\n"
        f"    log.append(({', '.join(everything)},))\n"
        f"    if 3 in ({', '.join(everything)},):\n"
        f"        raise ValueError('three')\n"
        f"    return ({', '.join(everything)},)\n"
    )
    namespace: dict[str, Any] = {"log": log, "__name__": __name__}
    exec(source, namespace)
    return namespace["fn"]


def _run(memo: Any, calls: list[tuple[tuple[Any, ...], dict[str, Any], str]]) -> list[Any]:
    """What a sequence of calls, deletions and clears observes, in one fresh scope."""
    seen: list[Any] = []
    with request_scope(max_entries=4) as store:
        for args, kwargs, action in calls:
            try:
                if action == "delete":
                    outcome: Any = ("deleted", memo.cache_delete(*args, **kwargs))
                elif action == "clear":
                    memo.cache_clear()
                    outcome = "cleared"
                elif inspect.iscoroutinefunction(memo):
                    outcome = ("value", asyncio.run(memo(*args, **kwargs)))
                else:
                    outcome = ("value", memo(*args, **kwargs))
            except Exception as exc:
                outcome = (type(exc).__name__, str(exc).replace("plain_", ""))
            seen.append((outcome, memo.cache_info(), len(store)))
    return seen


@settings(max_examples=150, deadline=None)
@given(signatures, st.one_of(st.none(), st.integers(1, 3)), st.booleans(), st.data())
def test_the_generated_wrapper_behaves_as_the_plain_closure(
    signature: tuple[int, int, int, int],
    max_entries: int | None,
    is_async: bool,
    data: st.DataObject,
) -> None:
    """For calls in canonical form (positional parameters passed positionally,
    keyword-only ones by keyword, in the signature's order), the wrapper generated
    with the function's signature and the ``*args, **kwargs`` closure give the same
    results, make the same calls, and keep the same entries, under the store's bound
    and the function's own."""
    positional = signature[0] + signature[1]
    keyword_only = signature[2]
    call = st.tuples(
        st.lists(arguments, min_size=positional, max_size=positional).map(tuple),
        # In one order: the closure keys by call shape, so k1=, k0= is another entry.
        st.fixed_dictionaries({f"k{i}": arguments for i in range(keyword_only)}).map(
            lambda kw: dict(sorted(kw.items()))
        ),
        st.sampled_from(["call", "call", "call", "delete", "clear"]),
    )
    calls = data.draw(st.lists(call, max_size=25))
    generated_log: list[Any] = []
    plain_log: list[Any] = []
    fn = _function(signature, generated_log, is_async)
    plain_fn = _function(signature, plain_log, is_async)

    def plain_sync(*args: Any, **kwargs: Any) -> Any:  # *args/**kwargs: the plain closure
        return plain_fn(*args, **kwargs)

    async def plain_async(*args: Any, **kwargs: Any) -> Any:
        return await plain_fn(*args, **kwargs)

    plain_ = plain_async if is_async else plain_sync

    plain_.__signature__ = inspect.signature(plain_fn)  # type: ignore[attr-defined]
    plain_.__qualname__ = plain_.__name__ = "fn"
    generated = request_memo(max_entries=max_entries)(fn)
    plain = request_memo(max_entries=max_entries)(plain_)
    assert _wrappers.parameters(fn) is not None and _wrappers.parameters(plain_) is None
    assert _run(generated, calls) == _run(plain, calls)
    assert generated_log == plain_log


@settings(max_examples=150, deadline=None)
@given(signatures, st.one_of(st.none(), st.integers(1, 3)), st.booleans(), st.data())
def test_the_generated_wrapper_binds_every_call_shape_as_the_canonical_one(
    signature: tuple[int, int, int, int],
    max_entries: int | None,
    is_async: bool,
    data: st.DataObject,
) -> None:
    """Calls that leave defaults out, or pass positional-or-keyword parameters by
    keyword, are bound by Python in the generated wrapper: they observe what the plain
    closure observes for the same call written out in canonical form."""
    positional_only, either, keyword_only, defaults = signature
    positional = positional_only + either
    generated_log: list[Any] = []
    plain_log: list[Any] = []
    fn = _function(signature, generated_log, is_async)
    plain_fn = _function(signature, plain_log, is_async)
    names = list(inspect.signature(fn).parameters)

    def shapes(values: tuple[Any, ...]) -> Any:
        """The call as the generated side makes it: defaults left out when they hold
        their default, and a tail of positional-or-keyword parameters by keyword."""
        cut = positional
        while cut > positional - defaults and values[cut - 1] == 0 and values[cut - 1] != [0]:
            cut -= 1
        omit = data.draw(st.booleans())
        shown = values[:cut] if omit else values[:positional]
        by_keyword = data.draw(st.integers(0, max(0, len(shown) - positional_only)))
        split = len(shown) - by_keyword
        return shown[:split], dict(zip(names[split : len(shown)], shown[split:], strict=True))

    call = st.tuples(
        st.lists(arguments, min_size=positional, max_size=positional).map(tuple),
        st.fixed_dictionaries({f"k{i}": arguments for i in range(keyword_only)}).map(
            lambda kw: dict(sorted(kw.items()))
        ),
        st.sampled_from(["call", "call", "call", "delete", "clear"]),
    )
    canonical = data.draw(st.lists(call, max_size=25))
    varied = []
    for args, kwargs, action in canonical:
        shown, by_keyword = shapes(args)
        varied.append((shown, {**by_keyword, **kwargs}, action))

    def plain_sync(*args: Any, **kwargs: Any) -> Any:
        return plain_fn(*args, **kwargs)

    async def plain_async(*args: Any, **kwargs: Any) -> Any:
        return await plain_fn(*args, **kwargs)

    plain_ = plain_async if is_async else plain_sync
    plain_.__signature__ = inspect.signature(plain_fn)  # type: ignore[attr-defined]
    plain_.__qualname__ = plain_.__name__ = "fn"
    generated = request_memo(max_entries=max_entries)(fn)
    plain = request_memo(max_entries=max_entries)(plain_)
    assert _run(generated, varied) == _run(plain, canonical)
    assert generated_log == plain_log


@settings(max_examples=100, deadline=None)
@given(signatures, st.one_of(st.none(), st.integers(1, 3)), st.booleans(), st.data())
def test_a_generated_method_behaves_as_the_plain_closure(
    signature: tuple[int, int, int, int],
    max_entries: int | None,
    is_async: bool,
    data: st.DataObject,
) -> None:
    """Methods: ``self`` keyed by identity, by the generated wrapper and the closure
    alike; two equal instances never share entries."""
    positional = signature[0] + signature[1]
    keyword_only = signature[2]
    call = st.tuples(
        st.integers(0, 1),  # which instance
        st.lists(arguments, min_size=positional, max_size=positional).map(tuple),
        st.fixed_dictionaries({f"k{i}": arguments for i in range(keyword_only)}).map(
            lambda kw: dict(sorted(kw.items()))
        ),
        st.sampled_from(["call", "call", "call", "delete", "clear"]),
    )
    calls = data.draw(st.lists(call, max_size=25))

    def make(generated: bool, log: list[Any]) -> Any:
        inner = _function(signature, log, is_async)
        params = str(inspect.signature(inner))[1:-1]
        forward = ", ".join(
            f"{n}={n}" if n.startswith("k") else n for n in inspect.signature(inner).parameters
        )
        if generated:
            source = (
                f"class Row:\n"
                f"    def __eq__(self, other): return isinstance(other, Row)\n"
                f"    __hash__ = None\n"
                f"    @request_memo(max_entries={max_entries})\n"
                f"    {'async ' if is_async else ''}def fn(self{', ' if params else ''}{params}):\n"
                f"        log.append(id(self))\n"
                f"        return {'await ' if is_async else ''}inner({forward})\n"
            )
        else:
            source = (
                f"class Row:\n"
                f"    def __eq__(self, other): return isinstance(other, Row)\n"
                f"    __hash__ = None\n"
                f"    {'async ' if is_async else ''}def fn(self, *args, **kwargs):\n"
                f"        log.append(id(self))\n"
                f"        return {'await ' if is_async else ''}inner(*args, **kwargs)\n"
            )
        namespace: dict[str, Any] = {
            "request_memo": request_memo,
            "log": log,
            "inner": inner,
            "__name__": __name__,
        }
        exec(source, namespace)
        cls = namespace["Row"]
        if not generated:  # the closure, with the generated one's signature (error messages)
            twin = make(True, [])
            raw = cls.__dict__["fn"]
            raw.__signature__ = inspect.signature(twin.__dict__["fn"].__wrapped__)
            cls.fn = request_memo(max_entries=max_entries)(raw)
        return cls

    def observe(cls: Any, log: list[Any]) -> list[Any]:
        rows = [cls(), cls()]
        ids = [id(r) for r in rows]
        seen: list[Any] = []
        with request_scope(max_entries=4) as store:
            for which, args, kwargs, action in calls:
                row = rows[which]
                try:
                    if action == "delete":
                        outcome: Any = ("deleted", row.fn.cache_delete(row, *args, **kwargs))
                    elif action == "clear":
                        row.fn.cache_clear()
                        outcome = "cleared"
                    elif is_async:
                        outcome = ("value", asyncio.run(row.fn(*args, **kwargs)))
                    else:
                        outcome = ("value", row.fn(*args, **kwargs))
                except Exception as exc:
                    outcome = (type(exc).__name__, str(exc).split(":", 1)[-1])
                seen.append((outcome, cls.fn.cache_info(), len(store)))
        return [seen, [ids.index(x) if x in ids else x for x in log]]

    generated_log: list[Any] = []
    plain_log: list[Any] = []
    generated, plain = make(True, generated_log), make(False, plain_log)
    assert _wrappers.parameters(generated.fn.__wrapped__) is not None
    assert _wrappers.parameters(plain.fn.__wrapped__) is None
    assert observe(generated, generated_log) == observe(plain, plain_log)
