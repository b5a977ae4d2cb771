"""Prometheus metrics from Django, served by a view of its own.

Run it: `python prometheus_django.py`: a one-file Django project whose
urls.py is this module. It serves two requests through Django's test
client, then scrapes /metrics.
"""

# --8<-- [start:urls]
# urls.py
import perrequest.prometheus
from django.http import HttpRequest, HttpResponse
from django.urls import path
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

perrequest.prometheus.instrument()


def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)


urlpatterns = [path("metrics", metrics)]
# --8<-- [end:urls]

if __name__ == "__main__":
    import django
    from django.conf import settings
    from django.http import JsonResponse
    from django.test import Client
    from perrequest import request_memo

    @request_memo
    def load_user(user_id: int) -> str:
        return f"user {user_id}"  # a stub database query

    def show_user(request: HttpRequest, user_id: int) -> JsonResponse:
        load_user(user_id)
        return JsonResponse({"name": load_user(user_id)})  # a memo hit

    urlpatterns.append(path("users/<int:user_id>", show_user))
    settings.configure(
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["testserver"],
        MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],
    )
    django.setup()

    client = Client()
    client.get("/users/7")
    client.get("/users/8")
    scraped = client.get("/metrics").content.decode()
    function = 'function="__main__.load_user"'
    assert f"perrequest_memo_hits_total{{{function}}} 2.0" in scraped
    assert f"perrequest_memo_misses_total{{{function}}} 2.0" in scraped
    assert "perrequest_scope_entries_count 2.0" in scraped  # per request
