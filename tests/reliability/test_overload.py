"""4.1 Overload: many more clients than the pool holds, parallel and plain views.

The server's connections never exceed the pool's ``max_size`` at any sample;
no SQLSTATE 53300; no hang; every answer is right, or a clean error within
the pool timeout; and plain views' p99 latency stays near the same load on
stock Django (the library's cost to requests that do not use it).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import Report, ServerFactory, too_many_clients
from tests.reliability.load import Load, percentile
from tests.reliability.pgwatch import ActivityWatch, backends
from tests.reliability.server import Server, quiet

QUERY = 0.02  # seconds each query sleeps on the server


def plan(port: int, clients: int, per_client: int) -> dict[str, Any]:
    return {
        "port": port,
        "clients": clients,
        "per_client": per_client,
        "timeout": 60,
        "deadline": 600,
        "requests": [
            {
                "label": "gathered",
                "path": f"/gathered/?sleep={QUERY}",
                "expect": {"n": 3},
            },
            {"label": "plain", "path": f"/plain/?sleep={QUERY}", "expect": {"n": 1}},
        ],
    }


def run_side_by_side(
    servers: dict[str, Server],
    *,
    dsn: str,
    clients: int,
    per_client: int,
    workdir: Path,
) -> dict[str, dict[str, Any]]:
    """Drive every server at once with the same load, watching each one's
    connections; return each one's figures.

    Running them together puts the machine's other load on both sides alike.
    """
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        watches = {
            mode: stack.enter_context(ActivityWatch(dsn, server.config.app_name))
            for mode, server in servers.items()
        }
        loads = {
            mode: stack.enter_context(
                Load(plan(server.port, clients, per_client), workdir, mode)
            )
            for mode, server in servers.items()
        }
        for mode, load in loads.items():
            results[mode] = load.wait(timeout=600)
    for mode, server in servers.items():
        state = server.wait_quiet()
        results[mode].update(
            max_connections=watches[mode].max_total,
            max_active=watches[mode].max_active,
            samples=len(watches[mode].samples),
            state=state,
            backends_after=len(backends(dsn, server.config.app_name)),
        )
    return results


def check_overload(
    server: Server, result: dict[str, Any], max_size: int, pool_timeout: float
) -> None:
    requests = result["requests"]
    assert result["samples"] > 10
    # The database never saw more of the app's connections than the pool holds.
    assert result["max_connections"] <= max_size, result
    assert too_many_clients(server) == []
    # Every answer was right, or a clean error response within the pool timeout.
    assert result["error_count"] == 0, result["errors"]
    assert result["wrong_count"] == 0, result["wrong"]
    for label, statuses in result["statuses"].items():
        assert set(statuses) <= {"200", "500"}, (label, statuses)
        if "500" in statuses:
            assert max(result["latencies"][label]) < pool_timeout + 5
    ok = sum(s.get("200", 0) for s in result["statuses"].values())
    assert ok >= requests * 0.99, result["statuses"]
    # Afterwards nothing is out, and every server connection is the pool's.
    assert quiet(result["state"]), result["state"]
    assert result["backends_after"] == result["state"]["pool"]["pool_size"]


def p99(result: dict[str, Any], label: str) -> float:
    return percentile(result["latencies"][label], 0.99)


def test_overload(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    """40 clients against a pool of 4, on stock Django and on the library at once."""
    pool = {"min_size": 2, "max_size": 4, "timeout": 10}
    servers = {
        "stock": serve(pool=pool, stock=True, app_name=f"{app_name}_stock"),
        "lib": serve(pool=pool),
    }
    results = run_side_by_side(
        servers, dsn=watch_dsn, clients=40, per_client=4, workdir=tmp_path
    )
    for mode, server in servers.items():
        check_overload(server, results[mode], max_size=4, pool_timeout=10)
    lib = results["lib"]
    # Under overload requests always wait for the pool, so the sets take no
    # extra lane (it would queue ahead of them): parallelism degrades toward 1
    # and no lease is even attempted in vain (each would wait LEASE_TIMEOUT).
    counters = lib["state"]["counters"]
    assert counters["lease_failures"] <= 0.1 * lib["requests"], counters
    # A loose bound: a fast run is too short for a tight one on a shared machine.
    assert p99(lib, "plain") <= 2 * p99(results["stock"], "plain") + 0.5
    report(figures(results))


def figures(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        mode: {
            "requests": r["requests"],
            "seconds": r["seconds"],
            "max_connections": r["max_connections"],
            "p50_plain": percentile(r["latencies"]["plain"], 0.5),
            "p99_plain": p99(r, "plain"),
            "p99_gathered": p99(r, "gathered"),
            "statuses": r["statuses"],
            "lanes_leased": r["state"]["counters"].get("lanes_leased", 0),
            "lease_failures": r["state"]["counters"].get("lease_failures", 0),
        }
        for mode, r in results.items()
    }


@pytest.mark.soak
def test_overload_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    """300 clients against a pool of 10, stock and library side by side, 3 rounds.

    The issue's bound: plain views' p99 within 10% of stock Django's, taken
    over the latencies of all rounds together. Both servers share the
    machine's two cores, so any extra CPU the library spends per request
    shows up here (docs/reliability.md has the figures and what they mean).
    """
    pool = {"min_size": 2, "max_size": 10, "timeout": 10}
    plain: dict[str, list[float]] = {"stock": [], "lib": []}
    for round_ in range(3):
        workdir = tmp_path / f"round{round_}"
        workdir.mkdir()
        servers = {
            "stock": serve(pool=pool, stock=True, app_name=f"{app_name}_stock{round_}"),
            "lib": serve(pool=pool, app_name=f"{app_name}_lib{round_}"),
        }
        results = run_side_by_side(
            servers, dsn=watch_dsn, clients=300, per_client=10, workdir=workdir
        )
        for mode, server in servers.items():
            server.stop()
            check_overload(server, results[mode], max_size=10, pool_timeout=10)
            plain[mode] += results[mode]["latencies"]["plain"]
        ratio = p99(results["lib"], "plain") / p99(results["stock"], "plain")
        report(
            {"round": round_, **figures(results), "p99_plain_ratio": round(ratio, 3)}
        )
    stock_p99, lib_p99 = (
        percentile(plain["stock"], 0.99),
        percentile(plain["lib"], 0.99),
    )
    report(
        {
            "rounds": 3,
            "plain_requests_each": len(plain["lib"]),
            "p99_plain_stock": stock_p99,
            "p99_plain_lib": lib_p99,
            "p99_plain_ratio": round(lib_p99 / stock_p99, 3),
        }
    )
    assert lib_p99 <= 1.10 * stock_p99, (lib_p99, stock_p99)
