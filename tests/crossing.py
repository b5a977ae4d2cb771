"""Two threads computing each other's keys: the single-flight cycle tests' set-up."""

from __future__ import annotations

import threading
from collections.abc import Callable

import perrequest


class Crossing:
    """Keys "a" and "b", each needing the other's: both computations begin before either
    goes on, and the chain ends after a few steps, as it would in one thread."""

    def __init__(self, steps: int = 4) -> None:
        self.started = {"a": threading.Event(), "b": threading.Event()}
        self.steps = steps
        self.lock = threading.Lock()

    def needs(self, key: str) -> str | None:
        """The other key, if computing ``key`` needs it now; None once the chain ends."""
        other = "b" if key == "a" else "a"
        self.started[key].set()
        self.started[other].wait(2)
        with self.lock:
            self.steps -= 1
            return other if self.steps >= 0 else None

    def run(self, compute: Callable[[str], str]) -> tuple[list[threading.Thread], dict[str, str]]:
        """``compute("a")`` and ``compute("b")`` in two threads sharing the active scope,
        joined for at most 10 s each: the threads, and what they returned."""
        results: dict[str, str] = {}

        def one(key: str) -> None:
            results[key] = compute(key)

        threads = [
            threading.Thread(target=perrequest.bind_scope(one), args=(k,), daemon=True)
            for k in "ab"
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        return threads, results
