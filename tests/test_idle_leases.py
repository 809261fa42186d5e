"""No connection is leased for calls that cannot run yet.

While the request's thread runs sync code the set does not see
(``sync_to_async(f)``), a gathered read handed to lane 0 waits behind it, and
the reads handed to extra lanes wait for lane 0's report of that read (they
may only run outside its transactions). Their lanes' leases wait for that
report too: no pooled connection sits idle out of the pool meanwhile.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from tests.helpers import checked_out, sleeping
from tests.testapp.models import Author, Book, Tag

pytestmark = pytest.mark.django_db(transaction=True)


def busy_request_thread(seconds: float) -> None:
    time.sleep(seconds)  # (sync work on the request's thread: no query)


async def test_no_lane_holds_a_connection_while_lane_0_is_busy_elsewhere() -> None:
    out: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            out.append(checked_out())
            await asyncio.sleep(0.01)

    async with ThreadSensitiveContext():
        # Lane 0's own connection, opened before: only the extra lanes count.
        await sync_to_async(lambda: Author.objects.count())()
        before = checked_out()
        async with connection_set(parallelism=4, lease_timeout=5.0) as dbset:
            watcher = asyncio.create_task(watch())
            busy = asyncio.ensure_future(sync_to_async(busy_request_thread)(0.6))
            await asyncio.sleep(0.05)  # the request's thread is busy now
            counts = await asyncio.gather(
                Author.objects.acount(), Book.objects.acount(), Tag.objects.acount()
            )
            await busy
            done.set()
            await watcher
            lanes_used = dbset.lanes_used
        await sync_to_async(connections.close_all)()
    assert counts == [0, 0, 0]
    # While the request's thread was busy (the first half second), no extra
    # connection was out of the pool; the reads then ran on lanes.
    assert max(out[:40]) == before, out
    assert lanes_used >= 2
    assert budget.total == 0


async def test_idle_extra_lanes_go_back_while_the_view_waits_for_something_else() -> (
    None
):
    # A view gathers reads, then waits for something that is not the database
    # (an HTTP call to another service, say), then reads again. Stock Django
    # holds the request's one connection meanwhile.
    async def view() -> tuple[list[int], int]:
        first = await asyncio.gather(
            sleeping(0.05).acount(), sleeping(0.05).acount(), sleeping(0.05).acount()
        )
        await asyncio.sleep(0.3)  # the other service
        held = checked_out() - base
        second = await asyncio.gather(
            Author.objects.acount(), Book.objects.acount(), Tag.objects.acount()
        )
        return [*first, *second], held

    # (Connections out of the pool before: the test's own.)
    base = checked_out()
    async with ThreadSensitiveContext():
        stock_counts, stock_held = await view()
        await sync_to_async(connections.close_all)()

    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
            counts, held = await view()
            lanes_used = dbset.lanes_used
        await sync_to_async(connections.close_all)()

    assert counts == stock_counts
    assert stock_held == 1
    assert lanes_used == 3  # (the reads did run in parallel)
    # While the view waited, its idle extra lanes were back in the pool.
    assert held == stock_held
    assert budget.total == 0
