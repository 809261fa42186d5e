"""Django settings of the server process that the reliability tests start.

Everything that varies between scenarios comes from the environment, set by
:class:`tests.reliability.server.Server`:

``REL_DB_URL``         libpq URL of the PostgreSQL server
``REL_DB_NAME``        database name (the test database of the pytest process)
``REL_APP_NAME``       ``application_name`` of every pooled connection
``REL_POOL``           JSON ``OPTIONS["pool"]``, e.g. ``{"min_size": 2, "max_size": 10}``
``REL_ASGI_DBSET``     JSON ``ASGI_DBSET``
``REL_STOCK``          ``1``: serve plain Django, without asgi_dbset at all
``REL_HEALTH_CHECKS``  ``1``: ``CONN_HEALTH_CHECKS`` (the pool checks on every getconn)
``REL_TRANSACTION_POOLED`` ``1``: REL_DB_URL is a PgBouncer in transaction pooling mode
"""

from __future__ import annotations

import json
import logging
import os

from example_site.dbserver import django_database

STOCK = os.environ.get("REL_STOCK", "") == "1"

_database = django_database(
    os.environ["REL_DB_URL"],
    name=os.environ.get("REL_DB_NAME") or None,
    pool=json.loads(os.environ.get("REL_POOL", '{"min_size": 2, "max_size": 10}')),
    application_name=os.environ["REL_APP_NAME"],
)
_database["CONN_HEALTH_CHECKS"] = os.environ.get("REL_HEALTH_CHECKS", "") == "1"
DATABASES = {"default": _database}

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    *([] if STOCK else ["asgi_dbset"]),
    "tests.testapp",
]
ASGI_DBSET = json.loads(os.environ.get("REL_ASGI_DBSET", "{}"))
if os.environ.get("REL_TRANSACTION_POOLED", "") == "1":
    # What Django and asgi_dbset need behind PgBouncer's transaction pooling.
    _database["DISABLE_SERVER_SIDE_CURSORS"] = True
    _database["OPTIONS"]["prepare_threshold"] = None
    if not STOCK:
        ASGI_DBSET.setdefault("TRANSACTION_POOLED", ["default"])

SECRET_KEY = "asgi-dbset-reliability-not-secret"
DEBUG = False
USE_TZ = True
ROOT_URLCONF = "tests.reliability.views"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
MIDDLEWARE: list[str] = []


class OneLine(logging.Formatter):
    """``LEVEL logger: message | ExceptionClass: first line [SQLSTATE]``.

    Errors go to the server's log file, where the tests look for SQLSTATEs
    such as 53300 (too many clients); one line each keeps soak logs small.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc: BaseException | None = record.exc_info[1]
            while exc is not None:
                first = (str(exc).splitlines() or [""])[0]
                sqlstate = getattr(exc, "sqlstate", None)
                line += f" | {type(exc).__name__}: {first}"
                if sqlstate:
                    line += f" [SQLSTATE {sqlstate}]"
                exc = exc.__cause__
        return line


LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"()": OneLine}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line"}},
    "loggers": {
        "django.request": {
            "handlers": ["stderr"],
            "level": "ERROR",
            "propagate": False,
        },
        "asgi_dbset": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}
