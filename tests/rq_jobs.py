"""Jobs for tests/test_rq.py: imported by name by RQ's worker, as an app's jobs are."""

from __future__ import annotations

import perrequest
from perrequest import request_memo, request_scope

computed: list[int] = []


@request_memo
def load_user(user_id: int) -> dict[str, int]:
    computed.append(user_id)
    return {"id": user_id}


@request_scope()
def send_digest(user_ids: list[int]) -> int:
    """Each run of the job gets a store of its own: a user repeated within a run is
    loaded once, and a second run loads it again."""
    for user_id in user_ids:
        load_user(user_id)
    return len(perrequest.current_store())
