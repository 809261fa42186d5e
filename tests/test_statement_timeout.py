"""STATEMENT_TIMEOUT and db_parallelism(statement_timeout=...) bound each query."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import (
    DatabaseError,
    IntegrityError,
    OperationalError,
    connections,
    transaction,
)
from django.db.models import F
from django.db.models.signals import post_save
from django.test import override_settings

import asgi_dbset
from asgi_dbset import ConnectionSet, connection_set, db_parallelism
from asgi_dbset.checks import check_settings
from tests.helpers import sleeping, timed
from tests.testapp.models import Author, Tag, Tally

pytestmark = pytest.mark.django_db(transaction=True)


def _pooled_timeouts() -> set[str]:
    """statement_timeout of every idle connection in the default pool."""
    pool = connections["default"].pool
    seen = set()
    conns = [pool.getconn(5) for _ in range(pool.get_stats()["pool_available"])]
    try:
        for conn in conns:
            seen.add(str(conn.execute("SHOW statement_timeout").fetchone()[0]))  # type: ignore[index]
    finally:
        for conn in conns:
            pool.putconn(conn)
    return seen


async def test_a_query_past_the_timeout_fails_and_the_lane_stays_usable() -> None:
    async with connection_set(parallelism=3, statement_timeout=0.2) as dbset:
        results, elapsed = await timed(
            asyncio.gather(
                sleeping(5).acount(),
                sleeping(5).acount(),
                sleeping(0.05).acount(),
                return_exceptions=True,
            )
        )
        assert elapsed < 1.5
        assert results[2] == 0
        for error in results[:2]:
            assert isinstance(error, OperationalError)
            assert isinstance(error.__cause__, psycopg.errors.QueryCanceled)
            assert "statement timeout" in str(error)
        # The same lanes keep serving queries under the limit.
        assert (
            await asyncio.gather(*(sleeping(0.05).acount() for _ in range(3)))
            == [0] * 3
        )
        assert dbset.lanes_used == 3
    # No connection goes back to the pool with the set's timeout on it.
    await asyncio.to_thread(connections.close_all)
    assert await asyncio.to_thread(_pooled_timeouts) <= {"0"}


@pytest.mark.parametrize("p", [1, 4])
async def test_a_block_rolled_back_after_a_timed_out_query_leaves_no_timeout(
    p: int,
) -> None:
    """The block's first call sets the timeout before its transaction begins
    (committed), and resets it inside; a query that times out in the block
    fails the transaction, and its rollback undoes the reset, not the set. The
    connection (lane 0's at parallelism 1, an extra lane's at 4) must still go
    back to the pool without the timeout."""

    async def block() -> None:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="rolled back")
            await sleeping(2).acount()

    async with ThreadSensitiveContext():
        try:
            async with connection_set(
                parallelism=p, statement_timeout=0.2, lease_timeout=5.0
            ):
                with pytest.raises(OperationalError):
                    await block()
        finally:
            await sync_to_async(connections.close_all)()
    assert not await Author.objects.filter(name="rolled back").aexists()
    await asyncio.to_thread(connections.close_all)
    assert await asyncio.to_thread(_pooled_timeouts) <= {"0"}


class RollbackRequestedError(Exception):
    pass


def roll_back_as_the_pool_does() -> None:
    """What psycopg_pool does to a connection given back inside a transaction
    (done here, so that the suite's check of such returns stays quiet), and
    the autocommit Django's next ``connect()`` gives it back."""
    conn = connections["default"].connection
    assert conn is not None
    conn.rollback()
    conn.autocommit = True


async def test_a_block_on_lane_0_rolled_back_outside_the_set_leaves_no_timeout() -> (
    None
):
    """A block on lane 0 whose task outlives its set is left open on the
    request's connection (the set cannot end it: docs/transactions.md), and
    what rolls it back is the pool, when Django gives the connection back.
    On stock Django (``transaction.atomic`` entered through ``sync_to_async``
    in such a task) the connection goes back as it came: no statement
    timeout. The set's must not stay on it either: the block's BEGIN set it
    before the transaction began (for the session) and reset it inside, which
    that rollback undid."""

    async def outcome(stock: bool) -> tuple[bool, set[str]]:
        entered, go = asyncio.Event(), asyncio.Event()

        async def block() -> None:
            if stock:
                atomic = transaction.atomic()
                await sync_to_async(atomic.__enter__)()
                await Author.objects.acreate(name="rolled back")
                entered.set()
                await go.wait()
                raise RollbackRequestedError  # (never left: its request ended)
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="rolled back")
                entered.set()
                await go.wait()
                raise RollbackRequestedError

        async with ThreadSensitiveContext():
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if not stock:
                        await stack.enter_async_context(
                            connection_set(parallelism=1, statement_timeout=0.2)
                        )
                    task = asyncio.ensure_future(block())
                    await entered.wait()
                go.set()
                with pytest.raises(RollbackRequestedError):
                    await asyncio.wait_for(task, 10)
                await sync_to_async(roll_back_as_the_pool_does)()
            finally:
                await sync_to_async(connections.close_all)()
        await asyncio.to_thread(connections.close_all)
        return (
            await Author.objects.filter(name="rolled back").aexists(),
            await asyncio.to_thread(_pooled_timeouts),
        )

    assert await outcome(stock=True) == (False, {"0"})
    assert await outcome(stock=False) == (False, {"0"})


