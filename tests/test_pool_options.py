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


EXPIRING = """
import asyncio
import threading
import time

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

from asgi_dbset import connection_set, get_stats
from tests.helpers import checked_out, sleeping
from tests.testapp.models import Author

resets = []


def reset(conn):
    resets.append(threading.current_thread().name)


# (A callable: not in the JSON the settings came from.)
connections["default"].settings_dict["OPTIONS"]["pool"]["reset"] = reset


async def twice(gather):
    out = []
    for _ in range(2):
        out.append(await gather())
        await asyncio.sleep(0.7)  # the connections held past max_lifetime and max_idle
    return out


async def request(parallelism):
    calls = lambda: [*(sleeping(0.1).acount() for _ in range(3)), Author.objects.acount()]
    async with ThreadSensitiveContext():
        try:
            if parallelism is None:  # stock Django: no set

                async def one_by_one():
                    return [await call for call in calls()]

                return await twice(one_by_one)
            async with connection_set(parallelism=parallelism, lease_timeout=0.1):

                async def gathered():
                    return list(await asyncio.gather(*calls()))

                return await twice(gathered)
        finally:
            await sync_to_async(connections.close_all)()


async def main():
    await Author.objects.acreate(name="x")
    stock = await asyncio.wait_for(request(None), 30)
    lanes = await asyncio.wait_for(asyncio.gather(request(3), request(3)), 30)
    after = await asyncio.wait_for(request(3), 30)
    await Author.objects.all().adelete()
    await sync_to_async(connections.close_all)()
    return stock, lanes, after


stock, lanes, after = asyncio.run(main())
# (With a reset, the pool takes a connection back in its worker, after
# putconn() returned; and it replaces an expired one: polled a little.)
for _ in range(30):
    if checked_out() == 0:
        break
    time.sleep(0.1)
print(json.dumps({
    "stock": stock,
    "lanes": lanes,
    "after": after,
    "lanes_leased": get_stats()["lanes_leased"],
    "resets": len(resets),
    "checked_out": checked_out(),
}))
"""


def test_expiring_connections_min_size_0_one_worker_and_a_reset_as_on_stock() -> None:
    # Lanes hold their connections past the pool's max_lifetime and max_idle
    # (the pool replaces them as they come back), on a pool that starts empty
    # and grows with one worker, with a reset callback on every return: the
    # same rows as stock, and every connection back.
    database = suite_database(
        min_size=0, max_size=6, max_lifetime=0.5, max_idle=0.5, num_workers=1
    )
    figures = run_with_one_database(EXPIRING, database)
    assert figures["stock"] == [[1, 1, 1, 1]] * 2
    assert figures["lanes"] == [figures["stock"]] * 2
    assert figures["after"] == figures["stock"]
    assert figures["lanes_leased"] >= 2
    assert figures["resets"] > 0
    assert figures["checked_out"] == 0


def test_max_waiting_is_no_warning_for_a_database_that_lends_no_lane() -> None:
    # A schema-per-tenant backend (W005): its calls all run on the request's
    # connection, as stock Django runs them, and the budget lends it no extra
    # lane - so no lane holds a connection a request would have had, and the
    # pool refuses nothing that stock Django serves. W006 said it would.
    database = {
        **suite_database(min_size=4, max_size=4, max_waiting=1, timeout=5),
        "ENGINE": "tests.tenant_backend",
    }
    figures = run_with_one_database(FOUR_REQUESTS, database)
    assert figures["stock"] == ["ok"] * 4
    assert figures["lanes"] == figures["stock"]
    # Before: ["asgi_dbset.W005", "asgi_dbset.W006"].
    assert figures["checks"] == ["asgi_dbset.W005"]
    assert figures["checked_out"] == 0
