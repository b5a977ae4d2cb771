from django.urls import path

from . import views

urlpatterns = [
    path("", views.dashboard),
    path("api/orders/", views.orders),
    path("stats/", views.stats),
]
