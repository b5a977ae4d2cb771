"""bind_scope: take the scope to a thread that does not copy the context.

Run it: `python bind_scope.py`
"""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from perrequest import bind_scope, request_memo, request_scope

loads: list[str] = []  # a stub database: it counts its loads
audit: list[str] = []


@request_memo
def load_rows(table: str) -> tuple[str, ...]:
    loads.append(table)
    return (f"{table}:1", f"{table}:2")


def write_audit() -> None:
    audit.append(f"{len(load_rows('orders'))} rows")  # a memo hit


@request_scope()
async def handle() -> None:
    loop = asyncio.get_running_loop()
    rows = await loop.run_in_executor(None, bind_scope(load_rows), "orders")
    assert rows is load_rows("orders")  # the thread filled this store


@request_scope()
def run_job(tables: list[str]) -> None:
    with ThreadPoolExecutor() as helpers:
        futures = [helpers.submit(bind_scope(load_rows), t) for t in tables]
        assert [f.result() for f in futures] == [load_rows(t) for t in tables]
    thread = threading.Thread(target=bind_scope(write_audit))
    thread.start()
    thread.join()


if __name__ == "__main__":
    asyncio.run(handle())
    assert loads == ["orders"]
    run_job(["orders", "users"])
    assert sorted(loads) == ["orders", "orders", "users"]
    assert audit == ["2 rows"]
