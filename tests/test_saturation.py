"""A saturated process: sets step aside and their calls run as stock Django.

When the requests in flight need every pooled connection (``open sets + 1 >
max_size`` for every pooled alias), no set could lease a lane, so a set with
no lane but lane 0 and nothing running lets each ORM call run exactly as stock
Django runs it, with none of its own bookkeeping (``saturated_calls``). That
keeps a decorated view's cost per request at stock's on a saturated server.
These tests check that the results are stock Django's, that a set leases
again as soon as room comes back - with lane 0's transactions still keeping
their calls - and that nothing that needs the set steps aside. The suite's
pools have ``max_size`` 8.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

import asgi_dbset
from asgi_dbset import connection_set, get_stats, sync_to_lane
from asgi_dbset.budget import budget
from tests.helpers import active_sleeps, pool_stats, sleeping, timed
from tests.test_cancellation import no_sleeps_within
from tests.test_lane0_transactions import writes_then_rollback
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


class OtherRequests:
    """Other requests in flight: open sets, each in a task of its own, that
    run nothing until :meth:`end`."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._end = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self, opened: asyncio.Event) -> None:
        async with connection_set(parallelism=4):
            opened.set()
            await self._end.wait()

    async def __aenter__(self) -> OtherRequests:
        for _ in range(self.n):
            opened = asyncio.Event()
            self._tasks.append(asyncio.ensure_future(self._one(opened)))
            await opened.wait()
        return self

    async def end(self) -> None:
        self._end.set()
        await asyncio.gather(*self._tasks)

    async def __aexit__(self, *exc: object) -> None:
        await self.end()


def other_requests(n: int) -> OtherRequests:
    return OtherRequests(n)


def saturating() -> int:
    """Other requests that, with one more, need the whole pool."""
    return int(pool_stats()["pool_max"]) - 1


@contextlib.asynccontextmanager
async def request_thread() -> AsyncIterator[None]:
    async with ThreadSensitiveContext():
        try:
            yield
        finally:
            await sync_to_async(connections.close_all)()


async def test_calls_of_a_saturated_process_run_as_stock_django() -> None:
    before = get_stats()
    async with request_thread():
        stock, stock_s = await timed(
            asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
        )
    async with other_requests(saturating()), request_thread():
        assert not budget.saturated()  # (seven sets open: room for one lane)
        async with connection_set(parallelism=4) as dbset:
            assert budget.saturated()
            results, seconds = await timed(
                asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
            )
    after = get_stats()
    assert results == stock == [0, 0, 0]
    # None of the set's bookkeeping: no record, no lane, no lease.
    assert after["saturated_calls"] == before["saturated_calls"] + 3
    assert after["calls"] == before["calls"]
    assert after["lanes_leased"] == before["lanes_leased"]
    assert after["lane0_queued_calls"] == before["lane0_queued_calls"]
    assert dbset.lanes_used == 0
    # One query after another on the request's connection, as stock Django.
    assert seconds >= 0.3, seconds
    assert stock_s >= 0.3, stock_s
    assert not budget.saturated()
    assert budget.total == 0


async def saturated_writes_then_rollback(room_comes_back: bool, tag: str) -> list[bool]:
    """:func:`writes_then_rollback` in a set, saturated when the transaction
    opens; with *room_comes_back*, the other requests end before the writes,
    so the set may lease for them."""
    async with request_thread(), other_requests(saturating()) as others:
        async with connection_set(parallelism=4, lease_timeout=5.0):
            assert await sleeping(0.01).acount() == 0  # (stepped aside)

            async def end_others() -> None:
                await others.end()
                assert not budget.saturated()

            return await writes_then_rollback(
                tag, end_others if room_comes_back else None
            )


@pytest.mark.parametrize("room_comes_back", [False, True])
async def test_a_transaction_keeps_its_calls_across_saturation(
    room_comes_back: bool,
) -> None:
    async with request_thread():
        stock = await writes_then_rollback("stock")
    lanes = await saturated_writes_then_rollback(room_comes_back, "lanes")
    # Stock Django: every write inside the transaction, seen by its reads,
    # and rolled back with it.
    assert stock == lanes == [True] * 4
    assert await Author.objects.filter(name__startswith="stock").acount() == 0
    assert await Author.objects.filter(name__startswith="lanes").acount() == 0
    assert budget.total == 0


