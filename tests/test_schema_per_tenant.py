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
from django.db import connections

from tests.one_database import run_with_one_database, suite_database

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

# What both scripts start with: a tenant's schema with its own author table.
TENANT = """
import asyncio

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connection, connections

from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from tests.testapp.models import Author

SCHEMA = "asgi_dbset_tenant"


def make_schema():
    with connection.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        cursor.execute(f"CREATE SCHEMA {SCHEMA}")
        cursor.execute(
            f"CREATE TABLE {SCHEMA}.testapp_author "
            "(LIKE public.testapp_author INCLUDING ALL)"
        )


def drop_schema():
    connection.set_schema("public")
    with connection.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


def set_schema(name):
    # As the tenant middleware does, on the request's thread.
    connection.set_schema(name)
"""

TENANT_READS = (
    TENANT
    + """
from tests.helpers import checked_out


def make_tenant():
    make_schema()
    connection.set_schema(SCHEMA)
    Author.objects.create(name="the tenant's")
    connection.set_schema("public")
    Author.objects.create(name="public's")


def drop_tenant():
    connection.set_schema("public")
    Author.objects.filter(name="public's").delete()
    drop_schema()


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
)


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


RECEIVER_WRITES = (
    TENANT
    + """
from django.db.models.signals import post_save

from tests.helpers import sleeping
from tests.testapp.models import Tally


def drop_tenant():
    connection.set_schema("public")
    Author.objects.filter(name="audit").delete()
    Tally.objects.using("other").all().delete()
    drop_schema()


def audit(sender, instance, **kwargs):
    # A receiver of a save on "other" writing the tenant's database.
    Author.objects.create(name="audit")


def audits():
    # The audit rows in each schema (taken away: each run starts from none).
    found = {}
    for schema in (SCHEMA, "public"):
        connection.set_schema(schema)
        found[schema] = Author.objects.filter(name="audit").count()
        Author.objects.filter(name="audit").delete()
    connection.set_schema("public")
    Tally.objects.using("other").all().delete()
    return found


async def request(parallelism):
    async with ThreadSensitiveContext():
        await sync_to_async(set_schema)(SCHEMA)

        async def body():
            await asyncio.gather(
                # (Lane 0 busy meanwhile: the saves go to lanes of "other".)
                sleeping(0.5).acount(),
                Tally.objects.using("other").acreate(name="a"),
                Tally.objects.using("other").acreate(name="b"),
            )

        error = None
        try:
            if parallelism is None:
                await body()
            else:
                async with connection_set(parallelism=parallelism, lease_timeout=5.0):
                    await body()
        except Exception as exc:
            error = type(exc).__name__
        await sync_to_async(set_schema)("public")
        await sync_to_async(connections.close_all)()
    return error


post_save.connect(audit, sender=Tally)
make_schema()
connections.close_all()
try:
    stock = asyncio.run(request(None)), audits()
    connections.close_all()
    library = asyncio.run(request(3)), audits()
finally:
    drop_tenant()
    connections.close_all()
print(json.dumps({"stock": stock, "library": library, "budget": budget.total}))
connections.close_all()
"""
)


def test_a_call_on_an_extra_lane_never_writes_the_tenants_database_elsewhere() -> None:
    """The tenant's database runs on lane 0 only, but another database's
    calls have extra lanes, and code they run (a post_save receiver) may
    write the tenant's: on an extra lane's thread, that query went to a
    connection without the tenant's schema - stock Django wrote the audit
    rows into the tenant's table, the set at parallelism 3 into public's,
    silently. It is refused now, with TransactionManagementError saying what
    to write instead (no row in public's table)."""
    tenant = suite_database(min_size=3)
    tenant["ENGINE"] = "tests.tenant_backend"
    other = connections["other"].settings_dict
    databases = {
        "default": tenant,
        "other": {
            **{
                key: other[key]
                for key in ("ENGINE", "NAME", "USER", "PASSWORD", "HOST", "PORT")
            },
            "OPTIONS": dict(other["OPTIONS"]),
        },
    }
    figures = run_with_one_database(RECEIVER_WRITES, databases)
    assert figures["stock"] == [None, {"asgi_dbset_tenant": 2, "public": 0}]
    assert figures["library"] == [
        "TransactionManagementError",
        {"asgi_dbset_tenant": 0, "public": 0},
    ]
    assert figures["budget"] == 0
