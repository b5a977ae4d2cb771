"""A Celery worker whose every task runs in its own request scope.

Run it: ``python examples/celery_worker.py``. It needs ``celery``
(``pip install 'perrequest[celery]'``) and nothing else: the broker and the
result backend live in memory, and the worker runs in a thread of this
process (a real deployment runs ``celery -A yourapp worker`` against Redis
or RabbitMQ; the tasks and the ``install`` call stay the same).

Each task prices an order, looking up the same few products several times.
The lookup is memoized per task, so it runs once per product per task, two
tasks never share a value, and nothing stays in the worker when a task ends.
"""

from __future__ import annotations

import threading
import time

from celery import Celery
from celery.contrib.testing.worker import start_worker

from perrequest import ScopeStats, current_store, request_memo
from perrequest.celery import install
from perrequest.testing import assert_no_live_scopes, live_scopes

app = Celery("shop", broker="memory://", backend="cache+memory://")
app.conf.broker_transport_options = {"polling_interval": 0.01}

_lock = threading.Lock()
LOOKUPS = 0
CLOSED: list[ScopeStats] = []


def say(line: str) -> None:
    """Print from any thread without interleaving lines (worker threads print too)."""
    with _lock:
        print(line, flush=True)


def report(stats: ScopeStats) -> None:
    """Called once per task, in the worker thread, when its scope closes."""
    CLOSED.append(stats)
    say(
        f"  task scope closed: {stats.misses} lookups, {stats.hits} memo hits, "
        f"{stats.entries} entries freed, {stats.duration_s * 1000:.1f} ms"
    )


install(app, max_entries=1_000, on_close=report)


@request_memo
def load_price(product_id: int) -> int:
    """Stands in for a database query."""
    global LOOKUPS
    with _lock:
        LOOKUPS += 1
    time.sleep(0.002)
    return 100 + product_id


@app.task
def price_order(order_id: int, product_ids: list[int]) -> dict[str, int]:
    total = sum(load_price(product_id) for product_id in product_ids)
    stats = current_store().stats
    return {"order": order_id, "total": total, "lookups": stats.misses, "hits": stats.hits}


def main() -> None:
    orders = {order_id: [order_id % 3, 1, 2, 1, 2, order_id % 3] for order_id in range(6)}
    with start_worker(app, pool="threads", concurrency=3, perform_ping_check=False):
        results = [price_order.delay(order_id, lines) for order_id, lines in orders.items()]
        for result in results:
            outcome = result.get(timeout=30)
            say(
                f"order {outcome['order']}: total {outcome['total']}, "
                f"{outcome['lookups']} lookups, {outcome['hits']} memo hits"
            )
        deadline = time.monotonic() + 5  # a scope closes just after its result is stored
        while len(CLOSED) < len(orders) and time.monotonic() < deadline:
            time.sleep(0.01)
    calls = sum(len(lines) for lines in orders.values())
    print(f"{len(CLOSED)} tasks, {calls} calls, {LOOKUPS} real lookups")
    print(f"open scopes: {live_scopes()}")
    assert len(CLOSED) == len(orders)
    assert_no_live_scopes()


if __name__ == "__main__":
    main()
