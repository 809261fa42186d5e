"""ASGI entry point: ``uvicorn example_site.asgi:application``."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_site.settings")

application = get_asgi_application()

try:
    from asgi_dbset import DBSetMiddleware
except ImportError:  # the middleware has not landed yet: serve stock Django
    pass
else:
    application = DBSetMiddleware(application)
