"""No connection is leased for calls that cannot run yet.

While the request's thread runs sync code the set does not see
(``sync_to_async(f)``), a gathered read handed to lane 0 waits behind it, and
the reads handed to extra lanes wait for lane 0's report of that read (they
may only run outside its transactions). Their lanes' leases wait for that
report too: no pooled connection sits idle out of the pool meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections, transaction

import asgi_dbset
from asgi_dbset import connection_set, db_parallelism
from asgi_dbset.budget import budget
from tests.helpers import checked_out, set_unless_stock, sleeping
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


def another_request(filled: threading.Event, got: threading.Event) -> float:
    """Another request's thread: waits until the pool has no connection left
    for it, then opens its own (as Django does at its first query) and
    returns how long that took."""
    filled.wait(10)
    started = time.monotonic()
    connections["default"].ensure_connection()
    waited = time.monotonic() - started
    got.set()
    connections["default"].close()
    return waited


@pytest.mark.parametrize("meanwhile", ["another_service", "one_query_at_a_time"])
async def test_idle_extra_lanes_go_back_when_another_request_needs_a_connection(
    meanwhile: str,
) -> None:
    # A view gathers reads, then waits for another service - or awaits its
    # next queries one at a time, which the request's own connection runs -
    # while another request finds the pool empty. Stock Django holds one
    # connection per request; the view's idle extra lanes must not make the
    # other request wait for the view to end.
    pool = connections["default"].pool
    base = checked_out()

    async def run(parallelism: int | None) -> tuple[list[int], float, int]:
        filled, got = threading.Event(), threading.Event()
        loop = asyncio.get_running_loop()
        other = loop.run_in_executor(None, another_request, filled, got)
        async with ThreadSensitiveContext():
            async with contextlib.AsyncExitStack() as stack:
                dbset = await set_unless_stock(stack, parallelism)
                first = await asyncio.gather(
                    *(sleeping(0.05).acount() for _ in range(3))
                )
                # Take what the pool has left but for three connections: stock
                # (this request holds one) leaves two free; a set holding
                # three lanes, none.
                fillers = [pool.getconn() for _ in range(pool.max_size - base - 3)]
                lanes = 0 if dbset is None else len(dbset.lanes)
                filled.set()
                later: list[int] = []
                deadline = time.monotonic() + 3
                while not got.is_set() and time.monotonic() < deadline:
                    if meanwhile == "another_service":
                        await asyncio.sleep(0.01)
                    else:
                        later.append(await sleeping(0.01).acount())
                waited = await other
                for conn in fillers:
                    pool.putconn(conn)
                second = await asyncio.gather(
                    Author.objects.acount(), Book.objects.acount(), Tag.objects.acount()
                )
            await sync_to_async(connections.close_all)()
        return [*first, *second], waited, lanes

    stock_counts, stock_waited, _ = await run(None)
    counts, waited, lanes = await run(3)

    assert counts == stock_counts
    assert lanes == 3  # (the view's reads ran on three lanes)
    assert stock_waited < 1.0
    # Before: the other request waited for the view's end (3 s here).
    assert waited < 1.0, waited
    assert budget.total == 0


def spin(seconds: float) -> None:
    """CPU work on the event loop (another request's, say)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_a_snapshot_ends_only_on_the_lanes_the_set_still_holds() -> None:
    # A view reads in a snapshot with a statement timeout; some reads are
    # given up (a client's timeout around a gather), so their lanes were
    # leased but ran nothing. As the snapshot block ends, another request
    # finds the pool empty while the loop runs other code (another request's
    # CPU): the set is told to return its idle lanes, on its loop, in the turn
    # between the snapshot's end choosing the lanes to leave it on and those
    # calls starting. The calls then ran on the returned lanes' workers
    # anyway: their statement timeout opened a connection there, which no
    # lane held, so it never went back to the pool. Stock Django leaves none.
    pool = connections["default"].pool  # type: ignore[attr-defined]
    base = checked_out()  # (the test's own)
    fillers: list[object] = []
    go, got = threading.Event(), threading.Event()

    def loop_busy_while_another_request_connects() -> None:
        go.set()
        spin(0.05)

    async def view(*, lib: bool) -> int:
        async with (
            db_parallelism(3, snapshot=True) if lib else contextlib.nullcontext()
        ):
            busy = asyncio.ensure_future(sync_to_async(time.sleep)(0.3))
            await asyncio.sleep(0.05)  # the request's thread is busy now
            reads = asyncio.gather(*(Author.objects.acount() for _ in range(3)))
            await asyncio.sleep(0.1)
            reads.cancel()  # (given up: the lanes are leased, for nothing)
            await asyncio.gather(busy, reads, return_exceptions=True)
            await asyncio.sleep(0.05)
            count: int = await Author.objects.acount()
            while checked_out() < pool.max_size:
                fillers.append(await asyncio.to_thread(pool.getconn, 5))
            # (Runs first in the next loop turn, before the block's end.)
            asyncio.get_running_loop().call_soon(
                loop_busy_while_another_request_connects
            )
        return count

    async def request(*, lib: bool) -> tuple[int, int]:
        go.clear()
        got.clear()
        other = asyncio.get_running_loop().run_in_executor(
            None, another_request, go, got
        )
        try:
            async with ThreadSensitiveContext():
                try:
                    if lib:
                        async with connection_set(
                            parallelism=3, lease_timeout=5.0, statement_timeout=5
                        ):
                            count = await asyncio.wait_for(view(lib=True), 10)
                    else:
                        count = await asyncio.wait_for(view(lib=False), 10)
                finally:
                    await sync_to_async(connections.close_all)()
        finally:
            for conn in fillers:
                pool.putconn(conn)
            fillers.clear()
            await other
        await asyncio.sleep(0.2)  # (returns from other threads land)
        return count, checked_out() - base

    stock = await request(lib=False)
    lib = await request(lib=True)
    assert stock == (0, 0)
    # Before: (0, 2) - connections left out of the pool on lane workers.
    assert lib == stock
    assert budget.total == 0


class FullPool:
    """The default pool filled by the test, and one more request waiting for
    a connection of it - the load the set returns its idle lanes at once for."""

    def __init__(self) -> None:
        self.pool = connections["default"].pool  # type: ignore[attr-defined]
        self.base = checked_out()  # (the test's own)
        self.held: list[object] = []
        self.waiter: asyncio.Future[object] | None = None

    async def fill(self) -> None:
        while checked_out() < self.pool.max_size:
            self.held.append(await asyncio.to_thread(self.pool.getconn, 5))
        # (As Django's connect does: the pool's own timeout, 10 s here.)
        self.waiter = asyncio.ensure_future(asyncio.to_thread(self.pool.getconn))
        for _ in range(400):  # (at most 2 s)
            if self.pool.get_stats().get("requests_waiting", 0):
                break
            await asyncio.sleep(0.005)

    def request_holds(self) -> int:
        """Connections out of the pool, less the test's and the waiter's (if
        it was served): those the request holds."""
        assert self.waiter is not None
        served = int(self.waiter.done())
        return checked_out() - self.base - len(self.held) - served

    async def release(self) -> None:
        for conn in self.held:
            self.pool.putconn(conn)
        self.held.clear()
        if self.waiter is not None:
            self.pool.putconn(await self.waiter)
            self.waiter = None


async def in_a_request(view: Callable[[], Awaitable[Any]], *, lib: bool) -> Any:
    async with ThreadSensitiveContext():
        try:
            if not lib:
                return await asyncio.wait_for(view(), 10)
            async with connection_set(parallelism=2, lease_timeout=5.0) as dbset:
                result = await asyncio.wait_for(view(), 10)
                # (The view's calls did not all run on lane 0.)
                assert any(record.lane for record in dbset.records)
                return result
        finally:
            await sync_to_async(connections.close_all)()


def write_in_a_transaction(name: str) -> None:
    with transaction.atomic():
        Author.objects.create(name=name)


async def test_a_blocks_lane_goes_back_at_once_when_requests_wait() -> None:
    # A view writes in a transaction block, then waits for another service.
    # Meanwhile the pool is full and a request waits for a connection. Stock
    # Django holds the request's one connection during the wait; the set's
    # idle extra lanes go back at once when requests wait - the block's lane
    # too, once the block has ended (it was still the block's when the
    # block's last call ended, and nothing looked again).
    async def view(lib: bool, full: FullPool) -> tuple[int, int]:
        await Author.objects.acount()  # the request's own connection
        if lib:
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="x")
                await full.fill()
        else:
            await sync_to_async(write_in_a_transaction)("x")
            await full.fill()
        await asyncio.sleep(0.2)  # the other service
        holds = full.request_holds()
        return await Author.objects.acount(), holds

    async def request(*, lib: bool) -> tuple[int, int]:
        full = FullPool()
        try:
            result: tuple[int, int] = await in_a_request(
                lambda: view(lib, full), lib=lib
            )
            return result
        finally:
            await full.release()

    stock = await request(lib=False)
    lib = await request(lib=True)
    assert stock == (1, 1)
    # Before: (2, 2) - the block's lane held through the wait, the waiting
    # request not served.
    assert lib == (2, 1)
    assert budget.total == 0


