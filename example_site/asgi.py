"""ASGI entry point: ``uvicorn example_site.asgi:application``.

One application: paths under ``/starlette/`` go to the Starlette app, every
other path to Django, and all of them through one ``DBSetMiddleware``.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_site.settings")

# Sets Django up; the Starlette app imports models, so it comes after.
django_application = get_asgi_application()

from asgi_dbset import DBSetMiddleware  # noqa: E402
from asgi_dbset.types import ASGIApp, Receive, Scope, Send  # noqa: E402
from example_site.starlette_app import starlette_app  # noqa: E402


class PrefixRouter:
    """Send ``http`` and ``websocket`` scopes whose path is under a prefix to
    that prefix's app, and everything else (lifespan included) to ``default``.

    The mounted app sees the prefix in ``root_path``, with ``path`` left whole,
    as ASGI servers and Starlette's own ``Mount`` present it.
    """

    def __init__(self, routes: dict[str, ASGIApp], default: ASGIApp) -> None:
        for prefix in routes:
            if not prefix.startswith("/") or prefix.endswith("/"):
                raise ValueError(
                    f"Write a mount prefix as '/name', with a leading and no "
                    f"trailing slash, not {prefix!r}."
                )
        self.routes = routes
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path = scope["path"]
            for prefix, app in self.routes.items():
                if path == prefix and scope["type"] == "http":
                    await _redirect(prefix + "/", send)
                    return
                if path.startswith(prefix + "/"):
                    root_path = scope.get("root_path", "") + prefix
                    await app({**scope, "root_path": root_path}, receive, send)
                    return
        await self.default(scope, receive, send)


async def _redirect(location: str, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 308,
            "headers": [(b"location", location.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


def build_application() -> DBSetMiddleware:
    """Django and Starlette behind one ``DBSetMiddleware``."""
    return DBSetMiddleware(
        PrefixRouter({"/starlette": starlette_app}, default=django_application)
    )


application = build_application()
