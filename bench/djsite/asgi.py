"""``uvicorn bench.djsite.asgi:application`` with BENCH_VARIANT=stock|dbset|dab."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.djsite.settings")

from django.conf import settings
from django.core.asgi import get_asgi_application

application = get_asgi_application()

if settings.VARIANT == "dbset":
    from asgi_dbset import DBSetMiddleware

    application = DBSetMiddleware(application)
    if os.environ.get("BENCH_OTEL"):
        # The metrics on, as a production process has them: recorded into
        # the SDK's aggregations; an exporter would collect them every few
        # seconds (here nothing collects).
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from asgi_dbset.opentelemetry import instrument

        instrument(
            meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()])
        )
    if os.environ.get("BENCH_TRACE"):
        from bench.djsite.trace import Trace

        application = Trace(application)
