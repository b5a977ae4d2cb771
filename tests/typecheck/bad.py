"""Mistakes a type checker must report, one per line marked with the checker's code."""

from __future__ import annotations

from perrequest import request_batch, request_memo, request_scope


@request_memo
def price(item: str, quantity: int = 1) -> float:
    return 1.5 * quantity


price(1)  # the argument's type
price("apple", quantity="two")  # a keyword argument's type
price.cache_delete("apple", 2, 3)  # too many arguments, as the function has
name: str = price("apple")  # the result's type
price.cache_information()  # no such attribute


@request_batch
async def load_names(ids: list[int]) -> list[str]:
    return [str(i) for i in ids]


load_names.load("1")  # the key's type
label: int = load_names.load_many([1])  # an awaitable of the values, not a value


class Repository:
    @request_memo
    def row(self, row_id: int) -> dict[str, int]:
        return {"id": row_id}


Repository().row.cache_delete(7)  # the extras are the function's: the instance comes first
request_scope(5)  # options are keywords
request_scope(max_entires=5)  # no such option


def middlewares() -> None:
    from starlette.applications import Starlette

    from perrequest.asgi import RequestScopeMiddleware
    from perrequest.flask import PerRequest

    Starlette().add_middleware(RequestScopeMiddleware, max_entires=5)  # no such option
    PerRequest(max_entires=5)  # no such option
