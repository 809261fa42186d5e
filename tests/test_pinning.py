"""Work that must share a connection does: aiterator() cursors, and aliases."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import connections, transaction

import asgi_dbset
from asgi_dbset import OrphanedIteratorError, connection_set
from asgi_dbset.budget import budget
from tests.helpers import set_unless_stock, sleeping, timed
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


@pytest.fixture
def books(transactional_db: None) -> None:
    author = Author.objects.create(name="a")
    Book.objects.bulk_create([Book(title=f"b{i:02}", author=author) for i in range(10)])


async def _hold_lane_zero(dbset: object) -> asyncio.Future[int]:
    blocker = asyncio.ensure_future(sleeping(30).acount())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if dbset.lanes[0].busy:  # type: ignore[attr-defined]
            return blocker
    raise AssertionError("lane 0 never got busy")


@pytest.mark.usefixtures("books")
async def test_every_chunk_of_an_aiterator_runs_on_the_lane_that_opened_it() -> None:
    async with connection_set(parallelism=3) as dbset:
        blocker = await _hold_lane_zero(dbset)
        titles = []
        async for book in Book.objects.order_by("title").aiterator(chunk_size=2):
            titles.append(book.title)
            # Other calls run meanwhile, on whichever lane is free.
            await asyncio.gather(Author.objects.acount(), Book.objects.acount())
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker
    assert titles == [f"b{i:02}" for i in range(10)]
    chunk_lanes = {r.lane for r in dbset.records if r.name == "next_slice"}
    assert len(chunk_lanes) == 1
    assert chunk_lanes != {0}
    assert len([r for r in dbset.records if r.name == "next_slice"]) == 6


@pytest.mark.usefixtures("books")
async def test_an_aiterator_cannot_outlive_its_set() -> None:
    async with connection_set(parallelism=2) as dbset:
        blocker = await _hold_lane_zero(dbset)
        iterator = Book.objects.order_by("title").aiterator(chunk_size=2).__aiter__()
        first = await iterator.__anext__()
        await iterator.__anext__()
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker
    assert first.title == "b00"
    # Its cursor went back to the pool with the lane's connection: resuming
    # must fail loudly, not return a truncated result or use a returned connection.
    with pytest.raises(OrphanedIteratorError, match="has ended"):
        await iterator.__anext__()


async def test_each_alias_gets_its_own_lanes_within_one_budget() -> None:
    async def work() -> list[int]:
        return await asyncio.gather(
            sleeping(0.2).acount(),
            sleeping(0.2).acount(),
            sleeping(0.2).using("other").acount(),
            sleeping(0.2).using("other").acount(),
        )

    _, serial = await timed(work())
    async with connection_set(parallelism=4) as dbset:
        held: list[tuple[int, int]] = []
        task = asyncio.ensure_future(work())
        while not task.done():
            held.append((budget.held("default"), budget.held("other")))
            await asyncio.sleep(0.01)
        (results,) = await asyncio.gather(task)
        aliases = {(r.lane, r.alias) for r in dbset.records}
    assert results == [0, 0, 0, 0]
    assert {alias for _, alias in aliases} == {"default", "other"}
    assert any(o >= 1 for _, o in held)
    assert max(d + o for d, o in held) <= 3  # lane 0 plus three extra lanes
    extra_other = {lane for lane, alias in aliases if alias == "other" and lane != 0}
    assert extra_other, "'other' never got a lane of its own"
    assert budget.total == 0
    assert serial > 0.75


async def _iterate_across_a_block(parallelism: int | None, hold: bool) -> Any:
    """An aiterator() opened before a transaction block and iterated inside it,
    a gathered pair of calls between its chunks (*parallelism* None: stock
    Django, the block entered through sync_to_async). With *hold*, lane 0 is
    busy when the cursor opens, which puts it on an extra lane."""
    seen: list[Any] = []
    async with ThreadSensitiveContext():
        async with contextlib.AsyncExitStack() as stack:
            dbset = await set_unless_stock(stack, parallelism)
            if dbset is not None:
                await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
            blocker = await _hold_lane_zero(dbset) if hold and dbset else None
            iterator = Book.objects.order_by("title").aiterator(chunk_size=2)
            iterator = iterator.__aiter__()
            seen.append((await iterator.__anext__()).title)
            if blocker is not None:
                blocker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await blocker
            if dbset is None:
                atomic = transaction.atomic()
                await sync_to_async(atomic.__enter__)()
            else:
                atomic = asgi_dbset.atomic()
                await atomic.__aenter__()
            try:
                await Book.objects.acreate(
                    title="zz", author=await Author.objects.aget()
                )
                async for book in iterator:
                    seen.append(book.title)
                    seen.append(
                        await asyncio.gather(
                            Book.objects.filter(title="zz").aexists(),
                            Book.objects.acount(),
                        )
                    )
            finally:
                if dbset is None:
                    await sync_to_async(atomic.__exit__)(None, None, None)
                else:
                    await atomic.__aexit__(None, None, None)
        await sync_to_async(connections.close_all)()
    if dbset is None:
        return seen, None
    chunks = [r.lane for r in dbset.records if r.name == "next_slice"]
    return seen, chunks


@pytest.mark.usefixtures("books")
@pytest.mark.parametrize("hold", [False, True], ids=["on lane 0", "on an extra lane"])
async def test_an_aiterator_opened_before_a_block_stays_on_its_lane_inside_it(
    hold: bool,
) -> None:
    """Inside asgi_dbset.atomic() every call of the block's alias runs on the
    block's lane - but a chunk of a cursor opened before the block runs on
    the lane that opened the cursor: its connection is that lane's, used by
    that lane's thread only. The rows are stock Django's."""
    stock, _ = await asyncio.wait_for(_iterate_across_a_block(None, hold), 30)
    await Book.objects.filter(title="zz").adelete()
    seen, chunks = await asyncio.wait_for(_iterate_across_a_block(4, hold), 30)
    assert seen == stock
    assert len(stock) == 1 + 9 * 2  # (the cursor does not see the block's row)
    assert len(chunks) == 6
    assert len(set(chunks)) == 1, chunks
    assert (chunks[0] != 0) is hold


async def _iterate_after_the_block(parallelism: int | None) -> Any:
    """An aiterator() opened inside a transaction block, resumed after it
    committed (*parallelism* None: stock Django)."""
    async with ThreadSensitiveContext():
        async with contextlib.AsyncExitStack() as stack:
            if parallelism is not None:
                await stack.enter_async_context(
                    connection_set(parallelism=parallelism, lease_timeout=5.0)
                )
                await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
                atomic: Any = asgi_dbset.atomic()
                await atomic.__aenter__()
            else:
                atomic = transaction.atomic()
                await sync_to_async(atomic.__enter__)()
            iterator = Book.objects.order_by("title").aiterator(chunk_size=2)
            iterator = iterator.__aiter__()
            first = (await iterator.__anext__()).title
            if parallelism is not None:
                await atomic.__aexit__(None, None, None)
            else:
                await sync_to_async(atomic.__exit__)(None, None, None)
            try:
                rest = [book.title async for book in iterator]
            except Exception as exc:  # (compared with stock's)
                rest = [type(exc).__name__, type(exc.__cause__).__name__]
        await sync_to_async(connections.close_all)()
    return first, rest


@pytest.mark.usefixtures("books")
async def test_an_aiterator_opened_in_a_block_fails_after_it_as_on_stock() -> None:
    """The block's commit closes the cursor it opened (it is no WITH HOLD
    cursor, as on stock Django): resuming it raises stock's error. Without
    server-side cursors (behind PgBouncer, cell E) Django has fetched every
    row already, and the iteration goes on, as on stock."""
    stock = await asyncio.wait_for(_iterate_after_the_block(None), 30)
    library = await asyncio.wait_for(_iterate_after_the_block(4), 30)
    if settings.DATABASES["default"].get("DISABLE_SERVER_SIDE_CURSORS"):
        assert stock == ("b00", [f"b{i:02}" for i in range(1, 10)])
    else:
        assert stock == ("b00", ["ProgrammingError", "InvalidCursorName"])
    assert library == stock
