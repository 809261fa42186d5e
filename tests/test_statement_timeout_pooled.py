"""A statement timeout never outlives its call, nor reaches another client.

Behind PgBouncer in transaction pooling mode (the matrix's PgBouncer cell runs
this file through one; ``TRANSACTION_POOLED`` names the aliases), a session
setting could be sent to one server session and the query to another, and
stay on a session that other clients use next. So there the timeout holds for
the call's own transaction only. Gathered side by side: timed queries over
the limit, timed queries under it, untimed queries longer than the limit from
another set, and another client reading its own statement_timeout all along.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import psycopg
import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import OperationalError, connections

from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from tests.helpers import sleeping

pytestmark = pytest.mark.django_db(transaction=True)


def app_dsn() -> dict[str, Any]:
    """How the app reaches the database (through PgBouncer, in its cell)."""
    s = connections["default"].settings_dict
    return {
        "host": s["HOST"],
        "port": s["PORT"] or None,
        "user": s["USER"],
        "dbname": s["NAME"],
        "prepare_threshold": None,
        "autocommit": True,
    }


async def timed(n: int, seconds: float) -> list[Any]:
    async with connection_set(parallelism=4, statement_timeout=0.2, lease_timeout=5.0):
        return list(
            await asyncio.gather(
                *(sleeping(seconds).acount() for _ in range(n)), return_exceptions=True
            )
        )


async def untimed(n: int, seconds: float) -> list[Any]:
    async with connection_set(parallelism=4, statement_timeout=None, lease_timeout=5.0):
        return list(
            await asyncio.gather(
                *(sleeping(seconds).acount() for _ in range(n)), return_exceptions=True
            )
        )


async def test_timeouts_cancel_only_their_own_queries() -> None:
    seen: set[str] = set()
    stop = threading.Event()

    def another_client() -> None:
        with psycopg.connect(**app_dsn()) as conn:
            for _ in range(2000):
                if stop.is_set():
                    return
                row = conn.execute("SHOW statement_timeout").fetchone()
                seen.add(str(row[0]) if row else "?")
                stop.wait(0.005)

    watcher = threading.Thread(target=another_client, daemon=True)
    watcher.start()
    try:
        async with ThreadSensitiveContext():
            over, under, others = await asyncio.gather(
                timed(6, 1.0), timed(6, 0.02), untimed(6, 0.4)
            )
            await sync_to_async(connections.close_all)()
    finally:
        stop.set()
        await asyncio.to_thread(watcher.join, 30)
    # Every timed query over the limit was cancelled, with PostgreSQL's message...
    for result in over:
        assert isinstance(result, OperationalError), result
        assert isinstance(result.__cause__, psycopg.errors.QueryCanceled)
        assert "statement timeout" in str(result)
    # ...no other query was.
    assert under == [0] * 6
    assert others == [0] * 6
    # And no other client's session ever showed the timeout.
    assert seen == {"0"}
    # Nor does any session the pool (or PgBouncer) hands out now.
    shown = await asyncio.to_thread(_timeouts_of_fresh_sessions, 8)
    assert shown == {"0"}
    assert budget.total == 0


def _timeouts_of_fresh_sessions(n: int) -> set[str]:
    conns = [psycopg.connect(**app_dsn()) for _ in range(n)]
    try:
        return {str(c.execute("SHOW statement_timeout").fetchone()[0]) for c in conns}  # type: ignore[index]
    finally:
        for conn in conns:
            conn.close()
