"""Parallelism, its limits, and the budget, on a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext
from django.db import OperationalError, connections
from django.test import override_settings

from asgi_dbset import connection_set, get_stats
from asgi_dbset.budget import budget
from tests.helpers import checked_out, sleeping, take_every_pooled_connection, timed

pytestmark = pytest.mark.django_db(transaction=True)

QUERY_SECONDS = 0.25


async def gather_sleeps(k: int, seconds: float = QUERY_SECONDS) -> list[int]:
    return await asyncio.gather(*(sleeping(seconds).acount() for _ in range(k)))


async def test_gather_takes_one_query_time_in_a_set_and_k_without() -> None:
    k = 4
    _, serial = await timed(gather_sleeps(k))
    async with connection_set(parallelism=k) as dbset:
        _, parallel = await timed(gather_sleeps(k))
        assert dbset.lanes_used == k
    # Side by side: stock Django runs the k queries one after another.
    assert serial >= k * QUERY_SECONDS * 0.95
    assert parallel < serial / 2, (parallel, serial)


async def test_parallelism_one_is_stock_django() -> None:
    async with connection_set(parallelism=1) as dbset:
        await gather_sleeps(2, 0.01)
        assert dbset.records == []  # the calls never entered the scheduler
        assert len(dbset.lanes) == 1


async def sample_while(
    work: Any, probe: Any, interval: float = 0.005
) -> tuple[Any, list[Any]]:
    """Run ``work`` and call ``probe()`` every ``interval`` seconds meanwhile."""
    samples: list[Any] = []
    task = asyncio.ensure_future(work)
    while not task.done():
        samples.append(probe())
        await asyncio.sleep(interval)
    return await task, samples


async def test_a_set_never_holds_more_lanes_than_its_parallelism() -> None:
    async with connection_set(parallelism=3) as dbset:
        results, lanes = await sample_while(
            gather_sleeps(9, 0.05),
            lambda: len(dbset.lanes),
        )
        assert results == [0] * 9
        assert max(lanes) <= 3
        assert dbset.lanes_used == 3


@override_settings(ASGI_DBSET={"BUDGET": 3, "MAX_PARALLELISM": 8})
async def test_budget_holds_across_many_concurrent_sets() -> None:
    async def request() -> list[int]:
        async with ThreadSensitiveContext():
            async with connection_set(parallelism=4):
                try:
                    return await gather_sleeps(4, 0.1)
                finally:
                    await _close_request_connections()

    leased_before = get_stats()["lanes_leased"]
    results, totals = await sample_while(
        asyncio.gather(*(request() for _ in range(6))), lambda: budget.total
    )
    assert results == [[0] * 4] * 6
    assert max(totals) <= 3
    assert max(totals) >= 1, "no set ever got an extra lane"
    assert get_stats()["lanes_leased"] > leased_before
    assert budget.total == 0


async def _close_request_connections() -> None:
    # What DBSetMiddleware does at the end of a request: return the request
    # thread's own connection.
    from asgiref.sync import sync_to_async

    await sync_to_async(connections.close_all)()


async def test_nearly_exhausted_pool_degrades_to_serial_without_timeouts() -> None:
    pool, held = await take_every_pooled_connection()
    try:
        failures_before = get_stats()["lease_failures"]
        async with connection_set(parallelism=4, lease_timeout=0.05) as dbset:
            results, elapsed = await timed(gather_sleeps(3, 0.1))
            assert results == [0, 0, 0]
            assert dbset.lanes_used == 1  # everything ran on the request's own lane
        assert get_stats()["lease_failures"] > failures_before
        # Bounded: three queries one after another plus at most a few lease waits.
        assert elapsed < 3 * 0.1 + 1.0
    finally:
        for conn in held:
            pool.putconn(conn)


async def test_a_refused_call_of_a_task_that_outlived_its_set_raises() -> None:
    """A call handed to a lane whose lease is still under way runs after the
    lease; when the lease is refused it is queued again - unless its set has
    ended meanwhile: then it raises, instead of opening a connection as stock
    Django on a thread that nobody returns it from."""
    pool, held = await take_every_pooled_connection()
    try:
        async with connection_set(parallelism=2, lease_timeout=0.2) as dbset:
            first = asyncio.ensure_future(sleeping(0.05).acount())
            # Lane 0 is busy: this one goes to the new lane, whose lease waits.
            outliving = asyncio.ensure_future(sleeping(0).acount())
            assert await first == 0
            await asyncio.sleep(0.05)
            assert len(dbset.lanes) == 2
            assert dbset.lanes[1].busy
        # (Closing waited for the lane: its lease, then the call it refused.)
        with pytest.raises(OperationalError, match="did not run"):
            await outliving
    finally:
        for conn in held:
            pool.putconn(conn)
    assert budget.total == 0
    # The refusal makes every set back off for lease_timeout: outwait it.
    await asyncio.sleep(0.2)


async def test_the_set_returns_every_connection_it_leased() -> None:
    await sleeping(0).acount()  # lane 0's own connection is not the set's
    before = checked_out()
    async with connection_set(parallelism=4) as dbset:
        await gather_sleeps(4, 0.05)
        assert checked_out() >= before + 3
    assert dbset.closed
    assert [lane.index for lane in dbset.lanes] == [0]
    assert checked_out() == before
    assert budget.total == 0


async def test_no_lease_while_requests_wait_for_the_pool() -> None:
    pool, held = await take_every_pooled_connection()
    # Another request waits for its own connection...
    waiting = asyncio.ensure_future(asyncio.to_thread(pool.getconn, 5))
    for _ in range(100):
        if pool.get_stats().get("requests_waiting", 0):
            break
        await asyncio.sleep(0.01)
    before = get_stats()
    try:
        # ...so a set does not even try to lease: its lease would queue ahead.
        async with connection_set(parallelism=4) as dbset:
            assert await gather_sleeps(3, 0.05) == [0, 0, 0]
        assert dbset.lanes_used == 1
        after = get_stats()
        assert after["lanes_leased"] == before["lanes_leased"]
        assert after["lease_failures"] == before["lease_failures"]
        # The two calls behind the first went straight to lane 0's thread, as
        # stock Django queues them, not one by one through the loop.
        assert after["lane0_queued_calls"] == before["lane0_queued_calls"] + 2
        assert after["waits"] == before["waits"]
    finally:
        pool.putconn(held.pop())
        pool.putconn(await waiting)
        for conn in held:
            pool.putconn(conn)
