from __future__ import annotations

from django.urls import path

from example_site.shop import views

urlpatterns = [
    path("", views.index, name="index"),
    path("healthz", views.healthz, name="healthz"),
]
