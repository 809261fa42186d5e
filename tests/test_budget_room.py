"""Extra lanes only from what the requests in flight leave over.

Every open connection set (a request in flight) may need a connection of its
own, so the budget lends an extra lane only while ``open sets + extra lanes
held + 1 <= max_size``. The suite's pools have ``max_size`` 8 and a budget of
4 extra lanes per alias.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

from asgi_dbset import active_set, connection_set
from asgi_dbset.budget import budget
from asgi_dbset.stats import sets_open
from tests.helpers import pool_stats, sleeping

pytestmark = pytest.mark.django_db(transaction=True)


async def test_the_room_left_by_the_open_sets_bounds_the_budget() -> None:
    max_size = pool_stats()["pool_max"]
    assert budget.limit("default") == max_size // 2 == 4
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(max_size - 2):
            await stack.enter_async_context(connection_set(parallelism=4))
        assert sets_open() == max_size - 2
        # Six sets may need six connections: two of the eight are left to lend.
        taken = [budget.try_acquire("default") for _ in range(3)]
        for took in taken:
            if took:
                budget.release("default")
        assert taken == [True, True, False]
        # With one set open, the budget's own limit is what binds.
        await stack.aclose()
        async with connection_set(parallelism=8):
            taken = 0
            while budget.try_acquire("default"):
                taken += 1
            for _ in range(taken):
                budget.release("default")
        assert taken == budget.limit("default")
    assert budget.total == 0


async def lanes_of_one_gather() -> tuple[list[int], int]:
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=4, lease_timeout=5.0):
            counts = await asyncio.gather(*[sleeping(0.1).acount() for _ in range(4)])
            dbset = active_set()
            assert dbset is not None
            used = dbset.lanes_used
        await sync_to_async(connections.close_all)()
    return list(counts), used


async def test_a_set_runs_as_stock_django_once_the_requests_could_fill_the_pool() -> (
    None
):
    assert await lanes_of_one_gather() == ([0, 0, 0, 0], 4)
    max_size = pool_stats()["pool_max"]
    async with contextlib.AsyncExitStack() as stack:
        # Seven other requests in flight (with the gathering one, eight: the
        # pool's size).
        for _ in range(max_size - 1):
            await stack.enter_async_context(connection_set(parallelism=4))
        # No lane to be had: the set steps aside, its calls run as stock
        # Django's (none through the set: see test_saturation.py).
        assert await lanes_of_one_gather() == ([0, 0, 0, 0], 0)
    assert budget.total == 0
