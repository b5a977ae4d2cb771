"""Coming from a module-level dict used as a memo: the slow leak.

Run it: `python coming_from_module_dict.py`
"""

from perrequest import request_memo, request_scope
from perrequest.testing import live_scopes


def fetch_permissions(user_id: int) -> frozenset[str]:  # a stub database
    return frozenset({"reports:read"})


# --8<-- [start:before]
_seen = {}


def permissions(user_id):
    if user_id not in _seen:  # keyed by near-unique ids...
        _seen[user_id] = fetch_permissions(user_id)
    return _seen[user_id]  # ...nothing ever comes out


# --8<-- [end:before]


# --8<-- [start:after]
@request_memo
def permissions_for(user_id: int) -> frozenset[str]:
    return fetch_permissions(user_id)


# --8<-- [end:after]

# --8<-- [start:run]
if __name__ == "__main__":
    for user_id in range(10_000):  # 10,000 requests, each a new user
        with request_scope():  # what the middleware does
            assert permissions(user_id) is permissions(user_id)
            assert permissions_for(user_id) is permissions_for(user_id)
    assert len(_seen) == 10_000  # the leak: one entry per request, forever
    assert live_scopes() == 0  # every request's store is gone
# --8<-- [end:run]
