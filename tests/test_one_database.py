"""A project with one database, the usual kind (the suite's settings have two).

Lanes read which connections their thread has open from the call's own
wrapper when only one database is configured, not from
``connections.all()``; this runs that path in a process configured that way,
on the suite's test database.
"""

from __future__ import annotations

import pytest

from tests.one_database import run_with_one_database, suite_database

pytestmark = pytest.mark.django_db(transaction=True)

ONE_DATABASE = """
import asyncio

from asgiref.sync import ThreadSensitiveContext, async_to_sync, sync_to_async
from django.db import connections, transaction

from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from tests.helpers import checked_out, sleeping
from tests.testapp.models import Author


def lanes_of(dbset):
    return sorted({record.lane for record in dbset.records})


async def three_lookups(pk):
    async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
        seen = await asyncio.gather(
            *(Author.objects.filter(pk=pk).aexists() for _ in range(3))
        )
    return seen, lanes_of(dbset)


def inside_a_transaction():
    with transaction.atomic():
        author = Author.objects.create(name="not committed")
        seen, lanes = async_to_sync(three_lookups)(author.pk)
        transaction.set_rollback(True)
    return seen, lanes


async def three_sleeps():
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
            await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
        await sync_to_async(connections.close_all)()
    return lanes_of(dbset)


seen, inside = inside_a_transaction()
connections.close_all()
outside = asyncio.run(three_sleeps())
print(json.dumps({
    "aliases": list(connections.settings),
    "seen": seen,
    "inside": inside,
    "outside": outside,
    "checked_out": checked_out(),
    "budget": budget.total,
    "rows": Author.objects.filter(name="not committed").count(),
}))
connections.close_all()
"""


def test_lanes_with_one_database_configured() -> None:
    # Three connections ready, so the extra lanes' leases need no new one.
    figures = run_with_one_database(ONE_DATABASE, suite_database(min_size=3))
    assert figures["aliases"] == ["default"]
    # Lane 0 reported its transaction: the calls stayed on it and saw the
    # row it had not committed.
    assert figures["seen"] == [True, True, True]
    assert figures["inside"] == [0]
    # Outside one, the three calls took three lanes...
    assert figures["outside"] == [0, 1, 2]
    # ...and every connection went back to the pool, every lane to the budget.
    assert figures["checked_out"] == 0
    assert figures["budget"] == 0
    assert figures["rows"] == 0
