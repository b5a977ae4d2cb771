"""FastAPI + uvicorn with the Redis tier: an exchange rate fetched from its (slow)
upstream once a minute across every worker process, and read at most once per request.

``@request_memo(shared=RedisCache(...))`` looks in the request store, then in Redis,
and only then calls the upstream, once across all workers (the others wait for its
value). Redis down or slow never fails a request: the rate is then fetched here.

Run it (from the repository root, with a Redis server on localhost):

    REDIS_URL=redis://127.0.0.1:6379/0 \
        uvicorn examples.redis_tier:app --workers 4 --reset-contextvars

Then:

    curl 'http://127.0.0.1:8000/convert/EUR?amount=20'
    curl http://127.0.0.1:8000/stats
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio
from fastapi import FastAPI

from perrequest import request_memo
from perrequest.asgi import RequestScopeMiddleware
from perrequest.redis import RedisCache

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
UPSTREAM = {"EUR": 0.92, "GBP": 0.79, "JPY": 151.3}  # what the slow API would answer

# --8<-- [start:cache]
rates = RedisCache(
    redis.asyncio.Redis.from_url(REDIS_URL),
    ttl=60,  # required: an entry lives a minute, then is fetched again, once
    namespace="example",  # this application's keys
)


@request_memo(shared=rates)
async def exchange_rate(currency: str) -> dict[str, Any]:
    """The slow upstream call (200 ms). Values go through JSON."""
    await asyncio.sleep(0.2)
    return {
        "currency": currency,
        "rate": UPSTREAM.get(currency, 1.0),
        "fetched_by": os.getpid(),
        "fetched_at": time.time(),
    }


# --8<-- [end:cache]


async def fee(currency: str, amount: float) -> float:
    """A helper deep in the code asks for the rate again: a request-store hit."""
    rate = await exchange_rate(currency)
    return round(amount * rate["rate"] * 0.01, 2)


# --8<-- [start:app]
@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await rates.aclose()  # the cache's connections in this event loop


app = FastAPI(title="perrequest Redis tier example", lifespan=lifespan)
app.add_middleware(RequestScopeMiddleware)
# --8<-- [end:app]


@app.get("/convert/{currency}")
async def convert(currency: str, amount: float = 1.0) -> dict[str, Any]:
    rate = await exchange_rate(currency)
    return {
        "amount": round(amount * rate["rate"], 2),
        "fee": await fee(currency, amount),
        "rate": rate,
        "served_by": os.getpid(),
    }


@app.get("/stats")
async def stats() -> dict[str, Any]:
    """This worker's Redis tier counters (hits, misses, errors, lock waits, ...)."""
    return {"worker": os.getpid(), **rates.stats()._asdict()}


if __name__ == "__main__":
    import uvicorn

    # reset_contextvars: each request starts in an empty context (docs/security.md).
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(app, host="127.0.0.1", port=port, reset_contextvars=True)
