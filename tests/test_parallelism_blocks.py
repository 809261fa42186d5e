"""A set never has more lanes than its parallelism, also after it is lowered.

``async with db_parallelism(n)`` inside a set raises the set's parallelism
for the block and restores it on exit; the lanes the block leased beyond the
restored parallelism go back to the pool and the budget right away, not when
the response ends.
"""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import OperationalError, connections

import asgi_dbset
from asgi_dbset import connection_set, db_parallelism
from asgi_dbset.budget import budget
from tests.helpers import checked_out, sleeping, timed

pytestmark = pytest.mark.django_db(transaction=True)


async def test_leaving_a_wider_block_returns_the_lanes_beyond_the_set() -> None:
    async with connection_set(parallelism=2, lease_timeout=5.0) as dbset:
        async with db_parallelism(4):
            await asyncio.gather(*(sleeping(0.3).acount() for _ in range(4)))
            wide = len(dbset.lanes)
        # Back to two lanes at once: lane 0 and one extra lane.
        assert len(dbset.lanes) == 2
        assert budget.held("default") == 1
        out_after_block = checked_out()
        before = len(dbset.records)
        _, elapsed = await timed(
            asyncio.gather(*(sleeping(0.2).acount() for _ in range(4)))
        )
        narrow = {r.lane for r in dbset.records[before:]}
    assert wide >= 3
    assert len(narrow) == 2
    # Four 0.2 s queries two at a time take two rounds.
    assert elapsed >= 0.38
    # The test's own connection, lane 0's and lane 1's: no more.
    assert out_after_block <= 3
    assert budget.total == 0


async def test_lanes_busy_when_the_block_ends_go_back_when_their_call_ends() -> None:
    async with connection_set(parallelism=1, lease_timeout=5.0) as dbset:
        async with db_parallelism(3):
            slow = [asyncio.ensure_future(sleeping(0.4).acount()) for _ in range(3)]
            for _ in range(500):
                if len(dbset.lanes) == 3 and all(lane.busy for lane in dbset.lanes):
                    break
                await asyncio.sleep(0.01)
        # The block is over while its three calls still run.
        assert len(dbset.lanes) == 3
        assert await asyncio.gather(*slow) == [0, 0, 0]
        await asyncio.sleep(0)
        assert len(dbset.lanes) == 1
        assert budget.held("default") == 0
    assert budget.total == 0


async def test_a_decorated_view_keeps_its_settings_after_nested_blocks() -> None:
    """A view decorated with a parallelism and a statement timeout, that opens
    nested blocks of other settings (and a transaction block inside them):
    once the blocks have left, its calls run with the decorator's settings
    again - at most its lanes, and its timeout, not the last block's."""

    @db_parallelism(3, statement_timeout=0.3)
    async def view() -> tuple[set[int], str]:
        dbset = asgi_dbset.active_set()
        assert dbset is not None
        async with db_parallelism(2, statement_timeout=5.0):
            async with db_parallelism(4):
                async with asgi_dbset.atomic():
                    await sleeping(0.4).acount()  # (within the block's 5 s)
        before = len(dbset.records)
        await asyncio.gather(*(sleeping(0.1).acount() for _ in range(6)))
        lanes = {r.lane for r in dbset.records[before:]}
        try:
            await sleeping(0.6).acount()
        except OperationalError as exc:
            return lanes, type(exc.__cause__).__name__
        return lanes, "no timeout"

    async with ThreadSensitiveContext():
        async with connection_set(parallelism=1, lease_timeout=5.0) as dbset:
            lanes, timed_out = await asyncio.wait_for(view(), 30)
            assert (dbset.parallelism, dbset.statement_timeout) == (3, 0.3)
        await sync_to_async(connections.close_all)()
    assert len(lanes) <= 3
    assert timed_out == "QueryCanceled"
    assert budget.total == 0


async def test_a_decorated_view_inside_a_block_sets_what_the_block_restores() -> None:
    """A decorated view called inside blocks that enclose it (an async
    middleware's ``async with db_parallelism(2)`` around the chain): the
    decorator's settings hold for the rest of the request, so the blocks,
    leaving after the view has returned (a streaming body is sent after
    that), restore the decorator's parallelism and timeout, not theirs."""

    @db_parallelism(3, statement_timeout=0.3)
    async def view() -> None:
        await sleeping(0).acount()

    async with ThreadSensitiveContext():
        async with connection_set(parallelism=1, lease_timeout=5.0) as dbset:
            async with db_parallelism(2, statement_timeout=5.0):
                async with db_parallelism(6):
                    await asyncio.wait_for(view(), 30)
                    assert (dbset.parallelism, dbset.statement_timeout) == (3, 0.3)
                assert (dbset.parallelism, dbset.statement_timeout) == (3, 0.3)
            after = (dbset.parallelism, dbset.statement_timeout)
            before = len(dbset.records)
            await asyncio.gather(*(sleeping(0.1).acount() for _ in range(6)))
            lanes = {r.lane for r in dbset.records[before:]}
        await sync_to_async(connections.close_all)()
    assert after == (3, 0.3)
    assert len(lanes) == 3
    assert budget.total == 0
