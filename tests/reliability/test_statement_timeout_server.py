"""4.5 Statement timeouts in a server process, beside requests that have none.

``tests/test_statement_timeout.py`` proves the limit in process. Here, under
concurrent load on a fixed pool: a view decorated with
``db_parallelism(3, statement_timeout=0.2)`` gets a clear error for its slow
query and answers from the others, while plain requests - which reuse the very
same pooled connections - never see that limit; and no connection is lost.
The ``STATEMENT_TIMEOUT`` setting bounds a plain view's query the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import Report, ServerFactory
from tests.reliability.load import drive
from tests.reliability.pgwatch import ActivityWatch, backends
from tests.reliability.server import quiet

TIMED_OUT = "error: canceling statement due to statement timeout"


def mixed_timeouts(
    serve: ServerFactory,
    dsn: str,
    app_name: str,
    workdir: Path,
    *,
    clients: int,
    per_client: int,
    pool_size: int,
    budget: int,
) -> dict[str, Any]:
    assert 2 * clients + budget <= pool_size  # no call ever waits for the pool
    pool = {"min_size": pool_size, "max_size": pool_size, "timeout": 10}
    server = serve(pool=pool, asgi_dbset={"BUDGET": budget})
    assert server.get("/gathered/?sleep=0.01")[0] == 200
    server.wait_quiet()
    before = {b.pid for b in backends(dsn, app_name)}
    plan = {
        "port": server.port,
        "clients": clients,
        "per_client": per_client,
        "timeout": 30,
        "deadline": 900,
        "requests": [
            {
                "label": "bounded",
                "path": "/bounded/?sleeps=5,0.01,0.05",
                "keep_body": True,
            },
            {"label": "unbounded", "path": "/statement-timeout/", "keep_body": True},
            {"label": "gathered", "path": "/gathered/?sleep=0.3", "expect": {"n": 3}},
        ],
    }
    with ActivityWatch(dsn, app_name) as watch:
        result = drive(plan, workdir, timeout=900)
    state = server.wait_quiet()
    assert result["error_count"] == 0, result["errors"]
    assert result["wrong_count"] == 0, result["wrong"]
    assert set(result["statuses"]["bounded"]) == {"200"}
    assert set(result["statuses"]["unbounded"]) == {"200"}
    assert set(result["statuses"]["gathered"]) == {"200"}
    # The slow query failed with the server's own message; the others answered.
    outcomes = {tuple(body["outcomes"]) for body in result["bodies"]["bounded"]}
    assert outcomes == {(TIMED_OUT, "ok", "ok")}, outcomes
    # No plain request ever got a connection with the set's limit left on it.
    seen = {body["statement_timeout"] for body in result["bodies"]["unbounded"]}
    assert seen == {"0"}, seen
    # Nothing ran past the limit but the 0.3 s gathers (the limit is 0.2 s).
    assert watch.max_active_seconds < 1.0, watch.max_active_seconds
    assert quiet(state), state
    if not server.config.transaction_pooled:  # (PgBouncer's own connections vary)
        assert {b.pid for b in backends(dsn, app_name)} == before
    return {
        "requests": result["requests"],
        "statuses": result["statuses"],
        "timed_out_queries": len(result["bodies"]["bounded"]),
        "plain_connections_checked": len(result["bodies"]["unbounded"]),
        "distinct_backends_checked": len(
            {body["pid"] for body in result["bodies"]["unbounded"]}
        ),
        "max_connections": watch.max_total,
        "oldest_query_seconds": round(watch.max_active_seconds, 3),
    }


def test_statement_timeouts_under_load(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = mixed_timeouts(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=3,
        per_client=15,
        pool_size=8,
        budget=2,
    )
    report(figures)


@pytest.mark.soak
def test_statement_timeouts_under_load_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = mixed_timeouts(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=4,
        per_client=300,
        pool_size=10,
        budget=2,
    )
    report(figures)


def test_the_setting_bounds_a_plain_view(serve: ServerFactory) -> None:
    server = serve(asgi_dbset={"STATEMENT_TIMEOUT": 0.2})
    status, _ = server.get("/plain/?sleep=5")
    assert status == 500
    assert any(
        "QueryCanceled: canceling statement due to statement timeout" in line
        for line in server.log_lines("ERROR django.request")
    ), server.log_tail()
    # The same server keeps answering, within the limit.
    for _ in range(5):
        status, body = server.get("/plain/?sleep=0.01")
        assert status == 200, body
    assert quiet(server.wait_quiet())
