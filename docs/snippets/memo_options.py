"""The options of @request_memo: async functions, bounds, typed keys, key=.

Run it: `python memo_options.py`
"""

import asyncio
from dataclasses import dataclass

from perrequest import request_memo, request_scope


@dataclass(frozen=True)
class User:
    id: int
    name: str


loads: list[int] = []


@request_memo(max_entries=100, typed=True)
async def load_user(user_id: int) -> User:
    loads.append(user_id)
    await asyncio.sleep(0.01)  # a database round trip
    return User(user_id, f"user {user_id}")


# Dicts are unhashable: key= says how to key them.
@request_memo(key=lambda filters: tuple(sorted(filters.items())))
def search(filters: dict[str, str]) -> list[str]:
    return [f"{name}={value}" for name, value in sorted(filters.items())]


async def main() -> None:
    async with request_scope():
        # Concurrent awaits of one key share one computation.
        users = await asyncio.gather(load_user(1), load_user(1), load_user(2))
        assert [user.name for user in users] == ["user 1", "user 1", "user 2"]
        assert loads == [1, 2]
        assert load_user.cache_info().maxsize == 100

        assert search({"b": "2", "a": "1"}) is search({"a": "1", "b": "2"})


asyncio.run(main())
