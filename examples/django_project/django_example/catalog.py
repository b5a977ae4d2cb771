"""Order lines and the products they refer to, through one loader per kind.

The view asks ``load_products`` for every product on the page at once (one
query, which also brings each product's supplier and primes ``load_suppliers``);
the template tags in ``catalog_tags`` then resolve each line's product and
supplier through the same loaders, from the request's store, with no query.
Without the loaders the page would run one query per line and per supplier.
"""

from __future__ import annotations

import atexit
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import perrequest
from perrequest import request_batch

_DIR = tempfile.TemporaryDirectory(prefix="perrequest-django-catalog-")
atexit.register(_DIR.cleanup)
DB = Path(_DIR.name) / "catalog.sqlite3"
_QUERIES = "catalog.sql_queries"  # this request's count, in its store


class Supplier(NamedTuple):
    id: int
    name: str


class Product(NamedTuple):
    id: int
    name: str
    price: int
    supplier_id: int


# 30 order lines of 12 products from 4 suppliers.
ORDER_LINES = [{"line": n, "product_id": 1 + n * 5 % 12, "quantity": 1 + n % 3} for n in range(30)]

with closing(sqlite3.connect(DB)) as _conn, _conn:
    _conn.executescript(
        """
        CREATE TABLE suppliers (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
        CREATE TABLE products (
            id INTEGER PRIMARY KEY, name TEXT NOT NULL, price INTEGER NOT NULL,
            supplier_id INTEGER NOT NULL REFERENCES suppliers (id)
        );
        """
    )
    _conn.executemany(
        "INSERT INTO suppliers VALUES (?, ?)",
        [(s, f"Supplier {s}") for s in range(1, 5)],
    )
    _conn.executemany(
        "INSERT INTO products VALUES (?, ?, ?, ?)",
        [(p, f"Product {p}", 10 * p, 1 + p % 4) for p in range(1, 13)],
    )


def query(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """Run one query, counted against the current request."""
    with closing(sqlite3.connect(DB)) as conn:
        rows = conn.execute(sql, params).fetchall()
    perrequest.set(_QUERIES, perrequest.get(_QUERIES, 0) + 1)
    return rows


def queries_this_request() -> int:
    return int(perrequest.get(_QUERIES, 0))


# --8<-- [start:loaders]
@request_batch
def load_products(ids: list[int]) -> dict[int, Product]:
    """Products by id; their suppliers come in the same query (primed)."""
    marks = ", ".join("?" * len(ids))
    rows = query(
        "SELECT p.id, p.name, p.price, s.id, s.name FROM products p "
        f"JOIN suppliers s ON s.id = p.supplier_id WHERE p.id IN ({marks})",
        ids,
    )
    for _, _, _, supplier_id, supplier_name in rows:
        load_suppliers.prime(supplier_id, Supplier(supplier_id, supplier_name))
    return {row[0]: Product(row[0], row[1], row[2], row[3]) for row in rows}


@request_batch
def load_suppliers(ids: list[int]) -> dict[int, Supplier]:
    """Suppliers by id: for those no product query brought along."""
    marks = ", ".join("?" * len(ids))
    rows = query(f"SELECT id, name FROM suppliers WHERE id IN ({marks})", ids)
    return {id_: Supplier(id_, name) for id_, name in rows}


# --8<-- [end:loaders]
