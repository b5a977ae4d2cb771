"""What three shapes of a sync hit's dict lookup cost, by the key's kind (ns per lookup).

Why the generated sync wrapper looks its key up with a subscript in a ``try`` (a miss
raises ``KeyError``) and not with ``key in d`` first (a miss raises nothing, but a hit
hashes and compares the key twice) nor ``d.get(key)`` (a method call every hit):
docs/performance.md, "Not taken (7 December, measured)". The lookup alone, each shape in
a function of its own, best of ``--rounds`` ``timeit`` repeats.

Usage: ``.venv/bin/python benchmarks/lookup_shapes.py [--quick] [--json PATH]``
"""

from __future__ import annotations

import dataclasses
import timeit
from collections.abc import Callable
from typing import Any

import _common as common


class Model:
    """A model instance as a key: ``__hash__`` and ``__eq__`` in Python (Django's are)."""

    def __init__(self, pk: int) -> None:
        self.pk = pk

    def __hash__(self) -> int:
        return hash(self.pk)

    def __eq__(self, other: object) -> bool:
        return type(other) is Model and other.pk == self.pk


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: int
    b: str


def shapes(d: dict[Any, Any], key: Any) -> dict[str, Callable[[], Any]]:
    def subscript() -> Any:
        try:
            entry = d[key]
        except KeyError:
            return None
        return entry[0]

    def contains() -> Any:
        if key in d:
            return d[key][0]
        return None

    def get() -> Any:
        entry = d.get(key)
        if entry is not None:
            return entry[0]
        return None

    return {"subscript": subscript, "in, then subscript": contains, "get": get}


def main() -> None:
    parser = common.arguments(__doc__)
    options = parser.parse_args()
    rounds = 3 if options.quick else options.rounds or 9
    number = 100_000 if options.quick else 300_000
    cases = {  # the key stored, and the key looked up
        "int": (5, 5),
        "str": ("user:5", "user:5"),
        "model, the same object": (m := Model(5), m),
        "model, an equal one": (Model(5), Model(5)),
        "frozen dataclass, an equal one": (Frozen(1, "x"), Frozen(1, "x")),
    }
    results: dict[str, dict[str, float]] = {}
    for case, (stored, looked_up) in cases.items():
        d: dict[Any, Any] = {i: (i,) for i in range(100, 200)}
        d[stored] = (1,)
        row = results[case] = {}
        for name, fn in shapes(d, looked_up).items():
            best = min(timeit.repeat(fn, number=number, repeat=rounds))
            row[name] = round(best / number * 1e9, 1)
        print(f"{case:32}", "  ".join(f"{name} {ns:6.1f}" for name, ns in row.items()))
    common.write_json({"meta": common.meta(), "ns": results}, options.json)


if __name__ == "__main__":
    main()
