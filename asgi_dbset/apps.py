from __future__ import annotations

from django.apps import AppConfig


class AsgiDbsetConfig(AppConfig):
    name = "asgi_dbset"
    verbose_name = "asgi_dbset"
