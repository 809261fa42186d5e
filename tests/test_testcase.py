"""django.test.TestCase suites keep passing with the library installed."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from django.db import transaction
from django.test import TestCase

from asgi_dbset import connection_set
from tests.testapp.models import Author, Book, Tag

# Also makes the suite's pool leak check run after each test of the class.
pytestmark = pytest.mark.django_db


class DecoratedViewsSeeTheTestsRows(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        # Uncommitted: only the test's own connection, in its transaction, sees it.
        author = Author.objects.create(name="only in this test")
        Book.objects.create(title="b", author=author)
        Tag.objects.create(name="t")

    def test_sync_client(self) -> None:
        data = self.client.get("/dashboard/").json()
        assert (data["authors"], data["books"], data["tags"]) == (1, 1, 1)
        # Every call stayed on the test's connection, the one in the transaction.
        assert data["lanes_used"] == 1

    async def test_async_client(self) -> None:
        data = (await self.async_client.get("/cbv/")).json()
        assert (data["authors"], data["books"], data["tags"]) == (1, 1, 1)
        assert data["lanes_used"] == 1

    def test_connection_set_inside_an_outer_atomic_block(self) -> None:
        with transaction.atomic():
            Author.objects.create(name="uncommitted")

            async def inside() -> tuple[list[int], int]:
                async with connection_set(parallelism=4) as dbset:
                    counts = await asyncio.gather(
                        *(
                            Author.objects.filter(name="uncommitted").acount()
                            for _ in range(4)
                        )
                    )
                    return counts, dbset.lanes_used

            counts, lanes_used = async_to_sync(inside)()
        assert counts == [1, 1, 1, 1]
        assert lanes_used == 1


class AtomicBlocksAreSavepointsOfTheTestsTransaction(TestCase):
    async def test_asgi_dbset_atomic_inside_a_test(self) -> None:
        import asgi_dbset

        async with connection_set(parallelism=4) as dbset:
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="kept")
            try:
                async with asgi_dbset.atomic():
                    await Author.objects.acreate(name="rolled back")
                    raise ZeroDivisionError
            except ZeroDivisionError:
                pass
            names = [
                name async for name in Author.objects.values_list("name", flat=True)
            ]
            # The blocks ran on the test's own connection (lane 0), inside its
            # transaction: savepoints, not transactions of their own.
            assert dbset.lanes_used == 1
        assert names == ["kept"]
