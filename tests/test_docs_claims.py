"""What the docs say, checked against the code: quoted messages, named options, claims.

tests/test_docs.py runs the snippets; this file keeps the sentences true that
no snippet runs: an error message a page quotes, a default a page states, the
advice a page promises the message gives.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import pytest

import perrequest
from perrequest import NoActiveScope, request_memo, request_scope

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _error(fn: object) -> BaseException:
    assert callable(fn)
    with pytest.raises(BaseException) as info:
        fn()
    return info.value


def _in_a_plain_thread(fn: object) -> BaseException:
    """Run ``fn`` in a thread that does not copy the context, inside a scope."""
    assert callable(fn)
    caught: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed back to the test
            caught.append(exc)

    with request_scope():
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=10)
    assert not thread.is_alive() and caught
    return caught[0]


# -- errors.md: NoActiveScope's "what to do" -------------------------------------------------


def test_no_active_scope_in_a_thread_says_to_use_bind_scope() -> None:
    """errors.md: inside a request, NoActiveScope "usually means code runs in a thread
    started without the context: use bind_scope". The message must say so too: a
    FastAPI user whose middleware is registered, calling current_store() from
    run_in_executor, was told only to add the middleware."""
    exc = _in_a_plain_thread(perrequest.current_store)
    assert isinstance(exc, NoActiveScope)
    assert "perrequest.bind_scope(fn)" in str(exc), str(exc)
    assert "run_in_executor" in str(exc), str(exc)


def test_a_raising_memo_in_a_thread_says_to_use_bind_scope() -> None:
    @request_memo(outside_scope="raise")
    def price(sku: str) -> int:
        return len(sku)

    exc = _in_a_plain_thread(lambda: price("apple"))
    assert isinstance(exc, NoActiveScope)
    assert "outside_scope='raise'" in str(exc), str(exc)
    assert "perrequest.bind_scope(fn)" in str(exc), str(exc)


def test_bind_scope_outside_a_scope_says_where_to_call_it() -> None:
    exc = _error(lambda: perrequest.bind_scope(print))
    assert isinstance(exc, NoActiveScope)
    assert "Call it inside the request" in str(exc)


# -- errors.md and faq.md: the quoted messages ------------------------------------------------


def test_did_you_mean_max_entries_as_quoted() -> None:
    """faq.md and errors.md quote: request_memo(maxsize=10) raises
    `TypeError: ... Did you mean max_entries=?`."""
    exc = _error(lambda: request_memo(maxsize=10))
    assert type(exc) is TypeError and "Did you mean max_entries=?" in str(exc)
    for page in ("faq.md", "errors.md"):
        assert "Did you mean max_entries=?" in (DOCS / page).read_text()


def test_outside_scope_warning_reads_as_errors_md_quotes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """errors.md quotes the WARNING; each quoted piece is in the logged message."""

    @request_memo
    def quoted_warning_claim(x: int) -> int:
        return x

    with caplog.at_level(logging.WARNING, logger="perrequest"):
        quoted_warning_claim(1)
    (record,) = [r for r in caplog.records if r.name == "perrequest"]
    message = record.getMessage()
    page = (DOCS / "errors.md").read_text()
    quote = re.search(r'The WARNING reads: "(.*?)" It is logged', page, re.S)
    assert quote, "errors.md no longer quotes the WARNING: update this test"
    pieces = [p.strip() for p in quote[1].replace("\n", " ").split("...")]
    pieces = [re.sub(r"`module\.function`", "{name}", p) for p in pieces]
    name = f"{quoted_warning_claim.__module__}.{quoted_warning_claim.__qualname__}"
    for piece in pieces:
        for part in piece.split("{name}"):
            assert part.replace("`", "").strip(" .,") in message.replace("`", ""), (
                f"errors.md quotes {part!r}; the WARNING is {message!r}"
            )
    assert name in message
