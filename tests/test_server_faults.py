"""Server-side faults during a request with lanes, against stock Django on the
same pattern: the user's query gets stock's exception, no connection stays
out of its pool, and the next request works.

The block tests kill the connection of an ``asgi_dbset.atomic()`` block
between two of its calls - the server's ``idle_in_transaction_session_timeout``
or ``pg_terminate_backend`` - so the block's next call fails, and the block
is left on that exception. Stock Django's ``transaction.atomic`` then tries to
roll back, fails on the dead connection, drops it, and lets the call's
exception go on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import connection, connections, transaction

import asgi_dbset
from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from tests.helpers import sleeping
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)

IDLE_TIMEOUT = "SELECT set_config('idle_in_transaction_session_timeout', '200ms', true)"


def terminate(pid: int) -> None:
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])


def kill_own_backend(how: str) -> None:
    """On the thread whose connection runs the block: end that connection
    from the server's side while the block is idle in its transaction."""
    with connection.cursor() as cursor:
        if how == "idle_timeout":
            cursor.execute(IDLE_TIMEOUT)
            pid = None
        else:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
    if pid is None:
        time.sleep(0.6)  # past the timeout, idle in the transaction
    else:
        terminate(pid)
        time.sleep(0.1)


def outcome(exc: BaseException | None) -> str:
    return "ok" if exc is None else f"{type(exc).__module__}.{type(exc).__name__}"


async def in_a_request(pattern: Callable[[], Any]) -> Any:
    async with ThreadSensitiveContext():
        try:
            return await asyncio.wait_for(pattern(), 30)
        finally:
            await sync_to_async(connections.close_all)()


async def stock_block(how: str) -> tuple[str, int]:
    def block() -> None:
        with transaction.atomic():
            Author.objects.create(name="a")
            kill_own_backend(how)
            Author.objects.create(name="b")

    try:
        await sync_to_async(block)()
        raised = None
    except Exception as exc:
        raised = exc
    return outcome(raised), await Author.objects.acount()


async def block_on_a_lane(how: str) -> tuple[str, int]:
    async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
        # (Lanes for the block to take.)
        await asyncio.gather(*(sleeping(0.05).acount() for _ in range(3)))
        seen = len(dbset.records)
        try:
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="a")
                await asgi_dbset.sync_to_lane(kill_own_backend)(how)
                await Author.objects.acreate(name="b")
            raised = None
        except Exception as exc:
            raised = exc
        # The block ran on an extra lane, not on the request's connection.
        assert {record.lane for record in dbset.records[seen:]} - {0}
    return outcome(raised), await Author.objects.acount()


@pytest.mark.parametrize("how", ["idle_timeout", "terminate"])
async def test_a_block_whose_connection_dies_raises_its_calls_error_as_on_stock(
    how: str,
) -> None:
    stock = await in_a_request(lambda: stock_block(how))
    assert stock[1] == 0  # rolled back by the server
    lanes = await in_a_request(lambda: block_on_a_lane(how))
    # Before: asgi_dbset.CallNotRunError ("the connection of its transaction
    # block was lost") from the block's exit, instead of the call's error.
    assert lanes == stock

    # The next request works, on every lane; nothing is left out of the pool.
    async def next_request() -> list[int]:
        async with connection_set(parallelism=3, lease_timeout=5.0):
            return list(
                await asyncio.gather(*(sleeping(0.05).acount() for _ in range(3)))
            )

    assert await in_a_request(next_request) == [0, 0, 0]
    # (Every pool's connections back: the suite's pool_leak_check.)
    assert budget.total == 0
