"""A transaction the request's thread opens between calls keeps its calls.

Async code opens a transaction on the request's own thread the way it must
today: ``await sync_to_async(transaction.set_autocommit)(False)``, or
``await sync_to_async(atomic.__enter__)()``. That runs on lane 0's thread but
is no ORM call, so lane 0 reports nothing when it happens. Every ORM call
gathered afterwards must still run inside that transaction, as on stock
Django: its writes roll back with it, its reads see its rows.

Each pattern runs twice side by side, as stock Django (no set) and in a set
whose extra lanes are already leased, and must give the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections, transaction
from django.db.models.signals import post_save

from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from tests.helpers import sleeping
from tests.testapp.models import Author, Tally

pytestmark = pytest.mark.django_db(transaction=True)


class RollbackRequestedError(Exception):
    pass


@contextlib.asynccontextmanager
async def request_like(parallel: bool) -> AsyncIterator[None]:
    """A request's thread; with *parallel*, a set whose extra lanes are leased
    (lane 0 has reported "no transaction" by then)."""
    async with ThreadSensitiveContext():
        if parallel:
            async with connection_set(parallelism=4, lease_timeout=5.0) as dbset:
                await asyncio.gather(*(sleeping(0.3).acount() for _ in range(4)))
                assert len(dbset.lanes) >= 3
                yield
        else:
            yield
        await sync_to_async(connections.close_all)()


async def writes_then_rollback(
    tag: str, before_writes: Callable[[], Awaitable[None]] | None = None
) -> list[bool]:
    """The core issue's first pattern, on the request's thread: a transaction
    opened there, four gathered writes and their reads, then a rollback.
    *before_writes* runs once the transaction is open."""
    await sync_to_async(transaction.set_autocommit)(False)
    try:
        if before_writes is not None:
            await before_writes()
        created = await asyncio.gather(
            *(Author.objects.acreate(name=f"{tag}{i}") for i in range(4))
        )
        seen = await asyncio.gather(
            *(Author.objects.filter(pk=a.pk).aexists() for a in created)
        )
        await sync_to_async(transaction.rollback)()
    finally:
        await sync_to_async(transaction.set_autocommit)(True)
    return list(seen)


async def writes_in_autocommit_off(parallel: bool, tag: str) -> list[bool]:
    async with request_like(parallel):
        return await writes_then_rollback(tag)


async def writes_in_an_entered_atomic(parallel: bool, tag: str) -> list[bool]:
    async with request_like(parallel):
        atomic = transaction.atomic()
        await sync_to_async(atomic.__enter__)()
        try:
            created = await asyncio.gather(
                *(Author.objects.acreate(name=f"{tag}{i}") for i in range(4))
            )
            seen = await asyncio.gather(
                *(Author.objects.filter(pk=a.pk).aexists() for a in created)
            )
            raise RollbackRequestedError
        except RollbackRequestedError as exc:
            await sync_to_async(atomic.__exit__)(type(exc), exc, None)
    return list(seen)


@pytest.mark.parametrize(
    "pattern", [writes_in_autocommit_off, writes_in_an_entered_atomic]
)
async def test_writes_gathered_in_a_transaction_roll_back_with_it(pattern) -> None:  # type: ignore[no-untyped-def]
    stock_seen = await pattern(False, "stock")
    stock_rows = await Author.objects.filter(name__startswith="stock").acount()
    seen = await pattern(True, "dbset")
    rows = await Author.objects.filter(name__startswith="dbset").acount()
    assert (stock_seen, stock_rows) == ([True] * 4, 0)
    assert (seen, rows) == (stock_seen, stock_rows)
    assert budget.total == 0


async def test_calls_leave_lane_zero_again_once_the_transaction_ends() -> None:
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
            await sync_to_async(transaction.set_autocommit)(False)
            await asyncio.gather(*(sleeping(0.01).acount() for _ in range(3)))
            inside = {r.lane for r in dbset.records}
            await sync_to_async(transaction.commit)()
            await sync_to_async(transaction.set_autocommit)(True)
            before = len(dbset.records)
            await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
            after = {r.lane for r in dbset.records[before:]}
        await sync_to_async(connections.close_all)()
    assert inside == {0}
    assert len(after) == 3
    assert budget.total == 0


def tally_elsewhere(sender: Any, instance: Author, **kwargs: Any) -> None:
    """A receiver that writes to another database than its model's."""
    Tally.objects.using("other").create(name=f"saved {instance.name}")


async def save_while_another_database_is_in_a_transaction(
    parallel: bool, tag: str
) -> int:
    """Lane 0 holds a transaction on ``other`` (entered through sync_to_async)
    and rolls it back; meanwhile an author is saved on ``default``, whose
    receiver writes to ``other``: on stock Django that write is inside lane 0's
    transaction and rolls back with it."""
    post_save.connect(tally_elsewhere, sender=Author)
    try:
        async with request_like(parallel):
            block = transaction.atomic(using="other")
            await sync_to_async(block.__enter__)()
            try:
                await asyncio.gather(
                    sleeping(0.3).acount(), Author.objects.acreate(name=tag)
                )
            finally:
                error = RollbackRequestedError()
                await sync_to_async(block.__exit__)(type(error), error, None)
    finally:
        post_save.disconnect(tally_elsewhere, sender=Author)
    return await Tally.objects.using("other").filter(name=f"saved {tag}").acount()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_a_call_for_one_database_stays_behind_lane_0s_transaction_on_another() -> (
    None
):
    stock = await save_while_another_database_is_in_a_transaction(False, "stock")
    library = await save_while_another_database_is_in_a_transaction(True, "library")
    assert library == stock == 0
    assert budget.total == 0
