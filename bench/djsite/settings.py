"""Settings of the benchmark site; ``BENCH_VARIANT`` picks what is measured.

- ``stock``: Django as shipped, asgi_dbset not installed, no middleware;
- ``dbset``: the same views behind ``DBSetMiddleware`` (``bench.djsite.asgi``);
- ``dab``: django-async-backend's ENGINE; the views use ``async_objects``
  and wrap each call in ``async_new_connection``.

The pool, the views and the SQL are the same for all three.
"""

from __future__ import annotations

import os

from bench.config import DB_NAME, POOL, server_params

VARIANT = os.environ.get("BENCH_VARIANT", "stock")
if VARIANT not in {"stock", "dbset", "dab"}:
    raise RuntimeError(f"BENCH_VARIANT must be stock, dbset or dab, not {VARIANT!r}.")

_server = server_params()

SECRET_KEY = "bench-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "bench.djsite.urls"
MIDDLEWARE: list[str] = []
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = ["bench.djsite"]
if VARIANT == "dbset":
    INSTALLED_APPS.append("asgi_dbset")
if VARIANT == "dab":
    INSTALLED_APPS.append("django_async_backend")

DATABASES = {
    "default": {
        "ENGINE": (
            "django_async_backend.db.backends.postgresql"
            if VARIANT == "dab"
            else "django.db.backends.postgresql"
        ),
        "NAME": DB_NAME,
        "USER": _server.pop("user", ""),
        "PASSWORD": _server.pop("password", ""),
        "HOST": _server.pop("host", ""),
        "PORT": _server.pop("port", ""),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            **_server,
            "pool": {
                **POOL,
                # bench.diagnose only: a pool too small for any extra lane.
                **(
                    {"min_size": 1, "max_size": int(os.environ["BENCH_POOL_MAX_SIZE"])}
                    if "BENCH_POOL_MAX_SIZE" in os.environ
                    else {}
                ),
            },
            "application_name": os.environ.get("BENCH_APP_NAME", f"bench_{VARIANT}"),
        },
    }
}

# bench.diagnose pgbouncer: BENCH_DSN points at a PgBouncer in transaction
# pooling mode; what such an alias needs (checks asgi_dbset.E015/E016).
PGBOUNCER = os.environ.get("BENCH_PGBOUNCER") == "1"
if PGBOUNCER:
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = None

# The library's defaults, written out: BUDGET None is max_size // 2 = 8 extra
# connections across the process.
ASGI_DBSET = {
    "DEFAULT_PARALLELISM": 1,
    "MAX_PARALLELISM": 8,
    "BUDGET": None,
    "LEASE_TIMEOUT": 0.1,
    "TRANSACTION_POOLED": ["default"] if PGBOUNCER else [],
}
