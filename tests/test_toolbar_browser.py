"""The toolbar panel in a real browser: Django's runserver, headless Chromium.

Set ``PERREQUEST_SCREENSHOT=docs/img/toolbar-panel.png`` to refresh the
screenshot in the docs from this run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
from browser import chromium
from servers import HOST, ROOT, free_port, serve_subprocess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# The toolbar renders into a shadow root; its panels load their content on a click.
TOOLBAR = "(document.getElementById('djDebugRoot').shadowRoot || document)"
BUTTON = f"{TOOLBAR}.querySelector('#djdt-PerRequestPanel a')"
CONTENT = f"{TOOLBAR}.querySelector('#PerRequestPanel .djdt-scroll')"


def test_the_panel_in_headless_chromium(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "django", "runserver", "--noreload", f"{HOST}:{port}"]
    env = {"DJANGO_SETTINGS_MODULE": "django_project.toolbar_settings"}
    with serve_subprocess(argv, port, cwd=ROOT / "tests", env=env) as url, chromium() as page:
        assert httpx.get(url + "/threaded/").status_code == 200  # a call outside any scope
        page.open(url + "/catalog/")
        label = page.wait_for(f"{BUTTON} && {BUTTON}.innerText")
        assert label and "perrequest" in label and "12 hits, 6 misses" in label, label
        page.evaluate(f"{BUTTON}.click()")
        text = page.wait_for(
            f"{CONTENT} && {CONTENT}.innerText.includes('product') && {CONTENT}.innerText"
        )
        assert text, page.evaluate(f"{TOOLBAR}.innerHTML.slice(0, 2000)")
        for expected in (
            "django_project.toolbar_views.product",
            "django_project.toolbar_views.price",
            "6 / 20 (30%)",
            "toolbar_views.exchange_rate",
            "was called outside any request scope earlier in this process",
        ):
            assert expected in text, (expected, text)
        # The warning row is styled by the toolbar's own script (no inline styles: CSP).
        warning = f"{CONTENT}.querySelector('.djdt-perrequest-warning td:last-child')"
        color = page.evaluate(f"getComputedStyle({warning}).color")
        assert color == "rgb(185, 74, 72)"
        png = page.screenshot()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    (tmp_path / "toolbar-panel.png").write_bytes(png)
    target = os.environ.get("PERREQUEST_SCREENSHOT")
    if target:
        Path(target).write_bytes(png)
