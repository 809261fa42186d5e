"""The suite really runs on PostgreSQL, with pooled connections, on any server source.

Marked ``embedded``: ``make test-embedded`` runs these against the embedded server.
"""

from __future__ import annotations

import psycopg
import pytest
from django.conf import settings
from django.db import connections
from django.db.backends.postgresql.base import DatabaseWrapper
from psycopg.conninfo import conninfo_to_dict

from example_site.dbserver import embedded_database_url
from tests.testapp.models import Author, Book, Tag

pytestmark = pytest.mark.embedded


@pytest.mark.django_db(databases=["default", "other"])
@pytest.mark.parametrize(
    ("alias", "test_name"),
    [("default", "test_asgi_dbset"), ("other", "test_asgi_dbset_other")],
)
def test_django_connection_is_postgresql(alias: str, test_name: str) -> None:
    # (ASGI_DBSET_TEST_DB_SUFFIX, and the PgBouncer cell, add a suffix.)
    assert settings.DATABASES[alias]["TEST"]["NAME"].startswith(test_name)
    test_name = settings.DATABASES[alias]["TEST"]["NAME"]
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT version(), current_database()")
        version, database = cursor.fetchone()
    assert version.startswith("PostgreSQL")
    assert database == test_name


@pytest.mark.django_db
def test_django_connections_come_from_a_pool() -> None:
    connections["default"].ensure_connection()
    pool = DatabaseWrapper._connection_pools["default"]
    assert pool.max_size == 8
    assert pool.timeout == 10
    assert pool.get_stats()["pool_size"] >= 1
    info = connections["default"].connection.info
    assert info.parameter_status("application_name") == "asgi_dbset_tests"


def test_raw_psycopg_connection_is_postgresql() -> None:
    with psycopg.connect(settings.DATABASE_URL) as conn:
        row = conn.execute("SELECT version()").fetchone()
    assert row is not None
    assert row[0].startswith("PostgreSQL")


@pytest.mark.django_db(transaction=True)
async def test_async_orm_round_trip() -> None:
    author = await Author.objects.acreate(name="Ursula")
    book = await Book.objects.acreate(
        title="The Dispossessed", author=author, pages=387
    )
    tag = await Tag.objects.acreate(name="utopia")
    await tag.books.aadd(book)
    titles = [b.title async for b in Book.objects.filter(tags__name="utopia")]
    assert titles == ["The Dispossessed"]
    assert await Author.objects.acount() == 1


def test_embedded_server_starts_and_is_reused() -> None:
    url = embedded_database_url()
    assert embedded_database_url() == url
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute("SELECT version()").fetchone()
        assert conn.info.server_version >= 160000
    assert row is not None
    assert row[0].startswith("PostgreSQL")
    if settings.DATABASE_SOURCE == "embedded":
        # (Django's own connections go through PgBouncer in the PgBouncer cell.)
        assert (
            conninfo_to_dict(settings.DATABASE_URL)["host"]
            == conninfo_to_dict(url)["host"]
        )
