"""What a memo does when called outside any scope: warn, call or raise.

Run it: `python outside_scope.py`
"""

import logging

from perrequest import NoActiveScope, UnhashableArguments, request_memo

warnings: list[logging.LogRecord] = []


class Keep(logging.Handler):  # or your logging configuration
    def emit(self, record: logging.LogRecord) -> None:
        warnings.append(record)


logging.getLogger("perrequest").addHandler(Keep())
calls: list[str] = []


@request_memo  # outside_scope="warn", the default
def price(sku: str) -> int:
    calls.append(sku)
    return 3


@request_memo(outside_scope="call")  # meant to run both ways: silent
def tax_rate(country: str) -> float:
    return 0.2


@request_memo(outside_scope="raise")  # never without a scope
def permissions(user: str) -> frozenset[str]:
    return frozenset()


# No scope is open here: no middleware, no request_scope().
assert price("apple") == price("apple") == 3
assert calls == ["apple", "apple"]  # called every time, cached never
assert len(warnings) == 1  # one WARNING per function per process
assert "price was called outside a request scope" in warnings[0].getMessage()

assert tax_rate("FR") == 0.2
assert len(warnings) == 1  # "call" logs nothing

try:
    permissions("alice")
except NoActiveScope as exc:
    assert "outside_scope='raise'" in str(exc)
else:
    raise AssertionError("expected NoActiveScope")

# Keys are built outside a scope too: the same error as inside one.
try:
    price(["apple"])  # type: ignore[arg-type]
except UnhashableArguments as exc:
    assert "sku" in str(exc)
else:
    raise AssertionError("expected UnhashableArguments")
