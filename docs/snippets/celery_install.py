"""Celery: install() gives every task run of an app its own scope.

Run it: `python celery_install.py` (it runs the task eagerly, with
apply(); a worker runs it the same way).
"""

from celery import Celery
from perrequest import ScopeStats, request_memo
from perrequest.celery import install

lookups: list[str] = []  # a stub price service: it counts its lookups
closed: list[ScopeStats] = []


@request_memo
def unit_price(sku: str) -> int:
    lookups.append(sku)
    return {"apple": 3, "pear": 5}[sku]


def report_stats(stats: ScopeStats) -> None:
    closed.append(stats)


app = Celery("shop")  # with your broker: Celery("shop", broker=...)
# Once, where the app is created:
install(app, max_entries=1_000, on_close=report_stats)


@app.task
def price_order(lines: list[tuple[str, int]]) -> int:  # a fresh scope
    return sum(unit_price(sku) * count for sku, count in lines)


if __name__ == "__main__":
    order = [("apple", 2), ("pear", 1), ("apple", 5)]
    assert price_order.apply(args=(order,)).get() == 26
    assert lookups == ["apple", "pear"]  # apple was looked up once
    price_order.apply(args=(order,)).get()
    assert lookups == ["apple", "pear"] * 2  # each run starts empty
    assert [stats.hits for stats in closed] == [1, 1]
