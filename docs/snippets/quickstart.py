"""Quick start: a lookup memoized per request.

Run it: `python quickstart.py`
"""

from perrequest import request_memo, request_scope

queries = []  # a stub database: it counts its queries


def fetch_permissions(user_id: int) -> list[str]:
    queries.append(user_id)
    return ["reports:read", "reports:export"]


@request_memo
def permissions(user_id: int) -> frozenset[str]:
    return frozenset(fetch_permissions(user_id))  # once per request per user


with request_scope():  # what the middleware does around each request
    assert permissions(1) is permissions(1)
    assert "reports:read" in permissions(1)
    assert queries == [1]  # three calls, one query

with request_scope():  # the next request starts empty
    permissions(1)
    assert queries == [1, 1]
