from __future__ import annotations

from django.apps import AppConfig


class BenchSiteConfig(AppConfig):
    name = "bench.djsite"
    label = "bench_djsite"
    default_auto_field = "django.db.models.BigAutoField"
