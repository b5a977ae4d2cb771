"""The helpers: plain keys in the active store, and bind_scope for threads.

Run it: `python helpers.py`
"""

from concurrent.futures import ThreadPoolExecutor

import perrequest


def load_flags() -> dict[str, bool]:
    return {"new_checkout": True}


def work() -> str:
    return perrequest.get("tenant")  # runs in a pool thread, same store


with perrequest.request_scope(), ThreadPoolExecutor() as pool:
    perrequest.set("tenant", "acme")  # NoActiveScope outside a scope
    assert perrequest.get("tenant") == "acme"  # default outside a scope
    flags = perrequest.get_or_set("flags", load_flags)  # once per request
    assert perrequest.get_or_set("flags", load_flags) is flags
    assert perrequest.delete("flags")  # True: it was there
    assert perrequest.current_store().stats.hits == 1  # the MemoStore
    assert perrequest.in_request_scope()
    # Carry the scope into a thread:
    assert pool.submit(perrequest.bind_scope(work)).result() == "acme"

assert not perrequest.in_request_scope()
assert perrequest.get("tenant") is None
