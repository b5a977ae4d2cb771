"""The Django example's order lines: a view and a template tag share one loader.

The view loads the 30 lines' products at once (one query, which primes their
suppliers); the template's tags resolve each line's product and supplier through
the same loaders, from the request's store. One query per request, in the test
client and under gunicorn with threads serving concurrent requests.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import django_project
import httpx
import pytest
from servers import serve_gunicorn

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_project"
sys.path.insert(0, str(EXAMPLE))
django_project.setup()

from django.template import engines  # noqa: E402
from django.test import Client  # noqa: E402
from django_example import catalog  # noqa: E402
from django_example import settings as example_settings  # noqa: E402

from perrequest import request_scope  # noqa: E402
from perrequest.testing import live_scopes  # noqa: E402

pytestmark = pytest.mark.timeout(90)
ROW = re.compile(r"<tr><td>(\d+)</td><td>(.*?)</td><td>(.*?)</td><td>(\d+)</td></tr>")


@pytest.fixture(scope="module", autouse=True)
def _example() -> Iterator[None]:
    with django_project.use_settings(example_settings):
        yield


def _expected_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in catalog.ORDER_LINES:
        product = line["product_id"]
        rows.append(
            (
                str(line["line"]),
                f"Product {product}",
                f"Supplier {1 + product % 4}",
                str(line["quantity"]),
            )
        )
    return rows


def _total() -> int:
    return sum(10 * line["product_id"] * line["quantity"] for line in catalog.ORDER_LINES)


def test_order_lines_run_one_query_per_request() -> None:
    client = Client(headers={"X-User": "alice"})
    for _ in range(2):  # and again on the next request: nothing is kept between requests
        response = client.get("/order-lines/")
        assert response.status_code == 200
        html = response.content.decode()
        assert f"30 order lines, {_total()} in total" in html
        assert ROW.findall(html) == _expected_rows()
        # 30 lines, 12 products, 4 suppliers: one query, where one per object would be 42+
        assert response["X-SQL-Queries"] == "1"
    assert live_scopes() == 0


def test_the_template_tag_alone_fetches_what_nobody_loaded_before() -> None:
    template = engines["django"].from_string(
        "{% load catalog %}{% product 3 as p %}{% supplier p.supplier_id as s %}"
        "{{ p.name }}/{{ s.name }}"
    )
    with request_scope():
        assert template.render({}) == "Product 3/Supplier 4"
        assert catalog.queries_this_request() == 1  # the supplier came primed with it
        assert catalog.load_suppliers.load(1) == catalog.Supplier(1, "Supplier 1")
        assert catalog.queries_this_request() == 2


def test_concurrent_requests_under_gunicorn_threads_each_run_one_query() -> None:
    env = {"DJANGO_SETTINGS_MODULE": "django_example.settings"}
    spec = "django_example.wsgi:application"
    with serve_gunicorn(spec, worker_class="gthread", threads=8, cwd=EXAMPLE, env=env) as url:

        def fetch(_: int) -> httpx.Response:
            return httpx.get(f"{url}/order-lines/", headers={"X-User": "bob"}, timeout=30)

        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(fetch, range(40)))
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.headers["X-SQL-Queries"] == "1"
        assert ROW.findall(response.text) == _expected_rows()
