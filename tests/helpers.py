"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

import psycopg
from django.conf import settings
from django.db import connections
from django.db.models import BooleanField
from django.db.models.expressions import RawSQL

from asgi_dbset import ConnectionSet, connection_set
from tests.testapp.models import Author


def sleeping(seconds: float, model: Any = Author) -> Any:
    """A queryset whose evaluation spends ``seconds`` on the server (pg_sleep).

    The sleep is a one-time filter of the plan, so it runs once per query even
    on an empty table.
    """
    gate = RawSQL(
        "(SELECT true FROM pg_sleep(%s))", [seconds], output_field=BooleanField()
    )
    return model.objects.filter(gate)


def pool_stats(alias: str = "default") -> dict[str, int]:
    return dict(connections[alias].pool.get_stats())


def checked_out(alias: str = "default") -> int:
    stats = pool_stats(alias)
    return stats.get("pool_size", 0) - stats.get("pool_available", 0)


async def timed(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await awaitable
    return result, loop.time() - started


def active_sleeps(name: str | None = None) -> int:
    """Queries of the test database (or database *name*) running pg_sleep on
    the server now."""
    name = name or settings.DATABASES["default"]["NAME"]
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
            "AND query LIKE %s AND pid <> pg_backend_pid()",
            [name, "%pg_sleep%"],
        ).fetchone()
    return int(row[0]) if row else 0


async def take_every_pooled_connection(alias: str = "default") -> tuple[Any, list[Any]]:
    """Leave the pool of *alias* empty the way other requests would: lane 0
    (this test's own thread) takes its connection first, then the test holds
    every other one. Returns the pool and the held connections; give them back
    with ``pool.putconn``."""
    pool = connections[alias].pool  # type: ignore[attr-defined]
    pool.open()
    await asyncio.to_thread(pool.wait)
    await sleeping(0).acount()  # lane 0's own connection
    held = []
    while checked_out(alias) < pool.max_size:
        held.append(await asyncio.to_thread(pool.getconn, 5))
    return pool, held


async def set_unless_stock(
    stack: contextlib.AsyncExitStack, parallelism: int | None
) -> ConnectionSet | None:
    """A connection set of *parallelism* entered on *stack*; None (stock
    Django, no set) when *parallelism* is None."""
    if parallelism is None:
        return None
    return await stack.enter_async_context(
        connection_set(parallelism=parallelism, lease_timeout=5.0)
    )
