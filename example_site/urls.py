from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from example_site.shop import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.index, name="index"),
    path("dashboard/", views.dashboard, name="dashboard"),
    path("dashboard/serial/", views.dashboard_serial, name="dashboard-serial"),
    path("dashboard/snapshot/", views.dashboard_snapshot, name="dashboard-snapshot"),
    path("api/panels/", views.PanelsAPI.as_view(), name="api-panels"),
    path("api/panels/serial/", views.panels_serial, name="api-panels-serial"),
    path("api/panels/<str:name>/", views.PanelsAPI.as_view(), name="api-panel"),
    path("api/stats/", views.stats, name="api-stats"),
    path("api/timeline/", views.timeline_json, name="api-timeline"),
    path("timeline/", views.timeline, name="timeline"),
    path("healthz", views.healthz, name="healthz"),
]