@pytest.mark.parametrize("p", [None, 1, 4])
async def test_a_transaction_rolled_back_by_own_code_after_a_failed_call_leaves_no_timeout(
    p: int | None,
) -> None:
    """The request's thread opens a transaction itself (``sync_to_async``); a
    call of the set fails in it (its reset of the timeout is refused, and
    owed), and the thread's own code rolls it back, with no call of the set
    after. The timeout was set inside the transaction, so the rollback undoes
    it: the connection goes back as on stock Django (None: no set)."""

    async def body() -> None:
        await Tally.objects.acreate(name="taken")
        await sync_to_async(transaction.set_autocommit)(False)
        try:
            await Author.objects.acreate(name="rolled back")
            with pytest.raises(IntegrityError):
                await Tally.objects.acreate(name="taken")
        finally:
            await sync_to_async(transaction.rollback)()
            await sync_to_async(transaction.set_autocommit)(True)

    async with ThreadSensitiveContext():
        try:
            if p is None:
                await body()
            else:
                async with connection_set(
                    parallelism=p, statement_timeout=0.2, lease_timeout=5.0
                ):
                    await body()
        finally:
            await sync_to_async(connections.close_all)()
    assert not await Author.objects.filter(name="rolled back").aexists()
    await asyncio.to_thread(connections.close_all)
    assert await asyncio.to_thread(_pooled_timeouts) <= {"0"}


async def test_the_setting_applies_even_at_parallelism_one() -> None:
    with override_settings(ASGI_DBSET={"STATEMENT_TIMEOUT": 0.2}):
        async with connection_set() as dbset:
            assert dbset.parallelism == 1
            with pytest.raises(OperationalError, match="statement timeout"):
                await sleeping(5).acount()
            assert await sleeping(0.01).acount() == 0


async def test_the_decorator_argument() -> None:
    @db_parallelism(2, statement_timeout=0.2)
    async def view() -> list[object]:
        return await asyncio.gather(
            sleeping(5).acount(), sleeping(0.01).acount(), return_exceptions=True
        )

    slow, fast = await view()
    assert isinstance(slow, OperationalError)
    assert fast == 0


@pytest.mark.parametrize("bad", [0, -1, "5", True])
def test_bad_values_are_refused(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        db_parallelism(2, statement_timeout=bad)  # type: ignore[arg-type]
    with override_settings(ASGI_DBSET={"STATEMENT_TIMEOUT": bad}):
        assert [m.id for m in check_settings()] == ["asgi_dbset.E011"]


async def _aborted_then_query() -> str:
    """A query in lane 0's aborted user transaction: the error type it raises."""
    await Tag.objects.acreate(name="dup")
    await sync_to_async(transaction.set_autocommit)(False)
    try:
        with contextlib.suppress(IntegrityError):
            await Tag.objects.acreate(name="dup")
        try:
            await Author.objects.acount()
        except DatabaseError as exc:
            return f"{type(exc).__module__}.{type(exc).__name__}"
        return "no error"
    finally:
        await sync_to_async(transaction.rollback)()
        await sync_to_async(transaction.set_autocommit)(True)


@pytest.mark.parametrize("timeout", ["stock", None, 5.0])
async def test_a_query_in_an_aborted_transaction_raises_djangos_error(
    timeout: str | float | None,
) -> None:
    # The timeout is not set on a connection whose transaction has failed
    # (the SET would fail with psycopg's own error, not Django's): the ORM
    # query raises Django's InternalError, as on stock Django.
    async with ThreadSensitiveContext():
        try:
            if timeout == "stock":
                got = await _aborted_then_query()
            else:
                assert not isinstance(timeout, str)
                async with connection_set(parallelism=1, statement_timeout=timeout):
                    got = await _aborted_then_query()
        finally:
            await sync_to_async(connections.close_all)()
    assert got == "django.db.utils.InternalError"


# -- behind a transaction pooler: the timeout holds for each statement's own
# transaction, and the call keeps autocommit's semantics ----------------------


@contextlib.asynccontextmanager
async def stock_or_pooled(parallelism: int | None) -> AsyncIterator[None]:
    """Stock Django (None), or a set whose alias is transaction-pooled with a
    statement timeout."""
    async with ThreadSensitiveContext():
        try:
            if parallelism is None:
                yield
            else:
                async with ConnectionSet(
                    parallelism=parallelism,
                    lease_timeout=5.0,
                    statement_timeout=5.0,
                    transaction_pooled=frozenset({"default"}),
                ):
                    yield
        finally:
            await sync_to_async(connections.close_all)()


async def lock_outside_a_transaction() -> str:
    author = await Author.objects.acreate(name="locked")
    try:
        await Author.objects.select_for_update().aget(pk=author.pk)
    except transaction.TransactionManagementError as exc:
        return str(exc)
    return "locked outside a transaction"


@pytest.mark.parametrize("parallelism", [None, 1, 2])
async def test_pooled_select_for_update_outside_a_transaction_is_refused_as_on_stock(
    parallelism: int | None,
) -> None:
    async with stock_or_pooled(parallelism):
        got = await lock_outside_a_transaction()
    assert got == "select_for_update cannot be used outside of a transaction."


def tally_despite_a_duplicate(sender: Any, instance: Any, **kwargs: Any) -> None:
    """A receiver that recovers from an error in autocommit, as stock allows."""
    with contextlib.suppress(IntegrityError):
        Tally.objects.create(name="duplicate")
    Tally.objects.filter(name="duplicate").update(value=F("value") + 1)


@pytest.mark.parametrize("parallelism", [None, 1, 2])
async def test_pooled_calls_keep_autocommits_error_recovery(
    parallelism: int | None,
) -> None:
    await Tally.objects.acreate(name="duplicate")
    post_save.connect(tally_despite_a_duplicate, sender=Author)
    try:
        async with stock_or_pooled(parallelism):
            await Author.objects.acreate(name="saved")
    finally:
        post_save.disconnect(tally_despite_a_duplicate, sender=Author)
    assert await Author.objects.filter(name="saved").acount() == 1
    assert (await Tally.objects.aget(name="duplicate")).value == 1
