"""An asyncio consumer: one scope per job, many jobs on one loop.

Run it: `python asyncio_consumer.py`
"""

import asyncio

from perrequest import request_memo, request_scope

fetched: list[int] = []  # a stub user service: it counts its fetches


@request_memo
async def fetch_user(user_id: int) -> str:
    fetched.append(user_id)
    await asyncio.sleep(0.01)  # a network round trip
    return f"user {user_id}"


@request_scope(max_entries=1_000)
async def handle(job: list[int]) -> list[str]:
    return await asyncio.gather(*(fetch_user(u) for u in job))


async def consumer(queue: asyncio.Queue[list[int] | None]) -> None:
    while (job := await queue.get()) is not None:
        await handle(job)


async def main() -> None:
    queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
    for job in ([1, 2, 1, 1], [2, 3, 2], None):
        queue.put_nowait(job)
    await consumer(queue)
    assert fetched == [1, 2, 2, 3]  # once per user per job


if __name__ == "__main__":
    asyncio.run(main())
