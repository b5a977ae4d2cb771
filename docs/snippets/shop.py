"""OpenTelemetry in Django: instrument() in the app's AppConfig.ready().

Run it: `python shop.py`: a one-file Django project whose app, "shop", is
this module (in a project, ShopConfig goes in shop/apps.py). It serves two
requests through Django's test client and reads the metrics from
OpenTelemetry's in-memory reader.
"""

# --8<-- [start:config]
from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"

    def ready(self) -> None:
        import perrequest.otel

        perrequest.otel.instrument()


# --8<-- [end:config]

if __name__ == "__main__":
    import django
    from django.conf import settings
    from django.http import HttpRequest, JsonResponse
    from django.test import Client
    from django.urls import path
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from perrequest import request_memo

    @request_memo
    def load_user(user_id: int) -> str:
        return f"user {user_id}"  # a stub database query

    def show_user(request: HttpRequest, user_id: int) -> JsonResponse:
        load_user(user_id)
        return JsonResponse({"name": load_user(user_id)})  # a memo hit

    urlpatterns = [path("users/<int:user_id>", show_user)]

    # The SDK first (your exporter as usual; this reader keeps the metrics
    # in memory for the asserts below), then django.setup() calls ready().
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    settings.configure(
        INSTALLED_APPS=["shop.ShopConfig"],  # in a project: "shop"
        MIDDLEWARE=["perrequest.django.RequestScopeMiddleware"],
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["testserver"],
    )
    django.setup()

    client = Client()
    client.get("/users/7")
    client.get("/users/8")
    data = reader.get_metrics_data()
    assert data is not None
    [hits] = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "perrequest.memo.hits"
        for point in metric.data.data_points
    ]
    assert hits.attributes == {"perrequest.function": "__main__.load_user"}
    assert hits.value == 2  # one hit per request
