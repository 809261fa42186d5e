"""Per-database Django settings on extra lanes' connections, as on stock Django.

A lane's connection is one of the alias's pool, opened through Django's
wrapper on the lane's thread: what Django applies to a connection
(``OPTIONS["isolation_level"]`` on the connection, ``TIME_ZONE`` by the pool's
configure, libpq ``options``, ``server_side_binding``'s cursor class,
``CONN_HEALTH_CHECKS``' pool check) must hold there as on the request's
connection. Run in a process of its own with those settings, on the suite's
test database; stock (no set) against gathered calls at parallelism 3.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from psycopg import IsolationLevel

from example_site.dbserver import django_database
from tests.one_database import run_with_one_database, suite_database

pytestmark = pytest.mark.django_db(transaction=True)

SETTINGS_SEEN = """
import asyncio

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.contrib.contenttypes.models import ContentType
from django.db import connections, transaction
from django.db.models import CharField, DateTimeField
from django.db.models.expressions import RawSQL

import asgi_dbset
from asgi_dbset import connection_set
from tests.helpers import checked_out

SEEN = {
    "isolation": "current_setting('transaction_isolation')",
    "time_zone": "current_setting('TimeZone')",
    "search_path": "current_setting('search_path')",
    "statement_timeout": "current_setting('statement_timeout')",
}


def extra():
    return ContentType.objects.order_by("pk").extra(select=SEEN).values(*SEEN)


def annotated():
    return ContentType.objects.order_by("pk").annotate(
        **{k: RawSQL(v, [], output_field=CharField()) for k, v in SEEN.items()}
    ).values(*SEEN)


def instant():
    return ContentType.objects.order_by("pk").annotate(
        at=RawSQL("'2020-06-01 12:00:00+00'::timestamptz", [], output_field=DateTimeField())
    ).values_list("at", flat=True)


async def reads():
    # Outside and inside a transaction block (where the isolation level holds).
    first, second, at = await extra().afirst(), await annotated().afirst(), await instant().afirst()
    return [first, second, at.isoformat()]


async def in_block():
    async with asgi_dbset.atomic():
        return await reads()


def stock_block():
    with transaction.atomic():
        return [extra().first(), annotated().first(), instant().first().isoformat()]


async def request(parallelism):
    async with ThreadSensitiveContext():
        if parallelism is None:  # stock Django: no set
            seen = [await reads() for _ in range(3)]
            blocks = [await sync_to_async(stock_block)() for _ in range(3)]
            lanes = []
        else:
            async with connection_set(parallelism=parallelism, lease_timeout=5.0) as dbset:
                seen = await asyncio.gather(*(reads() for _ in range(3)))
                blocks = await asyncio.gather(*(in_block() for _ in range(3)))
            lanes = sorted({record.lane for record in dbset.records})
        await sync_to_async(connections.close_all)()
    return {"seen": seen, "blocks": blocks, "lanes": lanes}


async def main():
    # (Bounded: a hang fails the test instead of the suite.)
    return await asyncio.wait_for(request(None), 60), await asyncio.wait_for(request(3), 60)


stock, lanes = asyncio.run(main())
print(json.dumps({"stock": stock, "lanes": lanes, "checked_out": checked_out()}))
"""


@pytest.mark.parametrize(
    "level", [IsolationLevel.REPEATABLE_READ, IsolationLevel.SERIALIZABLE]
)
def test_database_settings_hold_on_extra_lanes(level: IsolationLevel) -> None:
    database = suite_database(min_size=3)
    # Settings Django applies to the server's own connections: straight to the
    # server, also in the PgBouncer cell (PgBouncer refuses libpq's `options`
    # startup parameter, on stock Django as here).
    server = django_database(settings.DATABASE_URL)
    database.update(HOST=server["HOST"], PORT=server["PORT"])
    database["OPTIONS"].update(
        isolation_level=int(level),
        options="-c search_path=nowhere,public -c statement_timeout=4321",
        server_side_binding=True,
    )
    database["TIME_ZONE"] = "Asia/Tokyo"
    database["CONN_HEALTH_CHECKS"] = True
    figures = run_with_one_database(SETTINGS_SEEN, database)
    stock, lanes = figures["stock"], figures["lanes"]
    assert lanes["lanes"] == [0, 1, 2]
    # What stock shows: autocommit statements at the server's default
    # isolation, blocks at the configured one; the alias's time zone, path and
    # timeout on every connection; datetimes in the alias's time zone.
    outside = {
        "isolation": "read committed",
        "time_zone": "Asia/Tokyo",
        "search_path": "nowhere,public",
        "statement_timeout": "4321ms",
    }
    inside = {**outside, "isolation": level.name.lower().replace("_", " ")}
    at = "2020-06-01T21:00:00+09:00"
    assert stock["seen"] == [[outside, outside, at]] * 3
    assert stock["blocks"] == [[inside, inside, at]] * 3
    # The same on three lanes.
    assert lanes["seen"] == stock["seen"]
    assert lanes["blocks"] == stock["blocks"]
    assert figures["checked_out"] == 0
