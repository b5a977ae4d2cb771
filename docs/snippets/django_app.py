"""Django in one file: the middleware, a memoized lookup, a view.

Run it: `python django_app.py` (it serves three requests through
Django's test client). In a project, the settings go in settings.py,
the rest in your apps' modules.
"""

import functools
from collections.abc import Callable

import django
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from perrequest import request_memo

settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["testserver"],
    MIDDLEWARE=[
        # First: everything below it shares the store.
        "perrequest.django.RequestScopeMiddleware",
        "django.middleware.common.CommonMiddleware",
    ],
    PERREQUEST={"MAX_ENTRIES": 1_000},  # optional
)
django.setup()

# A stub database that counts its queries (in a project: the ORM).
PERMISSIONS = {"alice": {"reports:read"}, "bob": set()}
queries: list[str] = []


def fetch_permissions(user: str) -> set[str]:
    queries.append(user)
    return PERMISSIONS.get(user, set())


@request_memo
def user_permissions(user: str) -> frozenset[str]:
    return frozenset(fetch_permissions(user))


View = Callable[..., HttpResponse]


def require(permission: str) -> Callable[[View], View]:
    """A view decorator that checks a permission: the first lookup."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def checked(request: HttpRequest, **kwargs: object) -> HttpResponse:
            user = request.headers["X-User"]
            if permission not in user_permissions(user):
                raise PermissionDenied
            return view(request, **kwargs)

        return checked

    return decorate


@require("reports:read")
def report(request: HttpRequest, report_id: int) -> HttpResponse:
    permissions = user_permissions(request.headers["X-User"])  # memo hit
    can_edit = "reports:write" in permissions
    return JsonResponse({"report": report_id, "can_edit": can_edit})


urlpatterns = [path("reports/<int:report_id>", report)]

if __name__ == "__main__":
    from django.test import Client

    client = Client(headers={"X-User": "alice"})
    response = client.get("/reports/7")
    assert response.json() == {"report": 7, "can_edit": False}
    assert queries == ["alice"]  # two lookups, one query
    client.get("/reports/7")
    assert queries == ["alice", "alice"]  # the next request asks again
    bob = Client(headers={"X-User": "bob"})
    assert bob.get("/reports/7").status_code == 403
