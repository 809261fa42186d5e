"""Cancellation and failures: no lane stays busy, no connection stays out."""

from __future__ import annotations

import asyncio

import pytest

from asgi_dbset import connection_set, get_stats
from asgi_dbset.budget import budget
from tests.helpers import active_sleeps, sleeping, timed

pytestmark = pytest.mark.django_db(transaction=True)


async def no_sleeps_within(seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if await asyncio.to_thread(active_sleeps) == 0:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_timeout_around_a_gather_cancels_on_the_server() -> None:
    async with connection_set(parallelism=3) as dbset:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.4):
                await asyncio.gather(*(sleeping(20).acount() for _ in range(3)))
        assert await no_sleeps_within(1.0)
        # The same set keeps working, on the same lanes.
        results, elapsed = await timed(
            asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
        )
        assert results == [0, 0, 0]
        assert elapsed < 0.5
        assert not any(lane.busy for lane in dbset.lanes)
    assert budget.total == 0


async def test_calls_queued_on_lane_0_are_cancelled_like_the_others() -> None:
    """Under a full budget the calls behind lane 0's go to its thread at once
    (lane0_queued_calls); a cancelled one that runs has its query cancelled on
    the server, one that has not started never starts, and the call queued
    after them is not hit by a late cancel."""
    limit = budget.limit("default")
    taken = [budget.try_acquire("default") for _ in range(limit)]
    assert all(taken)
    before = get_stats()
    try:
        async with connection_set(parallelism=3) as dbset:
            first = asyncio.ensure_future(sleeping(0.3).acount())
            running = asyncio.ensure_future(sleeping(20).acount())
            never = asyncio.ensure_future(sleeping(20).acount())
            after = asyncio.ensure_future(sleeping(0.05).acount())
            assert await first == 0
            await asyncio.sleep(0.2)  # `running` is on the server now
            assert await asyncio.to_thread(active_sleeps) == 1
            never.cancel()
            running.cancel()
            results = await asyncio.gather(
                running, never, after, return_exceptions=True
            )
            assert isinstance(results[0], asyncio.CancelledError)
            assert isinstance(results[1], asyncio.CancelledError)
            assert results[2] == 0
            assert await no_sleeps_within(1.0)
            assert len(dbset.lanes) == 1
    finally:
        for _ in taken:
            budget.release("default")
    counters = get_stats()
    assert counters["lane0_queued_calls"] == before["lane0_queued_calls"] + 3
    assert counters["cancels"] > before["cancels"]
    assert budget.total == 0


async def test_a_failing_task_group_member_cancels_its_siblings_queries() -> None:
    async def boom() -> None:
        await asyncio.sleep(0.2)
        raise ValueError("boom")

    async with connection_set(parallelism=3):

        async def run_group() -> None:
            async with asyncio.TaskGroup() as group:
                group.create_task(sleeping(20).acount())
                group.create_task(sleeping(20).acount())
                group.create_task(boom())

        with pytest.raises(ExceptionGroup):
            await run_group()
        assert await no_sleeps_within(1.0)
    assert budget.total == 0


async def test_cancelling_the_task_that_owns_the_set() -> None:
    async def request() -> None:
        async with connection_set(parallelism=3):
            await asyncio.gather(*(sleeping(20).acount() for _ in range(3)))

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0.3)
    task.cancel()
    _, elapsed = await timed(asyncio.gather(task, return_exceptions=True))
    assert elapsed < 2
    assert await no_sleeps_within(1.0)
    assert budget.total == 0
    # The next set on the same workers is unaffected.
    async with connection_set(parallelism=3):
        assert await asyncio.gather(*(sleeping(0.01).acount() for _ in range(3))) == [
            0,
            0,
            0,
        ]


async def test_a_query_error_leaves_the_lane_usable() -> None:
    from django.db import DatabaseError

    from tests.testapp.models import Author

    async with connection_set(parallelism=2) as dbset:
        results = await asyncio.gather(
            sleeping(0.1).acount(),
            Author.objects.raw("SELECT * FROM no_such_table").__aiter__().__anext__(),
            return_exceptions=True,
        )
        assert results[0] == 0
        assert isinstance(results[1], DatabaseError)
        assert await asyncio.gather(
            sleeping(0.05).acount(), sleeping(0.05).acount()
        ) == [0, 0]
        assert len(dbset.lanes) == 2
