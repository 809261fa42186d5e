from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from tests import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("dashboard/", views.dashboard),
    path("plain/", views.plain),
    path("cbv/", views.DashboardView.as_view()),
    path("cbv-dispatch/", views.DispatchView.as_view()),
    path("cbv-as-view/", views.db_parallelism(3)(views.PlainView.as_view())),
    path("stream/", views.stream),
    path("stream-wide/", views.stream_wide),
    path("stream-slow/", views.stream_slow),
    path("stream-failing/", views.stream_failing),
    path("stream-atomic/", views.stream_atomic),
    path("stream-sync/", views.stream_sync),
    path("fail/", views.fail),
    path("transaction-after-the-response/", views.transaction_after_the_response),
    path("replica/", views.replica_reads),
]
