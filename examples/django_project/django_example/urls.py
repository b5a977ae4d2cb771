from django.urls import path

from . import views

urlpatterns = [
    path("", views.dashboard),
    path("api/orders/", views.orders),
    path("order-lines/", views.order_lines),
    path("stats/", views.stats),
]
