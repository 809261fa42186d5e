"""Work that must share a connection does: aiterator() cursors, and aliases."""

from __future__ import annotations

import asyncio

import pytest

from asgi_dbset import OrphanedIteratorError, connection_set
from asgi_dbset.budget import budget
from tests.helpers import sleeping, timed
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
