"""4.3 Cancellation at every moment of a set's life, in process and in a server.

``tests/test_cancellation.py`` cancels a gather once, mid-query. Here the
cancel lands at every few milliseconds of a set's life - before a lane is
leased, while leases are in flight, while calls queue, while they run, between
calls - and repeatedly while the set closes. After each: no lane busy, nothing
leased, and the next set on the same workers runs normally.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from django.db import connections

from asgi_dbset import connection_set, get_stats
from asgi_dbset.budget import budget
from tests.helpers import active_sleeps, checked_out, sleeping
from tests.reliability.conftest import Report, ServerFactory
from tests.reliability.load import drive
from tests.reliability.pgwatch import ActivityWatch, backends
from tests.reliability.server import quiet
from tests.test_cancellation import no_sleeps_within

pytestmark = pytest.mark.django_db(transaction=True)

# Cancel after 0, 4, 8, ... 148 ms: before, during and after the leases.
SWEEP = [i * 0.004 for i in range(38)]


async def _gather_under_timeout(
    seconds: float, parallelism: int, statement_timeout: float | None
) -> None:
    async with connection_set(
        parallelism=parallelism, statement_timeout=statement_timeout
    ) as dbset:
        try:
            async with asyncio.timeout(seconds):
                # Twice as many calls as lanes: some queue, some run.
                await asyncio.gather(
                    *(sleeping(0.03).acount() for _ in range(2 * parallelism))
                )
        except TimeoutError:
            pass
    assert dbset.closed
    assert [lane.index for lane in dbset.lanes] == [0]


@pytest.mark.parametrize(
    ("parallelism", "statement_timeout"), [(2, None), (3, None), (3, 5.0)]
)
async def test_a_timeout_at_every_moment(
    parallelism: int, statement_timeout: float | None
) -> None:
    await timeouts_at_every_moment(SWEEP, parallelism, statement_timeout)


@pytest.mark.soak
@pytest.mark.parametrize(
    ("parallelism", "statement_timeout"), [(2, None), (3, None), (3, 5.0), (8, None)]
)
async def test_a_timeout_at_every_moment_soak(
    parallelism: int, statement_timeout: float | None
) -> None:
    """Every millisecond from 0 to 200 ms, three times over."""
    sweep = [i * 0.001 for i in range(201)] * 3
    await timeouts_at_every_moment(sweep, parallelism, statement_timeout)


async def timeouts_at_every_moment(
    sweep: list[float], parallelism: int, statement_timeout: float | None
) -> None:
    await sleeping(0).acount()  # lane 0's own connection is not the sets'
    before = checked_out()
    for seconds in sweep:
        await _gather_under_timeout(seconds, parallelism, statement_timeout)
        assert budget.total == 0, seconds
    assert await no_sleeps_within(1.0)
    assert checked_out() == before
    assert get_stats()["sets_open"] == 0
    assert get_stats()["lanes_open"] == 0
    # The next set, on the same workers, runs normally and in parallel.
    async with connection_set(parallelism=3) as dbset:
        assert (
            await asyncio.gather(*(sleeping(0.05).acount() for _ in range(3)))
            == [0] * 3
        )
        assert dbset.lanes_used == 3


async def test_a_failing_sibling_at_every_moment() -> None:
    async def boom(after: float) -> None:
        await asyncio.sleep(after)
        raise ValueError("boom")

    async def group(after: float) -> None:
        async with asyncio.TaskGroup() as tasks:
            for _ in range(4):
                tasks.create_task(sleeping(0.03).acount())
            tasks.create_task(boom(after))

    for after in SWEEP:
        async with connection_set(parallelism=3):
            with pytest.raises(ExceptionGroup):
                await group(after)
        assert budget.total == 0, after
    assert await no_sleeps_within(1.0)


async def test_cancelled_again_and_again_while_it_closes() -> None:
    """A release path keeps going however often its task is cancelled."""
    leased = asyncio.Event()

    async def request() -> None:
        async with connection_set(parallelism=3) as dbset:
            calls = asyncio.gather(*(sleeping(20).acount() for _ in range(3)))
            for _ in range(1000):  # bounded: 10 s
                if len(dbset.lanes) == 3:
                    break
                await asyncio.sleep(0.01)
            leased.set()
            await calls

    task = asyncio.ensure_future(request())
    await asyncio.wait_for(leased.wait(), 10)
    for _ in range(200):  # bounded: 200 cancels, 1 ms apart
        task.cancel()
        await asyncio.sleep(0.001)
        if task.done():
            break
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
    assert task.cancelled()
    assert budget.total == 0
    assert get_stats()["lanes_open"] == 0
    assert await no_sleeps_within(1.0)


def failures_through_a_server(
    serve: ServerFactory,
    watch_dsn: str,
    app_name: str,
    tmp_path: Path,
    *,
    clients: int,
    per_client: int,
    pool_size: int,
    budget: int,
) -> dict[str, object]:
    """Timeouts, TaskGroup failures and raising views, beside normal requests.

    The fixed pool holds them all: a client's next request may start while its
    last one still returns its lanes, so ``2 * clients`` request connections
    plus ``budget`` extra lanes must fit ``pool_size``. Each request is answered
    cleanly, every abandoned query stops within a second, and no connection is
    lost.
    """
    assert 2 * clients + budget <= pool_size
    pool = {"min_size": pool_size, "max_size": pool_size, "timeout": 10}
    server = serve(pool=pool, asgi_dbset={"BUDGET": budget})
    assert server.get("/gathered/?sleep=0.01")[0] == 200
    server.wait_quiet()
    before = {b.pid for b in backends(watch_dsn, app_name)}
    plan = {
        "port": server.port,
        "clients": clients,
        "per_client": per_client,
        "timeout": 30,
        "deadline": 900,
        "requests": [
            # Timeouts of 0, 10, 20 ... ms: before, during and after the leases.
            {"label": "timeout", "path": "/timeout/?after=0.0{seq}&sleep=30"},
            {"label": "gathered", "path": "/gathered/?sleep=0.02", "expect": {"n": 3}},
            {"label": "taskgroup", "path": "/taskgroup/?sleep=30"},
            # asyncio.gather does not cancel the siblings of a task that
            # raises: they run to their end (docs/reliability.md), so short.
            {"label": "raising", "path": "/raising/?sleep=0.3"},
        ],
    }
    with ActivityWatch(watch_dsn, app_name) as watch:
        result = drive(plan, tmp_path, timeout=900)
    state = server.wait_quiet()
    assert result["error_count"] == 0, result["errors"]
    assert result["wrong_count"] == 0, result["wrong"]
    each = clients * per_client // 4
    statuses = result["statuses"]
    assert statuses["timeout"] == {"504": each}
    assert statuses["gathered"] == {"200": each}
    assert statuses["taskgroup"] == {"500": each}
    assert statuses["raising"] == {"500": each}
    # Abandoned 30 s queries ran no longer than their timeout (at most 0.09 s)
    # plus a second; the raising view's siblings ran their 0.3 s.
    assert watch.max_active_seconds < 1.1, watch.max_active_seconds
    assert quiet(state), state
    assert {b.pid for b in backends(watch_dsn, app_name)} == before
    assert state["pool"].get("connections_lost", 0) == 0
    status, body = server.get("/gathered/?sleep=0.01")
    assert status == 200
    assert body["lanes_used"] == 3
    return {
        "requests": result["requests"],
        "statuses": statuses,
        "max_connections": watch.max_total,
        "oldest_query_seconds": round(watch.max_active_seconds, 3),
        "cancels": state["counters"]["cancels"],
        "connections_before": len(before),
    }


def test_failures_and_timeouts_through_a_server(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = failures_through_a_server(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=2,
        per_client=24,
        pool_size=8,
        budget=4,
    )
    report(figures)


@pytest.mark.soak
def test_failures_and_timeouts_through_a_server_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = failures_through_a_server(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        clients=3,
        per_client=400,
        pool_size=10,
        budget=4,
    )
    report(figures)


async def test_an_abandoned_call_waiting_for_the_pool_never_runs() -> None:
    """Lane 0's call is cancelled while its thread still waits for a pooled
    connection (the pool is exhausted). When a connection frees up, the call
    must not send its query: the caller is long gone.

    Found by these proofs on 8f511d6 (the 30 s query ran to its end); fixed in
    d8a8e3e (``Job.guard`` refuses queries of an abandoned job).
    """
    pool = connections["default"].pool
    pool.open()
    await asyncio.to_thread(pool.wait)
    held = []
    while checked_out() < pool.max_size:
        held.append(await asyncio.to_thread(pool.getconn, 5))
    try:

        async def gathered() -> None:
            async with connection_set(parallelism=3):
                await asyncio.gather(*(sleeping(30).acount() for _ in range(3)))

        task = asyncio.ensure_future(gathered())
        await asyncio.sleep(0.3)  # lane 0 waits in getconn; no lane was leased
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        for conn in held:
            pool.putconn(conn)
    # Once the pool has connections again, nothing of that caller starts.
    await asyncio.sleep(1.0)
    assert await asyncio.to_thread(active_sleeps) == 0
    assert budget.total == 0
