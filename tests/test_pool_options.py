"""psycopg_pool options that change what a request meets when extra lanes
hold connections, against stock Django on the same requests.

Each runs in a process of its own with the pool options under test, on the
suite's test database.
"""

from __future__ import annotations

import pytest

from tests.one_database import run_with_one_database, suite_database

pytestmark = pytest.mark.django_db(transaction=True)

FOUR_REQUESTS = """
import asyncio

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core import checks
from django.db import connections

from asgi_dbset import connection_set
from tests.helpers import checked_out, sleeping


async def request(parallelism, start, calls):
    await asyncio.sleep(start)
    async with ThreadSensitiveContext():
        try:
            if parallelism is None:  # stock Django: no set
                for _ in range(calls):
                    await sleeping(0.8).acount()
            else:
                async with connection_set(parallelism=parallelism, lease_timeout=1.0):
                    await asyncio.gather(*(sleeping(0.8).acount() for _ in range(calls)))
            return "ok"
        except Exception as exc:
            return f"{type(exc).__name__}: {type(exc.__cause__).__name__}"
        finally:
            await sync_to_async(connections.close_all)()


async def four_requests(parallelism):
    # One request gathers three queries; three more arrive while it runs.
    return await asyncio.wait_for(asyncio.gather(
        request(parallelism, 0.0, 3),
        request(parallelism, 0.15, 1),
        request(parallelism, 0.3, 1),
        request(parallelism, 0.45, 1),
    ), 30)


async def main():
    pool = connections["default"].pool
    pool.open()
    await asyncio.to_thread(pool.wait)
    return await four_requests(None), await four_requests(4)


stock, lanes = asyncio.run(main())
print(json.dumps({
    "stock": stock,
    "lanes": lanes,
    "checked_out": checked_out(),
    "checks": sorted({m.id for m in checks.run_checks() if m.id.startswith("asgi_dbset")}),
}))
"""


def test_max_waiting_refuses_requests_stock_django_serves_and_the_checks_say_so() -> (
    None
):
    # A pool of 4 that lets one request wait. Stock Django: the four requests
    # hold at most 4 connections, all served. With the set: the first one's
    # two extra lanes leave the fourth request no connection and one waiting
    # ahead of it, and the pool refuses it at once. The library cannot keep
    # stock's outcome, so its checks warn at startup (W006).
    database = suite_database(min_size=4, max_size=4, max_waiting=1, timeout=5)
    figures = run_with_one_database(FOUR_REQUESTS, database)
    assert figures["stock"] == ["ok"] * 4
    assert figures["lanes"] == ["ok"] * 3 + ["OperationalError: TooManyRequests"]
    assert figures["checks"] == ["asgi_dbset.W006"]
    assert figures["checked_out"] == 0
