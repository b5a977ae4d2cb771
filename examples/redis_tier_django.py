"""Django + gunicorn with the Redis tier, in one file: a shipping quote computed once
every five minutes across every gunicorn worker, and at most once per request.

In a real project, the ``settings.configure(...)`` lines are your settings module
(``"perrequest.django.RequestScopeMiddleware"`` in ``MIDDLEWARE``), and the cache and
the memoized function live in any module of yours.

Run it (from the repository root, with a Redis server on localhost):

    REDIS_URL=redis://127.0.0.1:6379/0 \\
        gunicorn examples.redis_tier_django:application --workers 4

Then:

    curl http://127.0.0.1:8000/quote/FR
    curl http://127.0.0.1:8000/stats
"""

from __future__ import annotations

import os
import time
from typing import Any

import django
import redis
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret"),
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402 - after settings
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

from perrequest import request_memo  # noqa: E402
from perrequest.redis import RedisCache  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


# --8<-- [start:cache]
quotes = RedisCache(
    redis.Redis.from_url(REDIS_URL),
    ttl=300,  # required: every entry expires
    namespace="example-django",
)


@request_memo(shared=quotes, version=2)  # bump it when the values change shape
def shipping_quote(country: str) -> dict[str, Any]:
    """The slow carrier API (200 ms)."""
    time.sleep(0.2)
    return {
        "country": country,
        "cents": 500 + 10 * len(country),
        "quoted_by": os.getpid(),
        "quoted_at": time.time(),
    }


def quote(request: HttpRequest, country: str) -> JsonResponse:
    first = shipping_quote(country)
    again = shipping_quote(country)  # a request-store hit: no Redis call
    body = {"quote": first, "same": again == first, "served_by": os.getpid()}
    return JsonResponse(body)


# --8<-- [end:cache]


def stats(request: HttpRequest) -> JsonResponse:
    """This worker's Redis tier counters (hits, misses, errors, lock waits, ...)."""
    return JsonResponse({"worker": os.getpid(), **quotes.stats()._asdict()})


urlpatterns = [path("quote/<str:country>", quote), path("stats", stats)]
application = get_wsgi_application()
