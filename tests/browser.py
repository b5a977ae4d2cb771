"""A headless Chromium (Debian's ``chromium``) driven over the DevTools protocol.

Just what the tests need: open a page, run JavaScript in it, take a
screenshot. Bound to 127.0.0.1, with a fresh profile, and stopped after use.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from servers import HOST, free_port
from websockets.sync.client import ClientConnection, connect

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,860",
)


def executable() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError(
            "the browser tests need Chromium: `apt-get install -y chromium` (make test does)"
        )
    return found


class Page:
    """One browser tab."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    def call(self, method: str, timeout: float = 20.0, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events meanwhile are dropped."""
        ident = next(self._ids)
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._socket.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def open(self, url: str, timeout: float = 20.0) -> None:
        """Navigate and wait for the load event."""
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._socket.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("method") == "Page.loadEventFired":
                return

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate ``expression`` until it gives something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])


@contextmanager
def chromium() -> Iterator[Page]:
    """A headless Chromium with one blank tab; stopped, and its profile removed, after."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="perrequest-chromium-") as profile:
        argv = [
            executable(),
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--remote-debugging-address={HOST}",
            f"--remote-debugging-port={port}",
            "about:blank",
        ]
        scratch = os.path.join(profile, "tmp")  # its own scratch (org.chromium.*) goes too
        os.mkdir(scratch)
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "TMPDIR": scratch},
        )
        try:
            url = _page_socket(f"http://{HOST}:{port}", proc)
            with connect(url, max_size=None, open_timeout=10) as socket:
                yield Page(socket)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop Chromium and every helper process it started: they write to the profile
    until they exit, and removing it under them fails ("Directory not empty")."""
    group = proc.pid  # start_new_session: its own process group
    _signal_group(group, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        _signal_group(group, signal.SIGKILL)
        proc.wait(5)
    deadline = time.monotonic() + 10
    while _signal_group(group, 0) and time.monotonic() < deadline:  # helpers still alive
        time.sleep(0.05)
    _signal_group(group, signal.SIGKILL)


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to the process group; whether any process of it was there."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True


def _page_socket(base: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        try:
            targets = httpx.get(f"{base}/json/list", timeout=1).json()
        except httpx.HTTPError:
            time.sleep(0.1)
            continue
        for target in targets:
            if target.get("type") == "page":
                return str(target["webSocketDebuggerUrl"])
        time.sleep(0.1)
    raise TimeoutError(f"chromium's DevTools did not answer at {base} within {timeout} s")
