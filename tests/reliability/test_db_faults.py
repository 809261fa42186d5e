"""4.4 Database faults: backends terminated mid-load, the server restarted mid-load.

Requests fail cleanly (a 500 answer, never a hang or a dropped connection) or
succeed; a connection that broke is never handed to another query; the pool
recovers by itself. The servers run with ``CONN_HEALTH_CHECKS = True``, so
that the pool checks a connection before lending it: without it psycopg lends
a connection whose backend died while it sat idle in the pool, and the
query that gets it fails (stock Django behaves the same).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import DatabaseError, connections

from asgi_dbset import connection_set, get_stats
from asgi_dbset.budget import budget
from asgi_dbset.lanes import PooledLane
from tests.reliability.conftest import Report, ServerFactory, too_many_clients
from tests.reliability.load import Load
from tests.reliability.pgcluster import Cluster
from tests.reliability.pgwatch import ActivityWatch, backends, connect
from tests.reliability.server import Server, ServerConfig, quiet
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


# --- in process: a broken lane is retired, never reused ----------------------------


async def backend_pid(seconds: float = 0.0) -> int:
    rows = Author.objects.raw(
        "SELECT pg_backend_pid() AS id, '' AS name FROM pg_sleep(%s)", [seconds]
    )
    return next(iter([row.id async for row in rows]))


async def lane_backend_pid(lane: PooledLane) -> int:
    """The backend of a pooled lane's connection, read on the lane's thread."""

    def read() -> int:
        return int(connections[lane.alias or "default"].connection.info.backend_pid)

    return await asyncio.get_running_loop().run_in_executor(lane.worker, read)


def terminate(pids: list[int]) -> None:
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", [pid])


async def test_a_lane_whose_backend_died_is_retired_and_never_reused() -> None:
    discarded = get_stats()["connections_discarded"]
    async with connection_set(parallelism=3) as dbset:
        await asyncio.gather(*(backend_pid(0.2) for _ in range(3)))
        extra = [lane for lane in dbset.lanes if isinstance(lane, PooledLane)]
        assert len(extra) == 2
        dead = [await lane_backend_pid(lane) for lane in extra]
        await asyncio.to_thread(terminate, dead)
        # The first call on each dead lane fails; lane 0 is untouched.
        results = await asyncio.gather(
            *(backend_pid() for _ in range(3)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 2, results
        assert all(isinstance(f, DatabaseError) for f in failures), failures
        # Those lanes are gone; new ones, on new backends, serve the next calls.
        for _ in range(3):
            pids = await asyncio.gather(*(backend_pid(0.1) for _ in range(3)))
            assert not set(pids) & set(dead), (pids, dead)
        assert all(lane not in dbset.lanes for lane in extra)
        assert len(dbset.lanes) == 3
    assert get_stats()["connections_discarded"] == discarded + 2
    assert budget.total == 0


async def test_a_backend_killed_mid_query_fails_only_that_call() -> None:
    async with connection_set(parallelism=3) as dbset:
        await asyncio.gather(*(backend_pid(0.2) for _ in range(3)))
        lane = next(lane for lane in dbset.lanes if isinstance(lane, PooledLane))
        victim = await lane_backend_pid(lane)

        async def kill_soon() -> None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(terminate, [victim])

        rows = Author.objects.raw(
            "SELECT pg_backend_pid() AS id, '' AS name FROM pg_sleep(1)"
        )
        queries = [_first_id(rows) for _ in range(3)]
        *results, _ = await asyncio.gather(
            *queries, kill_soon(), return_exceptions=True
        )
        assert sum(isinstance(r, DatabaseError) for r in results) == 1, results
        assert victim not in await asyncio.gather(*(backend_pid() for _ in range(3)))
    assert budget.total == 0


async def _first_id(rows: Any) -> int:
    return next(iter([row.id async for row in rows]))


# --- a server under load ---------------------------------------------------------


class Killer(threading.Thread):
    """Terminate one random backend of ``app_name`` every ``every`` seconds
    (every other one chosen among those running a query), at most
    ``max_kills`` times, until stopped."""

    def __init__(self, dsn: str, app_name: str, every: float, max_kills: int) -> None:
        super().__init__(name="killer", daemon=True)
        self.dsn, self.app_name = dsn, app_name
        self.every, self.max_kills = every, max_kills
        self.killed: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        rng = random.Random(4)
        with connect(self.dsn) as conn:
            while not self.stopped.is_set() and len(self.killed) < self.max_kills:
                only_active = len(self.killed) % 2 == 0
                rows = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                    + (" AND state = 'active'" if only_active else ""),
                    [self.app_name],
                ).fetchall()
                if rows:
                    pid = rng.choice(rows)[0]
                    row = conn.execute(
                        "SELECT pg_terminate_backend(%s)", [pid]
                    ).fetchone()
                    if row and row[0]:
                        self.killed.append(pid)
                self.stopped.wait(self.every)


def load_plan(port: int, clients: int, seconds: float) -> dict[str, Any]:
    return {
        "port": port,
        "clients": clients,
        "per_client": 100_000,
        "deadline": seconds,
        "timeout": 30,
        "requests": [
            {"label": "gathered", "path": "/gathered/?sleep=0.05", "expect": {"n": 3}},
            {"label": "plain", "path": "/plain/?sleep=0.02", "expect": {"n": 1}},
        ],
    }


def recovers(server: Server, within: float, then: int = 20) -> dict[str, Any]:
    """Wait until a request succeeds, then require ``then`` successes in a row."""
    started = time.monotonic()
    deadline = started + within
    while True:
        status, _ = server.get("/gathered/?sleep=0.01", timeout=30)
        if status == 200:
            break
        assert time.monotonic() < deadline, f"no recovery within {within} s"
        time.sleep(0.2)
    recovered_after = time.monotonic() - started
    for _ in range(then):
        status, body = server.get("/gathered/?sleep=0.01", timeout=30)
        assert status == 200, body
        assert body["n"] == 3
    return {"recovered_after_s": round(recovered_after, 2), "then_ok": then}


def check_clean(result: dict[str, Any], pool_timeout: float) -> None:
    """Every request was answered: right, or a clean 500 within the pool timeout."""
    assert result["error_count"] == 0, result["errors"]
    assert result["wrong_count"] == 0, result["wrong"]
    for label, statuses in result["statuses"].items():
        assert set(statuses) <= {"200", "500"}, (label, statuses)
        assert max(result["latencies"][label]) < pool_timeout + 5, label


def failures(result: dict[str, Any]) -> int:
    return sum(s.get("500", 0) for s in result["statuses"].values())


def terminate_mid_load(
    serve: ServerFactory,
    dsn: str,
    app_name: str,
    workdir: Path,
    *,
    clients: int,
    seconds: float,
    every: float,
    max_kills: int,
) -> dict[str, Any]:
    pool = {"min_size": 4, "max_size": 8, "timeout": 10}
    server = serve(pool=pool, health_checks=True)
    with (
        ActivityWatch(dsn, app_name) as watch,
        Load(load_plan(server.port, clients, seconds), workdir) as load,
    ):
        killer = Killer(dsn, app_name, every, max_kills)
        killer.start()
        try:
            result = load.wait(timeout=seconds + 120)
        finally:
            killer.stopped.set()
            killer.join(30)
    check_clean(result, pool_timeout=10)
    # Each kill breaks at most the one request whose query it interrupts.
    assert failures(result) <= len(killer.killed), (
        failures(result),
        len(killer.killed),
    )
    recovery = recovers(server, within=30)
    state = server.wait_quiet()
    assert quiet(state), state
    assert too_many_clients(server) == []
    assert watch.max_total <= pool["max_size"], watch.max_total
    assert len(backends(dsn, app_name)) == state["pool"]["pool_size"]
    assert state["pool"]["pool_size"] >= pool["min_size"]
    return {
        "requests": result["requests"],
        "statuses": result["statuses"],
        "kills": len(killer.killed),
        "failed_requests": failures(result),
        "max_connections": watch.max_total,
        "discarded_lanes": state["counters"]["connections_discarded"],
        "pool_connections_lost": state["pool"].get("connections_lost", 0),
        **recovery,
    }


def test_backends_terminated_mid_load(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = terminate_mid_load(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=6,
        seconds=4,
        every=0.2,
        max_kills=15,
    )
    assert figures["kills"] >= 5
    report(figures)


@pytest.mark.soak
def test_backends_terminated_mid_load_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = terminate_mid_load(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=20,
        seconds=60,
        every=0.2,
        max_kills=300,
    )
    assert figures["kills"] >= 100
    report(figures)


# --- restarting a server of our own ----------------------------------------------


def restart_mid_load(
    workdir: Path,
    app_name: str,
    *,
    clients: int,
    downtimes: list[float],
    between: float,
) -> dict[str, Any]:
    pool = {"min_size": 2, "max_size": 6, "timeout": 3}
    figures: dict[str, Any] = {"restarts": 0, "recoveries": []}
    with Cluster() as pg:
        config = ServerConfig(
            db_url=pg.url, app_name=app_name, pool=pool, health_checks=True
        )
        with (
            Server(config, workdir / "server.log") as server,
            ActivityWatch(pg.url, app_name) as watch,
        ):
            assert server.get("/gathered/?sleep=0.01")[0] == 200
            seconds = between * (len(downtimes) + 1) + sum(downtimes)
            with Load(load_plan(server.port, clients, seconds), workdir) as load:
                for downtime in downtimes:
                    time.sleep(between)
                    pg.restart(downtime)
                result = load.wait(timeout=seconds + 120)
            check_clean(result, pool_timeout=pool["timeout"])
            figures["recoveries"].append(recovers(server, within=30))
            state = server.wait_quiet()
            assert quiet(state), json.dumps(state)  # the whole state: what stayed out
            assert watch.max_total <= pool["max_size"], watch.max_total
            assert len(backends(pg.url, app_name)) == state["pool"]["pool_size"]
            figures.update(
                restarts=pg.restarts,
                requests=result["requests"],
                statuses=result["statuses"],
                failed_requests=failures(result),
                max_connections=watch.max_total,
                slowest_answer_s=max(max(v) for v in result["latencies"].values()),
                discarded_lanes=state["counters"]["connections_discarded"],
                lease_failures=state["counters"]["lease_failures"],
            )
            assert figures["failed_requests"] < result["requests"]
    return figures


def test_server_restarted_mid_load(
    tmp_path: Path, app_name: str, report: Report
) -> None:
    figures = restart_mid_load(
        tmp_path, app_name, clients=4, downtimes=[1.0], between=2.0
    )
    assert figures["restarts"] == 1
    report(figures)


@pytest.mark.soak
def test_server_restarted_mid_load_soak(
    tmp_path: Path, app_name: str, report: Report
) -> None:
    figures = restart_mid_load(
        tmp_path, app_name, clients=12, downtimes=[0.2, 0.5, 1.0, 2.0, 4.0], between=8.0
    )
    assert figures["restarts"] == 5
    report(figures)
