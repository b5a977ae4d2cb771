"""A scope listener: each closing scope's stats, per memoized function.

Run it: `python scope_listener.py`
"""

import contextlib
import io
import time

import perrequest


def report(stats: perrequest.ScopeStats) -> None:
    for name, fn in stats.functions.items():
        print(name, fn.hits, fn.misses, fn.compute_s)


perrequest.add_scope_listener(report)


@perrequest.request_memo
def load_user(user_id: int) -> str:
    time.sleep(0.01)  # a stub database query
    return f"user {user_id}"


if __name__ == "__main__":
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), perrequest.request_scope():
        load_user(7)
        load_user(7)  # a memo hit
    name, hits, misses, compute_s = printed.getvalue().split()
    assert (name, hits, misses) == ("__main__.load_user", "1", "1")
    assert float(compute_s) >= 0.01  # timed, since a listener is installed
    perrequest.remove_scope_listener(report)
    with contextlib.redirect_stdout(printed), perrequest.request_scope():
        load_user(7)
    assert len(printed.getvalue().splitlines()) == 1  # no longer called
