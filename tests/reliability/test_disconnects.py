"""4.2 Client disconnects in the middle of a gathered request.

The server cancels the dropped request's running queries promptly (none is
still ``active`` a second after the drop), returns its lanes, and after all
the drops the pool holds the very same server connections as before: a
cancel costs no connection.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import Report, ServerFactory
from tests.reliability.load import Load
from tests.reliability.pgwatch import ActivityWatch, backends, wait_for
from tests.reliability.server import Server, quiet

POOL = {"min_size": 8, "max_size": 8, "timeout": 10}
# Each request holds at most 3 connections (parallelism 3); with at most
# BUDGET extra lanes in the process, CLIENTS requests at once fit the pool, so
# no dropped call is still waiting for a connection when it is dropped.
BUDGET = 4
CLIENTS = 2
AFTER = 0.25  # seconds a client waits before it drops the connection


def warm(server: Server) -> None:
    """Open the whole (fixed-size) pool and lease some lanes once."""
    for _ in range(3):
        status, _ = server.get("/gathered/?sleep=0.05")
        assert status == 200
    state = server.wait_quiet()
    assert quiet(state), state
    deadline = time.monotonic() + 10
    while server.state()["pool"].get("pool_size", 0) < POOL["max_size"]:
        assert time.monotonic() < deadline, server.state()
        time.sleep(0.05)


def drop_many(
    server: Server, *, dsn: str, app_name: str, drops_per_client: int, workdir: Path
) -> dict[str, Any]:
    before = {b.pid for b in backends(dsn, app_name)}
    plan = {
        "port": server.port,
        "clients": CLIENTS,
        "per_client": drops_per_client,
        "timeout": 30,
        "deadline": 900,
        "requests": [
            # Dropped while its three 30 s queries run on three lanes.
            {
                "label": "drop",
                "path": "/gathered/?sleep=30",
                "kind": "disconnect",
                "after": AFTER,
            },
        ],
    }
    cancels_before = server.state()["counters"]["cancels"]
    with ActivityWatch(dsn, app_name) as watch, Load(plan, workdir, "drops") as load:
        result = load.wait(timeout=900)
    # A second after the last drop, nothing of the app runs on the server.
    remaining = max(0.0, result["last_end"] + 1.0 - time.time())
    still = wait_for(
        dsn, app_name, lambda bs: not any(b.state == "active" for b in bs), remaining
    )
    state = server.wait_quiet()
    return {
        "drops": result["statuses"]["drop"].get("dropped", 0),
        "client_errors": result["errors"],
        "active_a_second_later": [b for b in still if b.state == "active"],
        "max_connections": watch.max_total,
        "max_active": watch.max_active,
        "oldest_query_seconds": round(watch.max_active_seconds, 3),
        "before": before,
        "after": {b.pid for b in backends(dsn, app_name)},
        "state": state,
        "cancels": state["counters"]["cancels"] - cancels_before,
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    figures = {k: v for k, v in result.items() if k not in {"before", "after", "state"}}
    figures["connections_before"] = len(result["before"])
    figures["connections_after"] = len(result["after"])
    figures["same_connections"] = result["before"] == result["after"]
    figures["active_a_second_later"] = len(result["active_a_second_later"])
    return figures


def check(result: dict[str, Any], drops: int, *, pgbouncer: bool = False) -> None:
    assert result["client_errors"] == []
    assert result["drops"] == drops
    assert result["active_a_second_later"] == []
    # Every drop's queries were cancelled within a second: no query of the app
    # ever ran for longer than the client waited before dropping, plus 1 s.
    assert result["oldest_query_seconds"] < AFTER + 1.0, result["oldest_query_seconds"]
    assert result["max_connections"] <= POOL["max_size"]
    assert quiet(result["state"]), result["state"]
    # The same server connections as before: no cancel cost a connection.
    # (Behind PgBouncer the server's connections are PgBouncer's, opened as
    # it sees fit.)
    if not pgbouncer:
        assert result["after"] == result["before"]
    assert result["state"]["pool"].get("connections_lost", 0) == 0
    assert result["cancels"] >= drops, result["cancels"]


def test_disconnects(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    server = serve(pool=POOL, asgi_dbset={"BUDGET": BUDGET})
    warm(server)
    result = drop_many(
        server, dsn=watch_dsn, app_name=app_name, drops_per_client=10, workdir=tmp_path
    )
    check(result, drops=CLIENTS * 10, pgbouncer=server.config.transaction_pooled)
    # The next requests on the same server are unaffected.
    status, body = server.get("/gathered/?sleep=0.05")
    assert status == 200
    assert body["lanes_used"] == 3
    report(summary(result))


@pytest.mark.soak
def test_disconnects_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    """1,000 dropped gathered requests."""
    server = serve(pool=POOL, asgi_dbset={"BUDGET": BUDGET})
    warm(server)
    result = drop_many(
        server, dsn=watch_dsn, app_name=app_name, drops_per_client=500, workdir=tmp_path
    )
    check(result, drops=1000)
    status, body = server.get("/gathered/?sleep=0.05")
    assert status == 200
    assert body["lanes_used"] == 3
    report(summary(result))


def crowded_drops(
    serve: ServerFactory,
    dsn: str,
    app_name: str,
    workdir: Path,
    *,
    clients: int,
    per_client: int,
) -> dict[str, Any]:
    """More clients than the pool holds, each dropping gathered requests: many
    drops land while the request still waits for its first connection. None
    of their queries may start after the drop, or run on a second later."""
    pool = {"min_size": 4, "max_size": 4, "timeout": 10}
    server = serve(pool=pool, asgi_dbset={"BUDGET": 2})
    assert server.get("/gathered/?sleep=0.05")[0] == 200
    plan = {
        "port": server.port,
        "clients": clients,
        "per_client": per_client,
        "timeout": 30,
        "deadline": 900,
        "requests": [
            {
                "label": "drop",
                "path": "/gathered/?sleep=30",
                "kind": "disconnect",
                "after": AFTER,
            }
        ],
    }
    with ActivityWatch(dsn, app_name) as watch, Load(plan, workdir, "crowded") as load:
        result = load.wait(timeout=900)
    remaining = max(0.0, result["last_end"] + 1.0 - time.time())
    still = wait_for(
        dsn, app_name, lambda bs: not any(b.state == "active" for b in bs), remaining
    )
    state = server.wait_quiet()
    figures = {
        "drops": result["statuses"]["drop"].get("dropped", 0),
        "clients": clients,
        "pool_max_size": pool["max_size"],
        "active_a_second_later": len([b for b in still if b.state == "active"]),
        "oldest_query_seconds": round(watch.max_active_seconds, 3),
        "max_connections": watch.max_total,
        "cancels": state["counters"]["cancels"],
    }
    assert result["error_count"] == 0, result["errors"]
    assert figures["drops"] == clients * per_client
    assert figures["active_a_second_later"] == 0, still
    # A query that started late (after its client left) would run for 30 s.
    assert watch.max_active_seconds < AFTER + 1.0, watch.max_active_seconds
    assert watch.max_total <= pool["max_size"]
    assert quiet(state), state
    return figures


def test_drops_while_waiting_for_the_pool(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    """Found by these proofs on 8f511d6: a request dropped while it waited for
    the pool ran its 30 s query once a connection freed up. Fixed in d8a8e3e."""
    report(
        crowded_drops(serve, watch_dsn, app_name, tmp_path, clients=12, per_client=3)
    )


@pytest.mark.soak
def test_drops_while_waiting_for_the_pool_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    report(
        crowded_drops(serve, watch_dsn, app_name, tmp_path, clients=40, per_client=25)
    )
