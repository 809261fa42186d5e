"""4.6 Concurrent writes across lanes commit exactly once.

Each request to ``/writes/?key=K`` gathers five writes on up to four lanes:
``acreate`` of ``new-K``, an ``aupdate`` that adds 1 to the shared ``counter``
row, ``asave`` of ``upd-K`` (value 5), a queryset ``adelete`` of ``del-K`` and
a ``Model.adelete`` of ``mdel-K``. Many clients run them at once; afterwards
the database itself - read over a separate connection - holds exactly the
rows and sums that one commit of each write gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings

from tests.reliability.conftest import (
    Report,
    ServerFactory,
    too_many_clients,
    with_dbname,
)
from tests.reliability.load import drive
from tests.reliability.pgwatch import ActivityWatch
from tests.reliability.server import quiet
from tests.testapp.models import Tally


def seed(keys: list[str]) -> None:
    rows = [Tally(name="counter", value=0)]
    for key in keys:
        rows += [
            Tally(name=f"upd-{key}", value=0),
            Tally(name=f"del-{key}", value=100),
            Tally(name=f"mdel-{key}", value=1000),
        ]
    Tally.objects.bulk_create(rows)


def database_figures() -> dict[str, Any]:
    """Counts and sums, read over a connection of their own."""
    url = with_dbname(settings.DATABASE_URL, settings.DATABASES["default"]["NAME"])
    with psycopg.connect(url, autocommit=True) as conn:

        def one(sql: str) -> Any:
            row = conn.execute(sql).fetchone()
            assert row is not None
            return row[0]

        return {
            "rows": one("SELECT count(*) FROM testapp_tally"),
            "sum": one("SELECT coalesce(sum(value), 0) FROM testapp_tally"),
            "counter": one("SELECT value FROM testapp_tally WHERE name = 'counter'"),
            "new": one("SELECT count(*) FROM testapp_tally WHERE name LIKE 'new-%%'"),
            "new_sum": one(
                "SELECT coalesce(sum(value), 0) FROM testapp_tally WHERE name LIKE 'new-%%'"
            ),
            "saved": one(
                "SELECT count(*) FROM testapp_tally WHERE name LIKE 'upd-%%' AND value = 5"
            ),
            "left_to_delete": one(
                "SELECT count(*) FROM testapp_tally WHERE name LIKE 'del-%%' OR name LIKE 'mdel-%%'"
            ),
        }


def concurrent_writes(
    serve: ServerFactory,
    dsn: str,
    app_name: str,
    workdir: Path,
    *,
    clients: int,
    per_client: int,
    pool: dict[str, Any],
    parallel_share: float,
) -> dict[str, Any]:
    keys = [f"{i}-{j}" for i in range(clients) for j in range(per_client)]
    seed(keys)
    server = serve(pool=pool)
    plan = {
        "port": server.port,
        "clients": clients,
        "per_client": per_client,
        "timeout": 60,
        "deadline": 900,
        "requests": [
            {
                "label": "writes",
                "path": "/writes/?key={client}-{seq}",
                "keep_body": True,
                "expect": {
                    "created": True,
                    "bumped": 1,
                    "saved": 1,
                    "deleted": 1,
                    "model_deleted": 1,
                },
            }
        ],
    }
    with ActivityWatch(dsn, app_name) as watch:
        result = drive(plan, workdir, timeout=900)
    state = server.wait_quiet()
    assert result["error_count"] == 0, result["errors"]
    assert result["statuses"]["writes"] == {"200": len(keys)}, result["statuses"]
    assert result["wrong_count"] == 0, result["wrong"]
    n = len(keys)
    figures = database_figures()
    # Exactly one commit of each write, for every key.
    assert figures == {
        "rows": 1 + 2 * n,
        "sum": n + n * 1 + n * 5,
        "counter": n,
        "new": n,
        "new_sum": n,
        "saved": n,
        "left_to_delete": 0,
    }
    lanes = [body["lanes_used"] for body in result["bodies"]["writes"]]
    # With few clients, many requests got extra lanes (a crowded pool has
    # none to spare: there the proof is exactly-once under contention).
    assert sum(1 for x in lanes if x > 1) >= n * parallel_share, lanes
    assert quiet(state), state
    assert watch.max_total <= pool["max_size"]
    assert too_many_clients(server) == []
    return {
        "requests": n,
        "writes": 5 * n,
        "database": figures,
        "max_lanes_in_a_request": max(lanes),
        "requests_on_several_lanes": sum(1 for x in lanes if x > 1),
        "max_connections": watch.max_total,
    }


def test_concurrent_writes_commit_exactly_once(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = concurrent_writes(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=3,
        per_client=16,
        pool={"min_size": 2, "max_size": 8, "timeout": 10},
        parallel_share=0.25,
    )
    report(figures)


@pytest.mark.soak
def test_concurrent_writes_commit_exactly_once_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    """2,000 requests, 10,000 writes, most of them across lanes."""
    figures = concurrent_writes(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=4,
        per_client=500,
        pool={"min_size": 2, "max_size": 10, "timeout": 10},
        parallel_share=0.25,
    )
    report(figures)


@pytest.mark.soak
def test_concurrent_writes_on_a_crowded_pool_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    """2,000 requests from 50 clients at once on a pool of 10."""
    figures = concurrent_writes(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=50,
        per_client=40,
        pool={"min_size": 2, "max_size": 10, "timeout": 10},
        parallel_share=0.0,
    )
    report(figures)
