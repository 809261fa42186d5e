"""What every benchmark process agrees on: the database, the data, the SQL.

Imported by the harness, the Django site and the Starlette ceiling; it must not
import Django.
"""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: The server; the harness creates DB_NAME on it. Never a test_* database.
SERVER_DSN = os.environ.get(
    "BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DB_NAME = os.environ.get("BENCH_DB", "bench_asgi_dbset")

#: Rows in bench_item (W2 scans them; W1/W3 look one up by primary key).
ROWS = 200_000
#: Server time of one W1/W4 query (seconds), spent in pg_sleep.
SLEEP = 0.02
#: The same pool for every variant (Django's OPTIONS["pool"], the ceiling's
#: AsyncConnectionPool, django-async-backend's pool).
POOL = {"min_size": 4, "max_size": 16, "timeout": 30}

# The SQL Django generates for the views' querysets (the harness checks that
# it still does); the ceiling sends exactly these strings.
_COLUMNS = (
    '"bench_item"."id", "bench_item"."category", "bench_item"."price", '
    '"bench_item"."qty", "bench_item"."name"'
)
#: W1/W4: Item.objects.annotate(slept=RawSQL("bench_sleep(%s)")).aget(pk=...)
SLEEP_SQL = (
    f'SELECT {_COLUMNS}, (bench_sleep(%s)) AS "slept" FROM "bench_item" '
    f'WHERE "bench_item"."id" = %s LIMIT 21'
)
#: W2: Item.objects.filter(qty__gte=...).aaggregate(Sum, Avg, Count)
AGGREGATE_SQL = (
    'SELECT SUM("bench_item"."price") AS "total", AVG("bench_item"."qty") AS '
    '"mean", COUNT("bench_item"."id") AS "n" FROM "bench_item" '
    'WHERE "bench_item"."qty" >= %s'
)
#: W3: Item.objects.aget(pk=...)
LOOKUP_SQL = (
    f'SELECT {_COLUMNS} FROM "bench_item" WHERE "bench_item"."id" = %s LIMIT 21'
)


def pk_for(base: int, i: int) -> int:
    """The i-th row a request looks up: spread out, always present."""
    return 1 + (base + i * 7919) % ROWS


def qty_for(i: int) -> int:
    """The i-th W2 aggregate's filter: each scans the whole table."""
    return i % 50


def db_dsn(application_name: str) -> str:
    return make_conninfo(SERVER_DSN, dbname=DB_NAME, application_name=application_name)


def server_params() -> dict[str, str]:
    """SERVER_DSN as libpq keywords, without the database name."""
    params = {k: str(v) for k, v in conninfo_to_dict(SERVER_DSN).items()}
    params.pop("dbname", None)
    return params
