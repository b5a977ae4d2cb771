from django.urls import include, path

from . import toolbar_views

urlpatterns = [
    path("catalog/", toolbar_views.catalog),
    path("crowded/", toolbar_views.crowded),
    path("threaded/", toolbar_views.threaded),
    path("__debug__/", include("debug_toolbar.urls")),
]
