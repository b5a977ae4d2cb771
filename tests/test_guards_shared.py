"""Guards of the in-process shared tier (_shared) that no other test needed: each test here
fails with its guard deleted (a block-deletion mutation pass, 5 December 2026)."""

from __future__ import annotations

import sys
import threading
from typing import Any

import cachetools
import pytest

from perrequest import request_memo, request_scope


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_uses_the_shared_caches_from_any_thread_and_makes_new_ones() -> None:
    """_shared._forked: the fork waits for the cache operations in progress by taking every
    cache's lock, and the registry's; the child starts with new locks. Kept, the locks
    stay held in the child by the thread that forked: any other thread of the child (a
    gthread worker's) waits forever on a cache, and a function decorated there with a
    shared cache waits forever for the registry."""
    import multiprocessing

    cache: Any = cachetools.LRUCache(maxsize=10)

    @request_memo(shared=cache)
    def price(n: int) -> int:
        return n * 2

    with request_scope():
        assert price(1) == 2  # the cache in use, its lock registered

    def child(out: Any) -> None:
        def in_a_thread() -> None:
            with request_scope():
                out.put(("thread", price(2)))

        thread = threading.Thread(target=in_a_thread, daemon=True)
        thread.start()
        thread.join(3)

        @request_memo(shared=cachetools.LRUCache(maxsize=10))
        def later(n: int) -> int:
            return n + 1

        with request_scope():
            out.put(("new", later(1)))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    try:
        assert queue.get(timeout=5) == ("thread", 4)
        assert queue.get(timeout=5) == ("new", 2)
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
