from django.urls import path

from . import views

handler500 = "django_project.views.server_error"

urlpatterns = [
    path("sync/", views.sync_view),
    path("async/", views.async_view),
    path("shared/", views.shared_view),
    path("stream/sync/", views.stream_sync),
    path("stream/async/", views.stream_async),
    path("stream/slow/", views.stream_slow),
    path("stream/slow-async/", views.stream_slow_async),
    path("boom/", views.boom),
    path("echo/", views.echo),
    path("aecho/", views.aecho),
    path("_live", views.live),
]