async def test_an_iterators_lane_goes_back_at_once_when_requests_wait() -> None:
    # A view gathers a short read and an aiterator() (its cursor on an extra
    # lane), then waits for another service; the pool fills, and one more
    # request waits for a connection, while it iterates (and the short read
    # ends: the iterator's last chunk is the set's last call). The iterator's lane
    # was still its cursor's as its last chunk ended (the generator is freed
    # a moment later), so it stayed out of the pool through the wait.
    await Author.objects.abulk_create([Author(name=f"a{i}") for i in range(10)])

    async def names(full: FullPool) -> list[str]:
        found: list[str] = []
        rows = Author.objects.order_by("id").values_list("name", flat=True)
        async for name in rows.aiterator(chunk_size=2):
            found.append(name)
            if len(found) == 1:
                await full.fill()
                await asyncio.sleep(0.05)  # (the short read has ended by now)
        return found

    async def view(full: FullPool) -> tuple[int, list[str], int]:
        count, found = await asyncio.gather(sleeping(0.01).acount(), names(full))
        await asyncio.sleep(0.2)  # the other service
        return count, found, full.request_holds()

    async def request(*, lib: bool) -> tuple[int, list[str], int]:
        full = FullPool()
        try:
            result: tuple[int, list[str], int] = await in_a_request(
                lambda: view(full), lib=lib
            )
            return result
        finally:
            await full.release()

    stock = await request(lib=False)
    lib = await request(lib=True)
    assert stock == (10, [f"a{i}" for i in range(10)], 1)
    # Before: 2 connections held through the wait, the waiting request not
    # served.
    assert lib == stock
    assert budget.total == 0
