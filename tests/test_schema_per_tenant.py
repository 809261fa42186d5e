"""A schema-per-tenant backend (django-tenants and its kin): the request's
middleware gives the request's connection object the tenant's schema, and
every query of the request reads that tenant's tables.

A lane's connection is another connection object, which never had the tenant
set: a gathered call run there read the public schema's rows. The set runs
such a database's calls on the request's connection, as stock Django does
(and ``asgi_dbset.W005`` says so at startup). Run in a process of its own,
configured with that backend (``tests/tenant_backend``) on the suite's test
database.
"""

from __future__ import annotations

import pytest

from tests.one_database import run_with_one_database, suite_database

pytestmark = pytest.mark.django_db(transaction=True)

TENANT_READS = """
import asyncio

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connection, connections

from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from tests.helpers import checked_out
from tests.testapp.models import Author

SCHEMA = "asgi_dbset_tenant"


def make_tenant():
    with connection.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        cursor.execute(f"CREATE SCHEMA {SCHEMA}")
        cursor.execute(
            f"CREATE TABLE {SCHEMA}.testapp_author "
            "(LIKE public.testapp_author INCLUDING ALL)"
        )
    connection.set_schema(SCHEMA)
    Author.objects.create(name="the tenant's")
    connection.set_schema("public")
    Author.objects.create(name="public's")


def drop_tenant():
    connection.set_schema("public")
    Author.objects.filter(name="public's").delete()
    with connection.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


def set_schema(name):
    # As the tenant middleware does, on the request's thread.
    connection.set_schema(name)


async def names():
    return [a.name async for a in Author.objects.order_by("pk")]


async def request(parallelism):
    lanes = []
    async with ThreadSensitiveContext():
        await sync_to_async(set_schema)(SCHEMA)
        if parallelism is None:
            seen = await asyncio.gather(*(names() for _ in range(3)))
        else:
            async with connection_set(
                parallelism=parallelism, lease_timeout=5.0
            ) as dbset:
                seen = await asyncio.gather(*(names() for _ in range(3)))
            lanes = sorted({record.lane for record in dbset.records})
        await sync_to_async(set_schema)("public")
        await sync_to_async(connections.close_all)()
    return seen, lanes


make_tenant()
connections.close_all()
try:
    stock, _ = asyncio.run(request(None))
    library, lanes = asyncio.run(request(3))
finally:
    drop_tenant()
    connections.close_all()
print(json.dumps({
    "stock": stock,
    "library": library,
    "lanes": lanes,
    "checked_out": checked_out(),
    "budget": budget.total,
}))
connections.close_all()
"""


def test_gathered_reads_see_the_requests_tenant() -> None:
    database = suite_database(min_size=3)
    database["ENGINE"] = "tests.tenant_backend"
    figures = run_with_one_database(TENANT_READS, database)
    assert figures["stock"] == [["the tenant's"]] * 3
    # Each read saw the tenant's table; before, two of the three ran on extra
    # lanes, whose connections read the public schema's ("public's").
    assert figures["library"] == figures["stock"]
    assert figures["lanes"] == [0]
    assert figures["checked_out"] == 0
    assert figures["budget"] == 0
