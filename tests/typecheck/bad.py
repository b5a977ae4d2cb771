"""Mistakes a type checker must report, one per line marked with the checker's code."""

from __future__ import annotations

from perrequest import request_memo


@request_memo
def price(item: str, quantity: int = 1) -> float:
    return 1.5 * quantity


price(1)  # the argument's type
price("apple", quantity="two")  # a keyword argument's type
price.cache_delete("apple", 2, 3)  # too many arguments, as the function has
name: str = price("apple")  # the result's type
price.cache_information()  # no such attribute
