"""Every test ends with no request scope left open in this process."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from perrequest.testing import assert_no_live_scopes, live_scopes


@pytest.fixture(autouse=True)
def _no_live_scopes_after_test() -> Iterator[None]:
    yield
    # A server thread may still be finishing the last response's close.
    deadline = time.monotonic() + 5
    while live_scopes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_no_live_scopes()
