"""Django settings for the test suite.

The server comes from, in order: ``ASGI_DBSET_TEST_DSN``, ``DATABASE_URL``, or the
embedded PostgreSQL in ``<repo>/.pgdata/`` (started on first use, then reused).
Tests never skip for want of a database: without one, importing this module fails.
"""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

from example_site.dbserver import (
    DatabaseServerError,
    django_database,
    embedded_database_url,
)


def _server_url() -> tuple[str, str]:
    for variable in ("ASGI_DBSET_TEST_DSN", "DATABASE_URL"):
        url = os.environ.get(variable, "").strip()
        if url:
            return url, variable
    try:
        return embedded_database_url(), "embedded"
    except DatabaseServerError as exc:
        raise ImproperlyConfigured(
            "The tests need a PostgreSQL server and none is available: "
            f"{exc}\nEither set ASGI_DBSET_TEST_DSN=postgresql://user@host:port/db "
            "(the role must be allowed to create databases), "
            "or run `pip install pgserver` to use the embedded server."
        ) from exc


# Where the server came from: "ASGI_DBSET_TEST_DSN", "DATABASE_URL" or "embedded".
DATABASE_URL, DATABASE_SOURCE = _server_url()

# Lets two runs share one server (two checkouts, a matrix run beside a dev run).
_SUFFIX = os.environ.get("ASGI_DBSET_TEST_DB_SUFFIX", "")

# ASGI_DBSET_TEST_PGBOUNCER=1 (the matrix's PgBouncer cell): Django's
# connections go through a PgBouncer in transaction pooling mode, started here
# for the run. DATABASE_URL stays the server's own: the tests watch the server
# (pg_stat_activity) and write beside the app from there.
PGBOUNCER = None
APP_DATABASE_URL = DATABASE_URL
if os.environ.get("ASGI_DBSET_TEST_PGBOUNCER") == "1":
    from tests.pgbouncer import in_front_of

    PGBOUNCER, APP_DATABASE_URL = in_front_of(DATABASE_URL, pool_size=10)
    _SUFFIX += "_pgb"

_POOL = {"min_size": 2, "max_size": 8, "timeout": 10}

DATABASES = {
    "default": {
        **django_database(
            APP_DATABASE_URL, pool=_POOL, application_name="asgi_dbset_tests"
        ),
        "TEST": {"NAME": f"test_asgi_dbset{_SUFFIX}"},
    },
    "other": {
        **django_database(
            APP_DATABASE_URL, pool=_POOL, application_name="asgi_dbset_tests"
        ),
        "TEST": {"NAME": f"test_asgi_dbset_other{_SUFFIX}"},
    },
}

if PGBOUNCER is not None:
    for _entry in DATABASES.values():
        # What a transaction-pooled alias needs (checks E015, E016).
        _entry["DISABLE_SERVER_SIDE_CURSORS"] = True
        _entry["OPTIONS"]["prepare_threshold"] = None
    ASGI_DBSET = {"TRANSACTION_POOLED": ["default", "other"]}

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    # Database-backed sessions, for the auth and session entry points
    # (tests/test_auth_sessions.py).
    "django.contrib.sessions",
    "asgi_dbset",
    "tests.testapp",
    # The example shop's models, for tests/example/ (one small migration).
    "example_site.shop",
]

SECRET_KEY = "asgi-dbset-tests-not-secret"
USE_TZ = True
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
MIDDLEWARE: list[str] = []
