"""perrequest's Django Debug Toolbar panel, through the toolbar's own machinery.

Requests go through Django's test clients with ``DebugToolbarMiddleware``; the
toolbar each request creates is caught with ``DebugToolbar._created``, the
signal the toolbar provides for tests, and the panel's content is fetched from
the toolbar's ``render_panel`` view, as the toolbar's JavaScript does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import django_project
import pytest

django_project.setup()

from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django_project import _FIXED as FIXED  # noqa: E402
from django_project import toolbar_settings  # noqa: E402

from perrequest import _stats, memo, request_memo, request_scope  # noqa: E402
from perrequest.django import toolbar  # noqa: E402

if TYPE_CHECKING:  # imported once the toolbar's app is installed, by the fixture
    from debug_toolbar.toolbar import DebugToolbar

TOOLBAR_MW = "debug_toolbar.middleware.DebugToolbarMiddleware"
SCOPE_MW = "perrequest.django.RequestScopeMiddleware"
VIEWS = "django_project.toolbar_views"


@pytest.fixture(scope="module", autouse=True)
def _toolbar_project() -> Iterator[None]:
    # In three steps: the apps' ready() reads the plain settings, and a change of the
    # toolbar's settings imports its models, which need its app installed.
    # Not DATABASES either (as django_project.use_settings): the project's, and overriding
    # it makes Django warn.
    names = [n for n in dir(toolbar_settings) if n.isupper() and n not in FIXED]
    plain = [n for n in names if not n.startswith("DEBUG_TOOLBAR")]
    with (
        override_settings(**{n: getattr(toolbar_settings, n) for n in plain}),
        override_settings(INSTALLED_APPS=toolbar_settings.INSTALLED_APPS),
        override_settings(
            DEBUG_TOOLBAR_PANELS=toolbar_settings.DEBUG_TOOLBAR_PANELS,
            DEBUG_TOOLBAR_CONFIG=toolbar_settings.DEBUG_TOOLBAR_CONFIG,
        ),
    ):
        yield
    toolbar.remove_listener()  # the panel's timing listener: other tests expect none


@pytest.fixture
def toolbars() -> Iterator[list[DebugToolbar]]:
    """Every toolbar created while the test runs."""
    from debug_toolbar.toolbar import DebugToolbar

    created: list[DebugToolbar] = []

    def receive(sender: Any, toolbar: DebugToolbar, **kwargs: Any) -> None:
        created.append(toolbar)

    DebugToolbar._created.connect(receive)
    yield created
    DebugToolbar._created.disconnect(receive)


def panel_stats(toolbar: DebugToolbar) -> dict[str, Any]:
    stats: dict[str, Any] = toolbar.get_panel_by_id("PerRequestPanel").get_stats()
    return stats


def rendered(client: Client, toolbar: DebugToolbar) -> str:
    """The panel's HTML as the browser gets it: from the toolbar's store, as JSON."""
    response = client.get(
        "/__debug__/render_panel/",
        {"request_id": toolbar.request_id, "panel_id": "PerRequestPanel"},
    )
    assert response.status_code == 200, response.content
    content: str = json.loads(response.content)["content"]
    return content


def functions(stats: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    return {
        row["name"].rsplit(".", 1)[1]: (row["hits"], row["misses"], row["entries"])
        for row in stats["functions"]
    }


def test_panel_shows_each_function_the_store_and_time_saved(toolbars: list[DebugToolbar]) -> None:
    client = Client()
    response = client.get("/catalog/")
    html = response.content.decode()
    assert response.status_code == 200 and 'id="djdt-PerRequestPanel"' in html
    assert "12 hits, 6 misses" in html  # the side bar's subtitle
    [bar] = toolbars
    stats = panel_stats(bar)
    assert functions(stats) == {"product": (6, 3, 3), "price": (6, 3, 3)}
    assert (stats["entries"], stats["peak_entries"], stats["max_entries"]) == (6, 6, 20)
    assert stats["fill_pct"] == 30 and not stats["near_bound"] and stats["open"]
    product = next(row for row in stats["functions"] if row["name"].endswith("product"))
    # 6 hits x the mean of three 3 ms misses: the panel's listener turned timing on.
    assert product["saved_ms"] >= 6 * 3 and product["compute_ms"] >= 3 * 3
    assert stats["functions"][0] is product  # the most time saved first
    content = rendered(client, bar)
    for text in (f"{VIEWS}.product", f"{VIEWS}.price", "6 / 20 (30%)", "Time saved"):
        assert text in content, text
    assert "reached its bound" not in content and "% of its bound" not in content
    assert not [row for row in stats["outside"] if row["now"]]  # none during this request


def test_a_store_past_its_bound_gets_a_warning_row(toolbars: list[DebugToolbar]) -> None:
    client = Client()
    client.get("/crowded/")
    stats = panel_stats(toolbars[0])
    assert stats["near_bound"] and stats["evictions"] == 5 and stats["fill_pct"] == 100
    content = rendered(client, toolbars[0])
    assert "djdt-perrequest-warning" in content and "evicted 5 entries" in content


def test_a_call_outside_any_scope_gets_a_warning_row(toolbars: list[DebugToolbar]) -> None:
    client = Client()
    client.get("/threaded/")
    # Other tests of this process may have called functions outside a scope too.
    rows = panel_stats(toolbars[0])["outside"]
    assert {"name": f"{VIEWS}.exchange_rate", "now": True} in rows
    assert [row for row in rows if row["now"]] == rows[:1]  # this request's first
    assert "was called outside any request scope during this request" in rendered(
        client, toolbars[0]
    )
    client.get("/catalog/")  # later requests still show it: the function is still uncached
    assert {"name": f"{VIEWS}.exchange_rate", "now": False} in panel_stats(toolbars[-1])["outside"]
    assert "earlier in this process" in rendered(client, toolbars[-1])


def test_with_the_toolbar_outside_the_scope_the_store_is_still_open(
    toolbars: list[DebugToolbar],
) -> None:
    """The scope ends as Django closes the response, after every middleware returned."""
    client = Client()
    with override_settings(MIDDLEWARE=[TOOLBAR_MW, SCOPE_MW]):
        client.get("/catalog/")
    stats = panel_stats(toolbars[0])
    assert stats["open"]
    assert functions(stats) == {"product": (6, 3, 3), "price": (6, 3, 3)}
    assert stats["entries"] == 6


def test_without_the_middleware_the_panel_says_so(toolbars: list[DebugToolbar]) -> None:
    client = Client()
    with override_settings(MIDDLEWARE=[TOOLBAR_MW]):
        html = client.get("/catalog/").content.decode()
    assert "no request scope" in html
    assert not panel_stats(toolbars[0])["scope"]
    assert "No perrequest scope was open for this request" in rendered(client, toolbars[0])


async def test_under_asgi_the_panel_is_enabled_and_reads_the_store(
    toolbars: list[DebugToolbar],
) -> None:
    response = await AsyncClient().get("/catalog/")
    assert 'id="djdt-PerRequestPanel"' in response.content.decode()
    assert functions(panel_stats(toolbars[0])) == {"product": (6, 3, 3), "price": (6, 3, 3)}


def test_the_panel_turns_compute_timing_on_and_can_be_turned_off() -> None:
    Client().get("/catalog/")
    assert toolbar._observe in _stats.listeners
    toolbar.remove_listener()
    assert toolbar._observe not in _stats.listeners


def test_the_calls_outside_a_scope_of_this_request_come_first() -> None:
    """Listed by name, the names warned about during the request first: the warning rows
    of the request shown above those of earlier requests."""

    @request_memo
    def aa_earlier(x: int) -> int:
        return x

    @request_memo
    def zz_now(x: int) -> int:
        return x

    aa_earlier(1)  # outside any scope: warned once, before the request
    before = frozenset(memo.warned_outside)
    zz_now(1)  # during it
    rows = toolbar._collect(None, before)["outside"]
    names = [row["name"].rsplit(".", 1)[1] for row in rows]
    assert names.index("zz_now") < names.index("aa_earlier")
    assert [row for row in rows if row["now"]] == rows[:1]


def test_the_functions_that_saved_most_come_first() -> None:
    @request_memo
    def called_first(x: int) -> int:
        return x

    @request_memo
    def hit_most(x: int) -> int:
        return x

    with request_scope() as store:
        called_first(1)
        for _ in range(4):
            hit_most(1)
        rows = toolbar._collect(store, frozenset())["functions"]
    assert [(row["name"].rsplit(".", 1)[1], row["hits"]) for row in rows] == [
        ("hit_most", 3),
        ("called_first", 0),
    ]
