"""@request_batch: the loads of one tick share one call, then the store answers.

Run it: `python batch_loaders.py`
"""

import asyncio
from dataclasses import dataclass

from perrequest import request_batch, request_scope

queries: list[list[int]] = []  # what the stub database was asked, per query


@dataclass(frozen=True)
class User:
    id: int
    name: str


# --8<-- [start:loader]
@request_batch
async def load_users(ids: list[int]) -> dict[int, User]:
    """One query for every id asked for in this tick of this request."""
    queries.append(ids)  # SELECT id, name FROM users WHERE id IN (...)
    await asyncio.sleep(0.01)
    return {i: User(i, f"user {i}") for i in ids if i != 404}


async def author_name(author_id: int) -> str:
    user = await load_users.load(author_id)  # no loader passed around
    return user.name


# --8<-- [end:loader]


async def main() -> None:
    # --8<-- [start:use]
    async with request_scope():  # what the middleware does per request
        posts = [3, 1, 3, 2, 1]  # each post's author id
        names = await asyncio.gather(*(author_name(a) for a in posts))
        assert names == ["user 3", "user 1", "user 3", "user 2", "user 1"]
        assert queries == [[3, 1, 2]]  # one query, each id once

        assert await load_users.load(2) == User(2, "user 2")  # stored
        assert await load_users.load_many([1, 4]) == [
            User(1, "user 1"),
            User(4, "user 4"),
        ]
        assert queries[1:] == [[4]]  # only what the store lacked

        # A mapping without a key fails that key alone, with KeyError.
        found = await asyncio.gather(
            load_users.load(404), load_users.load(5), return_exceptions=True
        )
        assert isinstance(found[0], KeyError) and found[1] == User(5, "user 5")
        # Keys, not calls: 6 fetched, 4 served by the store or a batch.
        assert load_users.cache_info() == (4, 6, None, 5)
    # --8<-- [end:use]

    async with request_scope():  # the next request starts empty
        await load_users.load(1)
    assert queries[-1] == [1]


asyncio.run(main())
