"""Run a Django request's async ORM queries in parallel, within a budget.

::

    application = DBSetMiddleware(get_asgi_application())

    @db_parallelism(3)
    async def dashboard(request):
        a, b, c = await asyncio.gather(q1.acount(), q2.afirst(), q3.aaggregate(...))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

__all__ = [
    "CallNotRunError",
    "CallRecord",
    "ConnectionSet",
    "DBSetMiddleware",
    "OrphanedIteratorError",
    "QueryRefusedError",
    "RequestSummary",
    "SnapshotError",
    "SnapshotWriteError",
    "TransactionLeftOpenError",
    "active_set",
    "atomic",
    "connection_set",
    "db_parallelism",
    "get_pool_stats",
    "get_stats",
    "on_commit",
    "recent_requests",
    "sync_to_lane",
]

if TYPE_CHECKING:
    from .api import active_set, connection_set, db_parallelism
    from .blocks import atomic, on_commit
    from .dbset import ConnectionSet
    from .errors import (
        CallNotRunError,
        OrphanedIteratorError,
        QueryRefusedError,
        SnapshotError,
        SnapshotWriteError,
        TransactionLeftOpenError,
    )
    from .history import RequestSummary, recent_requests
    from .middleware import DBSetMiddleware
    from .records import CallRecord
    from .stats import get_pool_stats, get_stats
    from .sync import sync_to_lane

# Imported lazily: `import asgi_dbset` (as INSTALLED_APPS does) must not touch
# Django's models before the app registry is ready.
_LAZY = {
    "CallNotRunError": ".errors",
    "CallRecord": ".records",
    "ConnectionSet": ".dbset",
    "RequestSummary": ".history",
    "get_pool_stats": ".stats",
    "DBSetMiddleware": ".middleware",
    "OrphanedIteratorError": ".errors",
    "QueryRefusedError": ".errors",
    "SnapshotError": ".errors",
    "SnapshotWriteError": ".errors",
    "TransactionLeftOpenError": ".errors",
    "active_set": ".api",
    "atomic": ".blocks",
    "on_commit": ".blocks",
    "connection_set": ".api",
    "db_parallelism": ".api",
    "get_stats": ".stats",
    "recent_requests": ".history",
    "sync_to_lane": ".sync",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'asgi_dbset' has no attribute {name!r}")
