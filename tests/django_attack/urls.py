from django.urls import path
from django.views.decorators.cache import never_cache

from . import views

handler500 = "django_attack.views.server_error"

# Only /cached/ is cached whole by the site cache.
urlpatterns = [
    path("mark/", never_cache(views.mark)),
    path("amark/", never_cache(views.amark)),
    path("stream/sync/", never_cache(views.stream_sync)),
    path("stream/async/", never_cache(views.stream_async)),
    path("bad-cookie/", never_cache(views.stream_bad_cookie)),
    path("flight/", never_cache(views.flight)),
    path("flight-timeout/", never_cache(views.flight_timeout)),
    path("sync-flight/", never_cache(views.sync_flight)),
    path("outlive/", never_cache(views.outlive)),
    path("outlive-sync/", never_cache(views.outlive_sync)),
    path("executor/", never_cache(views.executor_probe)),
    path("raise-view/", never_cache(views.raising_view)),
    path("raise-mw/", never_cache(views.mark)),
    path("cached/", views.cached),
    path("tagged/", never_cache(views.tagged)),
    path("user/", never_cache(views.user)),
    path("file/", never_cache(views.file)),
    path("file-custom/", never_cache(views.file_custom)),
    path("unique/", never_cache(views.unique)),
    path("_live", never_cache(views.live)),
]
