"""Suite-wide checks: we talk to a real PostgreSQL, and every test gives back every
pooled connection it took."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Iterator

import psycopg
import pytest
from asgiref.sync import SyncToAsync
from django.conf import settings
from django.db import connections
from django.db.backends.postgresql.base import DatabaseWrapper
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

# How long a pool may take to see its connections come back (returns from other
# threads, a pool that is still filling up) before a test is blamed for a leak.
LEAK_CHECK_TIMEOUT = 2.0

# pytest-django's fixtures that give a test the database (the django_db marker
# requests one of them too).
DATABASE_FIXTURES = frozenset(
    {
        "db",
        "transactional_db",
        "django_db_reset_sequences",
        "django_db_serialized_rollback",
    }
)


# --- the server --------------------------------------------------------------------


@functools.cache
def server_version() -> str:
    """``SELECT version()`` over a plain psycopg connection to the configured server."""
    try:
        with psycopg.connect(settings.DATABASE_URL, connect_timeout=10) as conn:
            row = conn.execute("SELECT version()").fetchone()
    except psycopg.Error as exc:
        raise pytest.UsageError(
            f"Cannot connect to the test database server ({describe_url()}, "
            f"from {settings.DATABASE_SOURCE}): {exc}\n"
            "Set ASGI_DBSET_TEST_DSN=postgresql://user@host:port/db to a server you "
            "can reach, or unset it (and DATABASE_URL) to use the embedded server."
        ) from exc
    version = str(row[0]) if row else ""
    if not version.startswith("PostgreSQL"):
        raise pytest.UsageError(
            f"{describe_url()} is not PostgreSQL ({version!r}); asgi_dbset needs it."
        )
    return version


def describe_url() -> str:
    """The server's address without its password."""
    params = conninfo_to_dict(settings.DATABASE_URL)
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    user, dbname = params.get("user", ""), params.get("dbname", "")
    if host.startswith("/"):
        return f"database {dbname!r} as {user!r} over the socket in {host}"
    return f"{user}@{host}:{port}/{dbname}"


def pytest_sessionstart(session: pytest.Session) -> None:
    for alias in settings.DATABASES:
        vendor = connections[alias].vendor
        if vendor != "postgresql":
            raise pytest.UsageError(
                f"DATABASES[{alias!r}] uses {vendor}; the suite runs on PostgreSQL only."
            )
    server_version()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"database: {describe_url()} from {settings.DATABASE_SOURCE}: "
        f"{server_version().split(',')[0]}"
    ]


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Leave out soak tests unless the -m expression names them."""
    if "soak" in (config.option.markexpr or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


# --- pooled connections go back ---------------------------------------------------


def close_shared_thread_connections(timeout: float = 10.0) -> None:
    """Close the connections Django opened in asgiref's process-wide sync thread.

    Thread-sensitive ``sync_to_async`` calls made outside any request (an async test
    that awaits ``Model.objects.acount()``) run on
    ``SyncToAsync.single_thread_executor``, and stock Django never closes a connection
    opened there: it stays checked out of the pool for the life of the process. That
    is Django's doing, not the test's, so it is closed before anything is counted.
    """
    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout)


def held_by_this_thread(alias: str) -> int:
    """Connections of ``alias`` that the calling thread's Django wrappers hold open."""
    return sum(
        1
        for conn in connections.all(initialized_only=True)
        if conn.alias == alias and conn.connection is not None
    )


def checked_out(pool: ConnectionPool) -> int:
    stats = pool.get_stats()  # zero-valued keys may be missing
    return stats.get("pool_size", 0) - stats.get("pool_available", 0)


def pool_leaks(timeout: float = LEAK_CHECK_TIMEOUT) -> dict[str, str]:
    """Describe every Django pool that lends out more than this thread holds.

    Returns an empty dict once each pool's checked-out count equals the connections
    held by the calling thread (the test's own, e.g. inside its transaction), polling
    for up to ``timeout`` seconds; otherwise alias -> description with the stats.
    """
    close_shared_thread_connections()
    deadline = time.monotonic() + timeout
    while True:
        problems = {}
        for alias, pool in sorted(DatabaseWrapper._connection_pools.items()):
            held = held_by_this_thread(alias)
            out = checked_out(pool)
            if out != held:
                problems[alias] = (
                    f"{alias!r}: {out} connection(s) checked out of the pool, "
                    f"{held} held by the test's thread; stats {pool.get_stats()}"
                )
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(0.02)


def discard_pools(aliases: Iterable[str]) -> None:
    """Replace leaking pools, so one leak does not fail every later test too.

    Django opens a fresh pool on next use; connections still out of the old one are
    closed when they are returned to it, and the test's own connection is returned
    to the pool it came from (Django keeps a reference to it).
    """
    for alias in aliases:
        pool = DatabaseWrapper._connection_pools.pop(alias, None)
        if pool is not None:
            pool.close(timeout=1.0)


def uses_database(request: pytest.FixtureRequest) -> bool:
    return request.node.get_closest_marker(
        "django_db"
    ) is not None or not DATABASE_FIXTURES.isdisjoint(request.fixturenames)


@pytest.fixture(scope="session", autouse=True)
def _pgbouncer_lets_test_databases_go(
    request: pytest.FixtureRequest,
) -> Iterator[None]:
    """Through PgBouncer, close its server connections to the test databases
    before they are dropped (it keeps them pooled)."""
    bouncer = getattr(settings, "PGBOUNCER", None)
    if bouncer is None:
        yield
        return
    request.getfixturevalue("django_db_setup")
    yield
    for alias in settings.DATABASES:
        bouncer.close_server_connections(connections[alias].settings_dict["NAME"])


class _ReturnsInTransaction(logging.Handler):
    """Counts the connections a pool rolled back as they came back to it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("rolling back returned connection"):
            self.count += 1


@pytest.fixture(autouse=True)
def no_connection_returned_in_a_transaction() -> Iterator[None]:
    """Fail a test during which a pool had to roll back a connection given
    back inside a transaction (psycopg_pool warns as it does so)."""
    handler = _ReturnsInTransaction()
    pool_logger = logging.getLogger("psycopg.pool")
    pool_logger.addHandler(handler)
    try:
        yield
    finally:
        pool_logger.removeHandler(handler)
    if handler.count:
        pytest.fail(
            f"{handler.count} connection(s) went back to their pool inside a "
            "transaction during the test",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def pool_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a database test that leaves a pooled connection checked out."""
    yield
    if not uses_database(request):
        return
    problems = pool_leaks()
    if problems:
        discard_pools(problems)
        pytest.fail(
            "The test left pooled connections checked out:\n  "
            + "\n  ".join(problems.values()),
            pytrace=False,
        )
