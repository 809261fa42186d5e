"""The ASGI application the reliability tests serve with uvicorn.

``/_rel/state`` is answered here, outside Django and outside the middleware,
so that reading the server's state opens no connection set and no connection.
Everything else goes to ``DBSetMiddleware(get_asgi_application())``, or to
plain ``get_asgi_application()`` when ``REL_STOCK=1``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.reliability.server_settings")

from asgiref.sync import SyncToAsync
from django.core.asgi import get_asgi_application
from django.db.backends.postgresql.base import DatabaseWrapper

from tests.reliability.server_settings import STOCK

django_app = get_asgi_application()

if STOCK:
    inner: Any = django_app
else:
    from asgi_dbset import DBSetMiddleware

    inner = DBSetMiddleware(django_app)


def state() -> dict[str, Any]:
    """The server's pool, budget and counters, as they are now."""
    pool = DatabaseWrapper._connection_pools.get("default")
    stats = dict(pool.get_stats()) if pool is not None else {}
    result: dict[str, Any] = {
        "pid": os.getpid(),
        "stock": STOCK,
        "pool": stats,
        "pool_max_size": pool.max_size if pool is not None else None,
        "checked_out": stats.get("pool_size", 0) - stats.get("pool_available", 0),
        "threads": threading.active_count(),
        # One entry per live thread-sensitive context: requests still running.
        "request_contexts": len(SyncToAsync.context_to_thread_executor),
        "budget": 0,
        "counters": {},
    }
    if not STOCK:
        from asgi_dbset import get_stats
        from asgi_dbset.budget import budget

        result["budget"] = budget.total
        result["counters"] = get_stats()
    return result


async def application(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope.get("path") == "/_rel/state":
        body = json.dumps(state()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    await inner(scope, receive, send)
