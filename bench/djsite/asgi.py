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
    if os.environ.get("BENCH_TRACE"):
        from bench.djsite.trace import Trace

        application = Trace(application)
