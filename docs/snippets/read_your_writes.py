"""Read your own writes: update, cache_delete, read.

Run it: `python read_your_writes.py`
"""

import perrequest
from perrequest import request_memo, request_scope

accounts = {1: "Ada"}  # a stub database


@request_memo
def account_name(account_id: int) -> str:
    return accounts[account_id]


def rename(account_id: int, name: str) -> None:
    accounts[account_id] = name  # the update
    account_name.cache_delete(account_id)  # drop the entry it made stale


with request_scope():
    assert account_name(1) == "Ada"
    rename(1, "Ada Lovelace")
    assert account_name(1) == "Ada Lovelace"  # read after write: fresh
    assert not account_name.cache_delete(2)  # False: no such entry

    # The same for helper entries: perrequest.delete(key).
    perrequest.set("cart", ["apple"])
    assert perrequest.delete("cart")
    assert perrequest.get("cart") is None
