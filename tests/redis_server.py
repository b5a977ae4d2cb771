"""A real redis-server (or valkey-server) for the tests: a free 127.0.0.1 port, no
persistence, ``KEYS`` disabled (so that any use of it fails), always stopped.

``make test`` installs the Debian package ``redis-server`` when it is missing and
the machine allows it; without a server binary the Redis tests skip, naming it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from servers import HOST, free_port

BINARY = shutil.which("redis-server") or shutil.which("valkey-server")
MISSING = (
    "no redis-server or valkey-server on PATH: install the Debian package redis-server "
    "(`make test` does, as root) to run the Redis tier's tests"
)


class RedisServer:
    """One server process; ``pause()``/``resume()`` (SIGSTOP/SIGCONT), ``kill()``,
    ``start()`` again on the same port."""

    def __init__(self, *options: str, port: int | None = None) -> None:
        assert BINARY is not None, MISSING
        self.options = options
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="perrequest-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [
            str(BINARY), "--port", str(self.port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--rename-command", "KEYS", "",
            "--logfile", str(self.dir / "server.log"), *self.options,
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        probe = self.client(socket_timeout=0.5)
        deadline = time.monotonic() + 15
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.log()}") from None
                time.sleep(0.02)
            finally:
                probe.close()
        return self

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text() if path.exists() else ""

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, **options)

    def aclient(self, **options: Any) -> Any:
        import redis.asyncio

        return redis.asyncio.Redis(host=HOST, port=self.port, **options)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL, as a crash: the port is closed at once."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc, self.paused = None, False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
