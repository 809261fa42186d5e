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
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import connection, connections, transaction
from psycopg import sql

import asgi_dbset
from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from example_site.dbserver import django_database
from tests.helpers import sleeping
from tests.one_database import run_with_one_database, suite_database
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


# --- settings of the server's role, and its connection limit ------------------------

ROLE = "asgi_dbset_faults" + os.environ.get("ASGI_DBSET_TEST_DB_SUFFIX", "")


@pytest.fixture
def role() -> Iterator[str]:
    """A login role of the test's own (role settings and limits apply to it
    only), allowed to use the test database's tables."""
    name = connections["default"].settings_dict["NAME"]
    quoted = sql.Identifier(ROLE)
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(quoted))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(quoted))
    with psycopg.connect(settings.DATABASE_URL, dbname=name, autocommit=True) as conn:
        for what in ("TABLES", "SEQUENCES"):
            conn.execute(
                sql.SQL("GRANT ALL ON ALL {} IN SCHEMA public TO {}").format(
                    sql.SQL(what), quoted
                )
            )
    try:
        yield ROLE
    finally:
        with psycopg.connect(
            settings.DATABASE_URL, dbname=name, autocommit=True
        ) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(quoted))
        with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(quoted))


ROLE_REQUESTS = """
import asyncio
import time

import psycopg
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

from asgi_dbset import connection_set, get_stats
from example_site.dbserver import django_database
from tests.helpers import sleeping
from tests.one_database import run_with_one_database, suite_database
from tests.testapp.models import Author

admin_dsn = sys.argv[2]


def outcome(r):
    return type(r).__name__ if isinstance(r, BaseException) else r


async def request(parallelism):
    # Four gathered queries; the first one runs past a 300 ms statement_timeout.
    calls = [sleeping(0.6).acount(), *(sleeping(0.2).acount() for _ in range(3))]
    async with ThreadSensitiveContext():
        try:
            if parallelism is None:  # stock Django: no set
                results = await asyncio.gather(*calls, return_exceptions=True)
            else:
                async with connection_set(parallelism=parallelism, lease_timeout=0.1):
                    results = await asyncio.gather(*calls, return_exceptions=True)
            return [outcome(r) for r in results]
        finally:
            await sync_to_async(connections.close_all)()


async def main():
    return [await asyncio.wait_for(request(p), 30) for p in (None, 4, 4)]


stock, lanes, after = asyncio.run(main())


def connections_of_the_role():
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
            [connections["default"].settings_dict["USER"]],
        ).fetchone()[0]


# (Polled a little: a connection the pool was still adding may arrive.)
for _ in range(20):
    available = connections["default"].pool.get_stats().get("pool_available", 0)
    backends = connections_of_the_role()
    if available == backends:
        break
    time.sleep(0.1)
print(json.dumps({
    "stock": stock,
    "lanes": lanes,
    "after": after,
    "lease_failures": get_stats()["lease_failures"],
    "available": available,
    "backends": backends,
}))
"""


@pytest.mark.parametrize(
    ("setting", "slow"),
    [
        ("SET statement_timeout = '300ms'", "OperationalError"),
        ("CONNECTION LIMIT 2", 0),
    ],
)
def test_role_settings_and_a_full_connection_limit_as_on_stock(
    role: str, setting: str, slow: object
) -> None:
    # The role's statement_timeout cancels the slow query, on a lane as on
    # the request's connection; at the role's connection limit (the server's
    # "too many connections" at lease time) the leases fail and every query
    # runs on the request's connection, as stock runs them. Every connection
    # the pool opened is back in it afterwards (the pool may still be trying
    # to grow: its size counts that attempt), and the next request works.
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} " + setting).format(sql.Identifier(role)))
    database = suite_database(min_size=1, max_size=8, timeout=5)
    server = django_database(settings.DATABASE_URL)
    database.update(HOST=server["HOST"], PORT=server["PORT"], USER=role, PASSWORD="")
    figures = run_with_one_database(ROLE_REQUESTS, database, settings.DATABASE_URL)
    assert figures["stock"] == [slow, 0, 0, 0]
    assert figures["lanes"] == figures["stock"]
    assert figures["after"] == figures["stock"]
    if setting.startswith("CONNECTION LIMIT"):
        assert figures["lease_failures"] >= 1
    assert figures["available"] == figures["backends"]