async def test_a_set_leases_again_once_room_comes_back() -> None:
    before = get_stats()
    async with request_thread():
        async with other_requests(saturating()) as others:
            async with connection_set(parallelism=4, lease_timeout=5.0) as dbset:
                # A call still running as stock Django when room comes back.
                first = asyncio.ensure_future(sleeping(0.3).acount())
                await asyncio.sleep(0.05)
                await others.end()
                results, seconds = await timed(
                    asyncio.gather(*(sleeping(0.3).acount() for _ in range(4)))
                )
                assert await first == 0
                used = dbset.lanes_used
    after = get_stats()
    assert results == [0, 0, 0, 0]
    assert after["saturated_calls"] == before["saturated_calls"] + 1
    assert after["lanes_leased"] >= before["lanes_leased"] + 3
    # Lane 0 runs one of the four after the stock call; three extra lanes
    # run the others meanwhile (serial: 1.2 s).
    assert used == 4
    assert seconds < 0.9, seconds
    assert budget.total == 0


async def test_nothing_that_needs_the_set_steps_aside() -> None:
    """A statement timeout, a transaction block, a snapshot and sync_to_lane
    need the set's lanes and bookkeeping: their calls never step aside."""

    def count_sync() -> int:
        return Author.objects.count()

    async with request_thread(), other_requests(saturating()):
        before = get_stats()
        async with connection_set(parallelism=4, statement_timeout=5.0):
            assert budget.saturated()
            assert await Author.objects.acount() == 0
        async with connection_set(parallelism=4):
            assert budget.saturated()
            async with asgi_dbset.atomic():
                assert await Author.objects.acount() == 0
            assert await sync_to_lane(count_sync)() == 0
        async with connection_set(parallelism=4, snapshot=True):
            assert budget.saturated()
            assert await Author.objects.acount() == 0
        after = get_stats()
    assert after["saturated_calls"] == before["saturated_calls"]
    assert after["calls"] >= before["calls"] + 4
    assert budget.total == 0


async def test_a_call_that_stepped_aside_is_cancelled_on_the_server() -> None:
    """Stock Django leaves an abandoned query running; a set, even one that
    stepped aside, cancels it (and its request's connection stays usable)."""
    before = get_stats()
    async with request_thread(), other_requests(saturating()):
        async with connection_set(parallelism=4):
            assert budget.saturated()
            running = asyncio.ensure_future(sleeping(20).acount())
            await asyncio.sleep(0.3)  # on the server now
            assert await asyncio.to_thread(active_sleeps) == 1
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert await no_sleeps_within(1.0)
            assert await sleeping(0.01).acount() == 0
    after = get_stats()
    assert after["saturated_calls"] == before["saturated_calls"] + 2
    assert after["cancels"] > before["cancels"]
    assert budget.total == 0


async def test_an_aiterator_opened_aside_stays_on_the_requests_connection() -> None:
    """A cursor opened while the set stepped aside was opened as stock Django
    opens it, on the request's thread: once room comes back, its later chunks
    still run there, and the rows are stock Django's."""
    await Author.objects.abulk_create([Author(name=f"a{i}") for i in range(7)])
    async with request_thread():
        stock = [a.name async for a in Author.objects.order_by("pk").aiterator(2)]
    async with request_thread(), other_requests(saturating()) as others:
        async with connection_set(parallelism=4, lease_timeout=5.0) as dbset:
            names = []
            async for author in Author.objects.order_by("pk").aiterator(2):
                names.append(author.name)
                if len(names) == 1:
                    await others.end()
                    # Room again: a gather beside the open cursor leases.
                    assert await asyncio.gather(
                        *(sleeping(0.05).acount() for _ in range(3))
                    ) == [7, 7, 7]
            assert dbset.lanes_used >= 2
    assert names == stock == [f"a{i}" for i in range(7)]
    assert budget.total == 0
