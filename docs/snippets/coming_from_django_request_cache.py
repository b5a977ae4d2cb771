"""Coming from django-request-cache: keys by identity, not by str().

Run it: `python coming_from_django_request_cache.py`
"""

import django
import perrequest
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.urls import path
from perrequest import request_memo

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["testserver"],
    MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],  # first
)
django.setup()


class Org:  # like a model instance: str() is its name, not its identity
    def __init__(self, pk: int, name: str) -> None:
        self.pk, self.name = pk, name

    def __repr__(self) -> str:
        return f"<Org: {self.name}>"


queries: list[int] = []


@request_memo  # was @cache_for_request
def members(org: Org) -> tuple[str, ...]:
    queries.append(org.pk)
    return ("ann",) if org.pk == 1 else ("bob",)


def report(request: HttpRequest) -> JsonResponse:
    perrequest.set("tenant", request.headers["X-Tenant"])  # was .set(...)
    ours, theirs = Org(1, "Acme"), Org(2, "Acme")  # equal reprs
    return JsonResponse(
        {
            "ours": members(ours) + members(ours),  # one query
            "theirs": members(theirs),  # its own entry
            "tenant": perrequest.get("tenant"),  # was .get(...)
        }
    )


urlpatterns = [path("report", report)]

if __name__ == "__main__":
    from django.test import Client

    response = Client().get("/report", headers={"X-Tenant": "acme"})
    assert response.json() == {
        "ours": ["ann", "ann"],
        "theirs": ["bob"],  # str()-built keys would have served "ann"
        "tenant": "acme",
    }
    assert queries == [1, 2]
