"""Attacks on the worker integrations: real Celery workers (prefork, solo, threads) on a
real redis-server, and ``request_scope()`` in scripts, consumers and forked processes.

The Celery app is ``tests/workers_attack_apps.py``; each of its tasks reports what it
saw (what the task before it left on its thread, its own store, its memos' values).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import perrequest
from perrequest import in_request_scope, request_memo, request_scope
from perrequest.testing import assert_no_live_scopes, live_scopes

pytestmark = pytest.mark.timeout(120)

fork_only = pytest.mark.skipif(sys.platform == "win32", reason="fork")


@pytest.fixture(autouse=True)
def _no_scope_left() -> Iterator[None]:
    yield
    assert_no_live_scopes()
    assert not in_request_scope()


# -- a process forked in a request -------------------------------------------------------


@request_memo(outside_scope="call")
def _user_seen(key: int) -> Any:
    return perrequest.get("user")


def _pool_job(key: int) -> tuple[int, bool, Any, Any]:
    return os.getpid(), in_request_scope(), perrequest.get("user"), _user_seen(key)


@fork_only
def test_a_process_pool_started_in_a_request_does_not_run_later_jobs_in_it() -> None:
    """A fork start method pool starts its processes at the first submit, in the
    submitting thread: each child's main thread inherited that request's store, and ran
    every later job, of every later request, in it (bob's job saw alice's user and her
    memo entries), for the life of the pool."""
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=1, mp_context=fork) as pool:
        with request_scope():
            perrequest.set("user", "alice")
            alices = pool.submit(_pool_job, 1).result(timeout=30)
        with request_scope():
            perrequest.set("user", "bob")
            bobs = pool.submit(_pool_job, 1).result(timeout=30)
        later = pool.submit(_pool_job, 1).result(timeout=30)
    assert alices[0] == bobs[0] == later[0]  # one child ran them all
    assert alices[1:] == bobs[1:] == later[1:] == (False, None, None)

    with request_scope():
        perrequest.set("user", "carol")
        pool2 = fork.Pool(1)
    try:
        assert pool2.apply(_pool_job, (2,))[1:] == (False, None, None)
    finally:
        pool2.close()
        pool2.join()


@fork_only
def test_a_child_forked_in_nested_scopes_leaves_them_quietly() -> None:
    """The child of a plain fork carries on in the request's code: it is outside every
    scope of its parent (each one closed there), leaves the blocks without calling their
    on_close (the parent's scopes report, once), and can open scopes of its own."""
    closed: list[str] = []
    read, write = os.pipe()
    with request_scope(on_close=lambda s: closed.append("outer")):
        perrequest.set("user", "outer")
        with request_scope(on_close=lambda s: closed.append("inner")):
            perrequest.set("user", "inner")
            pid = os.fork()
            if pid == 0:  # the child
                seen = [in_request_scope(), perrequest.get("user"), live_scopes()]
        if pid == 0:
            seen.append(in_request_scope())
    if pid == 0:
        code = 1
        try:
            with request_scope():
                perrequest.set("user", "child")
                own = perrequest.get("user")
            ok = seen == [False, None, 0, False] and own == "child" and not closed
            ok = ok and not in_request_scope() and live_scopes() == 0
            os.write(write, f"{ok} {seen} {own} {closed}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    report = os.read(read, 1000).decode()
    os.close(read)
    assert status == 0 and report.startswith("True"), report
    assert closed == ["inner", "outer"]
