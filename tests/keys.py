"""Keys that misbehave as real ones do, shared by the guard tests."""

from __future__ import annotations


class Model:
    """Django's model hash: by pk, a TypeError while pk is None."""

    def __init__(self, pk: int | None) -> None:
        self.pk = pk

    def __hash__(self) -> int:
        if self.pk is None:
            raise TypeError("Model instances without primary key value are unhashable")
        return hash(self.pk)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Model):
            return NotImplemented
        return self is other if self.pk is None else self.pk == other.pk


class Seven:
    """A key hashing as every other key here does: 7."""

    def __hash__(self) -> int:
        return 7


class Odd(Seven):
    """A key of hash 7 whose comparison raises: met by any lookup of a colliding key."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparing")

    __hash__ = Seven.__hash__
