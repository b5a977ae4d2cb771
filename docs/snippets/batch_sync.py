"""A sync loader: load_many asks for what the store lacks, load then hits.

Run it: `python batch_sync.py`
"""

from concurrent.futures import ThreadPoolExecutor

from perrequest import bind_scope, request_batch, request_scope

queries: list[list[int]] = []


# --8<-- [start:sync]
@request_batch(max_batch_size=100)  # at most 100 ids per IN (...)
def load_prices(product_ids: list[int]) -> list[int]:
    queries.append(product_ids)  # SELECT price FROM products WHERE ...
    return [10 * p for p in product_ids]


def order_total(lines: list[tuple[int, int]]) -> int:
    prices = load_prices.load_many([p for p, _ in lines])  # one query
    return sum(price * n for price, (_, n) in zip(prices, lines, strict=True))


def line_label(product_id: int) -> str:
    return f"#{product_id}: {load_prices.load(product_id)}"  # stored


# --8<-- [end:sync]


with request_scope():
    lines = [(1, 2), (2, 1), (1, 1)]
    assert order_total(lines) == 50
    assert line_label(1) == "#1: 10"
    assert queries == [[1, 2]]

    # Threads sharing the scope never fetch a key twice at once.
    with ThreadPoolExecutor(4) as pool:
        load_many = bind_scope(load_prices.load_many)
        batches = [[3, 4], [4, 5], [3, 5]]
        assert list(pool.map(load_many, batches))[2] == [30, 50]
    assert sorted(p for query in queries[1:] for p in query) == [3, 4, 5]
