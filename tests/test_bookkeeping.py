"""The set's books: worker threads, figures, and the order calls are served in."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from asgi_dbset.workers import WorkerPool
from tests.helpers import sleeping, take_every_pooled_connection

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_worker_lent_out_at_shutdown_stops_when_it_comes_back() -> None:
    pool = WorkerPool()
    lent, idle = pool.acquire(), pool.acquire()
    pool.release(idle)
    pool.shutdown()
    assert not idle.alive
    assert lent.alive
    pool.release(lent)  # a lane returned after the lifespan shutdown
    lent.join(timeout=5)
    assert not lent.alive
    assert "idle=0" in repr(pool)
    # The pool serves again afterwards (a server started anew in one process).
    fresh = pool.acquire()
    assert fresh.alive
    pool.release(fresh)
    pool.shutdown()
    assert not fresh.alive


async def test_a_refused_lease_counts_its_calls_wait_once() -> None:
    pool, held = await take_every_pooled_connection()
    try:
        async with connection_set(parallelism=2, lease_timeout=0.2) as dbset:
            # Lane 0 is busy: the second call goes to the new lane, whose lease
            # is refused; it runs on lane 0 afterwards.
            await asyncio.gather(sleeping(0.4).acount(), sleeping(0).acount())
            figures = dbset.figures()
            waits = sum(r.started - r.queued for r in dbset.records)
    finally:
        for conn in held:
            pool.putconn(conn)
    assert figures["calls"] == len(dbset.records) == 2
    assert figures["wait_ms"] == pytest.approx(waits * 1000, abs=0.01)
    assert budget.total == 0
    await asyncio.sleep(0.2)  # the refusal makes every set back off this long


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_figures_time_each_query_from_its_start_on_a_lane(
    parallelism: int,
) -> None:
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=1) as dbset:
            dbset.record_stock_calls = True  # what SERVER_TIMING and HISTORY set
            dbset.parallelism = parallelism
            await asyncio.gather(*(sleeping(0.1).acount() for _ in range(6)))
            figures = dbset.figures()
        await sync_to_async(connections.close_all)()
    # Six 0.1 s queries: 0.6 s of query time however they were scheduled,
    # not the time each call spent queued behind the others as well.
    assert 0.55 < figures["query_ms"] / 1000 < 0.9
    if parallelism == 1:
        assert figures["lanes_used"] == 1
        assert figures["gain"] == pytest.approx(1.0, abs=0.15)
        assert figures["wait_ms"] > 200  # five calls waited for lane 0
    else:
        assert figures["gain"] > 1.5


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_a_call_ends_on_its_thread_however_late_the_loop_hears_of_it(
    parallelism: int,
) -> None:
    # The loop is blocked (a view doing sync work) while lane 0's thread ends
    # a call and starts the next: the first call's query time ends when its
    # thread ended it, not when the loop came back to it, so the times of
    # one lane's calls never overlap and one lane's gain stays at most 1.
    async def block_the_loop() -> None:
        await asyncio.sleep(0.03)
        time.sleep(0.3)  # noqa: ASYNC251 (the point: the loop is blocked)

    async with ThreadSensitiveContext():
        async with connection_set(parallelism=1) as dbset:
            dbset.record_stock_calls = True
            dbset.parallelism = parallelism
            await asyncio.gather(
                *(sleeping(0.05).acount() for _ in range(4)), block_the_loop()
            )
            figures = dbset.figures()
            records = list(dbset.records)
        await sync_to_async(connections.close_all)()
    assert len(records) == 4
    for lane in {r.lane for r in records}:
        mine = sorted((r for r in records if r.lane == lane), key=lambda r: r.started)
        for before, after in itertools.pairwise(mine):
            assert before.ended <= after.started, (before, after)
    if parallelism == 1:
        assert figures["gain"] <= 1.0, figures


async def test_calls_whose_lease_was_refused_keep_their_turn() -> None:
    """Calls handed to lanes whose leases are then refused queue again for
    lane 0 in the order they were made, ahead of the calls made after them."""
    order: list[str] = []

    async def tagged(name: str, seconds: float) -> None:
        await sleeping(seconds).acount()
        order.append(name)

    pool, held = await take_every_pooled_connection()
    try:
        async with connection_set(parallelism=4, lease_timeout=0.2):
            await asyncio.gather(
                tagged("a", 0.4),  # lane 0
                *(tagged(name, 0.01) for name in "bcd"),  # three leases, refused
                tagged("e", 0.01),  # queued: no more lanes
            )
    finally:
        for conn in held:
            pool.putconn(conn)
    assert order == ["a", "b", "c", "d", "e"]
    assert budget.total == 0
    await asyncio.sleep(0.2)  # the refusal makes every set back off this long
