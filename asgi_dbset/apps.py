from __future__ import annotations

import logging

from django.apps import AppConfig
from django.core import checks

logger = logging.getLogger("asgi_dbset")


class AsgiDbsetConfig(AppConfig):
    name = "asgi_dbset"
    verbose_name = "asgi_dbset"

    def ready(self) -> None:
        from .checks import check_routers, check_routing, check_settings

        checks.register(check_settings)
        checks.register(check_routing)
        checks.register(check_routers)
        prepare()


def prepare() -> None:
    """Route the ORM through connection sets and refuse a bad configuration.

    Called by ``AppConfig.ready`` and by ``DBSetMiddleware``; idempotent.
    """
    from django.apps import apps
    from django.core.exceptions import ImproperlyConfigured

    from .checks import check_settings
    from .routing import install

    if not apps.models_ready:
        raise ImproperlyConfigured(
            "DBSetMiddleware was created before Django was set up. Wrap the app "
            "that get_asgi_application() returns (it calls django.setup()), or call "
            "django.setup() before creating the middleware."
        )
    install()
    errors = [m for m in check_settings() if m.is_serious()]
    if errors:
        raise ImproperlyConfigured(
            "asgi_dbset is misconfigured:\n" + "\n".join(f"  {m}" for m in errors)
        )


def warn_at_startup() -> None:
    """Log the warnings a server would not show: ASGI servers run no system
    checks, so the middleware logs those that say a pattern's semantics
    cannot be kept (unless SILENCED_SYSTEM_CHECKS silences them)."""
    from django.conf import settings

    from .checks import check_routers

    silenced = set(getattr(settings, "SILENCED_SYSTEM_CHECKS", ()))
    for message in check_routers():
        if message.id not in silenced:
            logger.warning("%s", message)
