"""Regression tests for defects a review of the core found (each once proven)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from asgiref.sync import ThreadSensitiveContext, async_to_sync, sync_to_async
from django.db import OperationalError, connection, transaction
from django.db.models.signals import post_save
from django.test import override_settings

import asgi_dbset
from asgi_dbset import ConnectionSet, active_set, connection_set
from asgi_dbset.budget import budget
from asgi_dbset.targets import target_of
from tests.helpers import active_sleeps, sleeping, timed
from tests.testapp.models import Author, Book, Tally

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


async def test_a_cancelled_call_does_not_erase_the_callers_set() -> None:
    async with connection_set(parallelism=3) as dbset:
        await asyncio.gather(*(sleeping(0.05).acount() for _ in range(3)))
        # One call awaited in this very task (a gather would give each call a
        # task, and so a context, of its own).
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await sleeping(5).acount()
        # Before the fix, the lane's context (where the set is hidden) was
        # copied back into this task: later calls silently ran as stock Django.
        assert active_set() is dbset
        _, elapsed = await timed(
            asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
        )
        assert elapsed < 0.5


@pytest.mark.parametrize("after", [0, 0.005, 0.02])
async def test_a_call_abandoned_at_any_moment_leaves_no_query_running(
    after: float,
) -> None:
    async with ThreadSensitiveContext():  # a new request: lane 0 not even connected
        async with connection_set(parallelism=3):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(after):
                    await asyncio.gather(*(sleeping(3).acount() for _ in range(3)))
            await asyncio.sleep(0.5)
            assert await asyncio.to_thread(active_sleeps) == 0
        await sync_to_async(_close_all)()


def _close_all() -> None:
    from django.db import connections

    connections.close_all()


async def test_a_cancelled_waiter_raises_cancelled_not_value_error() -> None:
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=1, statement_timeout=5):
            # Other thread-sensitive work keeps the request thread busy.
            busy = asyncio.ensure_future(sync_to_async(time.sleep)(0.3))
            await asyncio.sleep(0.01)
            first = asyncio.ensure_future(Author.objects.acount())
            second = asyncio.ensure_future(Author.objects.acount())
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await asyncio.gather(first, second)
            assert first.cancelled()
            assert second.cancelled()
            await busy
        await sync_to_async(_close_all)()
    assert budget.total == 0


async def test_an_aiterator_opened_before_the_set_stays_on_its_connection() -> None:
    await Author.objects.abulk_create([Author(name=f"a{i}") for i in range(6)])
    iterator = Author.objects.order_by("name").aiterator(chunk_size=2).__aiter__()
    first = await iterator.__anext__()  # opened as stock Django: on lane 0's thread
    async with connection_set(parallelism=3) as dbset:
        # Warm pooled lanes, then ask for the next chunk while lane 0 is busy.
        await asyncio.gather(sleeping(0.1).acount(), sleeping(0.1).acount())
        _, second = await asyncio.gather(sleeping(0.3).acount(), iterator.__anext__())
        rest = [author.name async for author in iterator]
    assert [first.name, second.name, *rest] == [f"a{i}" for i in range(6)]
    assert {r.lane for r in dbset.records if r.name == "next_slice"} == {0}


class RollbackRequestedError(Exception):
    pass


async def test_calls_inside_a_transaction_opened_later_on_lane_zero() -> None:
    async def parallel_part(pk: int) -> list[object]:
        return await asyncio.gather(
            Author.objects.filter(pk=pk).aexists(),
            Author.objects.filter(pk=pk).aexists(),
            Author.objects.acreate(name="must roll back"),
        )

    seen: list[object] = []

    def in_transaction() -> None:
        try:
            with transaction.atomic():
                author = Author.objects.create(name="in the transaction")
                seen.extend(async_to_sync(parallel_part)(author.pk)[:2])
                raise RollbackRequestedError
        except RollbackRequestedError:
            pass

    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3):
            # Lanes are leased and lane 0 reports "no transaction"...
            await asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
            # ...then its thread opens one and calls back into async code.
            await sync_to_async(in_transaction)()
        await sync_to_async(_close_all)()
    assert seen == [True, True]
    assert await Author.objects.filter(name="must roll back").acount() == 0


def test_a_set_opened_inside_a_transaction_keeps_its_first_calls_on_lane_zero() -> None:
    # Lane 0 has not reported yet when the 2nd and 3rd calls are handed to extra
    # lanes; their threads wait for its report, which says "in a transaction",
    # and hand the calls back unrun.
    async def parallel_part(pk: int) -> tuple[list[bool], set[int]]:
        async with connection_set(parallelism=3) as dbset:
            seen = await asyncio.gather(
                *(Author.objects.filter(pk=pk).aexists() for _ in range(3))
            )
        return seen, {record.lane for record in dbset.records}

    with transaction.atomic():
        author = Author.objects.create(name="not committed")
        seen, lanes = async_to_sync(parallel_part)(author.pk)
        transaction.set_rollback(True)
    assert seen == [True, True, True]
    assert lanes == {0}
    assert budget.total == 0


async def test_calls_that_wait_for_lane_zeros_report_start_when_it_comes() -> None:
    # Once lane 0 was seen inside a transaction, later calls wait on the loop
    # (not on extra lanes) for its next report; they must start when lane 0
    # reports, not when its call ends.
    async def phase(seconds: float) -> float:
        _, elapsed = await timed(
            asyncio.gather(*(sleeping(seconds).acount() for _ in range(3)))
        )
        return elapsed

    def in_and_out_of_a_transaction() -> float:
        with transaction.atomic():
            async_to_sync(phase)(0.01)  # all on lane 0: it reports the transaction
        return async_to_sync(phase)(0.5)  # another caller: a new report is due

    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3) as dbset:
            elapsed = await sync_to_async(in_and_out_of_a_transaction)()
        await sync_to_async(_close_all)()
    # Parallel: about 0.5 s; waiting for lane 0's call to end first: 1 s or more.
    assert elapsed < 0.8
    assert len({record.lane for record in dbset.records}) == 3
    assert budget.total == 0


async def test_calls_waiting_for_a_report_that_will_not_come_are_not_held() -> None:
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3) as dbset:
            # Lane 0's thread is busy with work the set does not see: the next
            # call waits behind it, and the two after it are handed to extra
            # lanes, to wait there for the report that call makes when it starts.
            busy = asyncio.ensure_future(sync_to_async(time.sleep)(0.3))
            await asyncio.sleep(0.01)
            first = asyncio.ensure_future(Author.objects.acount())
            await asyncio.sleep(0)
            others = asyncio.gather(Author.objects.acount(), Book.objects.acount())
            await asyncio.sleep(0.05)
            assert dbset.lanes[0].busy
            # Its caller gives up before it starts: it never reports...
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            # ...and the waiting calls run as soon as lane 0's thread says so,
            # not after their threads' 10 s bound on the wait.
            counts, elapsed = await timed(others)
            assert counts == [0, 0]
            assert elapsed < 3
            await busy
        await sync_to_async(_close_all)()
    assert budget.total == 0


# -- calls from sync code under async_to_sync, gathered with the view's calls --------
#
# A view gathers its own sync_to_async(service)() with ORM calls; service saves
# an Author, and Django runs its async post_save receiver through async_to_sync
# on the request's thread, which stays blocked until the receiver is done. The
# receiver's ORM calls come from a new caller while lane 0's call (the view's)
# is queued on that very thread, behind service. Before the fix they waited for
# lane 0 (or for its report of that call) and hung (a block the receiver opens
# for good: its BEGIN outlasts the cancellation); stock Django runs them at once
# on the blocked thread, inside the transaction it holds.


async def receiver_counts(seen: list[object]) -> None:
    seen.append(await Book.objects.acount())


async def receiver_reads_the_transactions_row(seen: list[object]) -> None:
    mine = Author.objects.filter(name="saved in sync code")
    seen.extend(await asyncio.gather(mine.acount(), mine.aexists()))


async def receiver_opens_a_block(seen: list[object]) -> None:
    async with asgi_dbset.atomic():
        await Tally.objects.acreate(name="in the receiver's block")
        seen.append(await Tally.objects.acount())


def service_saves() -> None:
    Author.objects.create(name="saved in sync code")


def service_saves_and_rolls_back() -> None:
    try:
        with transaction.atomic():
            Author.objects.create(name="saved in sync code")
            raise RollbackRequestedError
    except RollbackRequestedError:
        pass


async def gathered_with_a_receiver(
    receiver: Callable[[list[object]], Awaitable[None]],
    service: Callable[[], None],
    parallel: bool,
    leased: bool,
) -> tuple[object, list[object], list[str], int]:
    """What the view's gather returned, what the receiver saw, and the rows
    left; on stock Django, or in a set (with its extra lanes leased first)."""
    seen: list[object] = []

    async def on_save(**kwargs: Any) -> None:
        await receiver(seen)

    post_save.connect(on_save, sender=Author, weak=False)
    try:
        async with ThreadSensitiveContext():
            async with contextlib.AsyncExitStack() as stack:
                if parallel:
                    await stack.enter_async_context(
                        connection_set(parallelism=4, lease_timeout=5.0)
                    )
                    if leased:
                        await asyncio.gather(
                            *(sleeping(0.2).acount() for _ in range(4))
                        )
                result: object
                try:
                    result = await asyncio.wait_for(
                        asyncio.gather(
                            sync_to_async(service)(),
                            Author.objects.acount(),
                            Book.objects.acount(),
                        ),
                        10,
                    )
                except TimeoutError:
                    result = "hung"
            await sync_to_async(_close_all)()
    finally:
        post_save.disconnect(on_save, sender=Author)
    authors = [name async for name in Author.objects.values_list("name", flat=True)]
    tallies = await Tally.objects.acount()
    await Author.objects.all().adelete()
    await Tally.objects.all().adelete()
    return result, seen, authors, tallies


@pytest.mark.parametrize("leased", [True, False], ids=["leased", "no-lanes-yet"])
@pytest.mark.parametrize(
    ("receiver", "service"),
    [
        (receiver_counts, service_saves),
        (receiver_reads_the_transactions_row, service_saves_and_rolls_back),
        (receiver_opens_a_block, service_saves),
        (receiver_opens_a_block, service_saves_and_rolls_back),
    ],
    ids=["count", "in-the-transaction", "block", "block-in-the-transaction"],
)
async def test_an_async_receiver_of_sync_code_gathered_with_orm_calls_runs_as_stock(
    receiver: Callable[[list[object]], Awaitable[None]],
    service: Callable[[], None],
    leased: bool,
) -> None:
    stock = await gathered_with_a_receiver(receiver, service, False, leased)
    assert stock[0] != "hung"
    assert await gathered_with_a_receiver(receiver, service, True, leased) == stock
    assert budget.total == 0


# How much longer a block's entry and exit take on their thread (see slowed()).
SLOWER = {"enter": 0.0, "leave": 0.0}


@contextlib.contextmanager
def slowed() -> Any:
    """Each block's entry and exit take ``SLOWER`` seconds more on the thread
    that runs them, after Django's atomic has done its part there: the window
    in which a cancelled caller has given up on an entry or exit that goes
    on (a slow SAVEPOINT or COMMIT round trip)."""
    from asgi_dbset import blocks

    enter, leave = blocks._enter, blocks._leave

    def slow_enter(*args: Any) -> Any:
        entered = enter(*args)
        time.sleep(SLOWER["enter"])
        return entered

    def slow_leave(*args: Any) -> None:
        leave(*args)
        time.sleep(SLOWER["leave"])

    blocks._enter, blocks._leave = slow_enter, slow_leave  # type: ignore[assignment]
    try:
        yield
    finally:
        blocks._enter, blocks._leave = enter, leave  # type: ignore[assignment]
        SLOWER.update(enter=0.0, leave=0.0)


def in_a_transaction() -> bool:
    return connection.in_atomic_block or not connection.get_autocommit()


async def receiver_gives_up_on_its_blocks(seen: list[object]) -> None:
    # Cancelled while its first block is entered: the block is never in.
    SLOWER["enter"] = 0.3
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.1), asgi_dbset.atomic():
            await Tally.objects.acreate(name="never written")
    SLOWER["enter"] = 0.0
    # Cancelled while its second block is left: the block ends as it would.
    block = asgi_dbset.atomic()
    await block.__aenter__()
    await Tally.objects.acreate(name="written in the block")
    SLOWER["leave"] = 0.3
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.1):
            await block.__aexit__(None, None, None)
    SLOWER["leave"] = 0.0
    seen.append(await Tally.objects.acount())
    seen.append(await sync_to_async(in_a_transaction)())


def stock_blocks_given_up() -> None:
    # Stock Django's outcomes of the two: a block that fails as it starts,
    # and one left normally (its caller's cancellation comes after it).
    with contextlib.suppress(TimeoutError), transaction.atomic():
        raise TimeoutError
    with transaction.atomic():
        Tally.objects.create(name="written in the block")


async def stock_receiver_gives_up_on_its_blocks(seen: list[object]) -> None:
    await sync_to_async(stock_blocks_given_up)()
    seen.append(await Tally.objects.acount())
    seen.append(await sync_to_async(in_a_transaction)())


@pytest.mark.parametrize(
    "service",
    [service_saves, service_saves_and_rolls_back],
    ids=["autocommit", "in-the-transaction"],
)
async def test_a_receivers_block_cancelled_as_it_is_entered_or_left_ends_as_on_stock(
    service: Callable[[], None],
) -> None:
    """The blocks of an async receiver run under ``async_to_sync`` beside the
    view's calls are entered and left as stock Django (on its blocked thread,
    no lane: ``ConnectionSet._behind_own_caller``). A cancellation while one
    is entered or left must not leave it half done: the receiver's thread in
    a transaction, or a block that neither committed nor rolled back."""
    stock = await gathered_with_a_receiver(
        stock_receiver_gives_up_on_its_blocks, service, False, False
    )
    assert stock[0] != "hung"
    with slowed():
        lib = await gathered_with_a_receiver(
            receiver_gives_up_on_its_blocks, service, True, False
        )
    assert lib == stock
    assert budget.total == 0


async def receiver_sleeps(seen: list[object]) -> None:
    seen.append(await sleeping(3).acount())


def statement_timeout_of_this_thread() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('statement_timeout')")
        row = cursor.fetchone()
    return str(row[0]) if row else ""


@pytest.mark.parametrize("how", ["session", "transaction-pooled", "recorded"])
@pytest.mark.parametrize(
    "service",
    [service_saves, service_saves_and_rolls_back],
    ids=["autocommit", "atomic"],
)
async def test_a_receiver_call_run_on_its_blocked_thread_keeps_the_statement_timeout(
    service: Callable[[], None], how: str
) -> None:
    """The calls a sync caller blocked in async_to_sync runs at once on its own
    thread (the case above) get the set's statement timeout like every call
    of the set - set for the session, or per transaction for a database
    behind a transaction pooler - and the connection is left without it."""
    seen: list[object] = []

    async def on_save(**kwargs: Any) -> None:
        await receiver_sleeps(seen)

    post_save.connect(on_save, sender=Author, weak=False)
    try:
        async with ThreadSensitiveContext():
            dbset = ConnectionSet(
                parallelism=4,
                statement_timeout=0.3,
                transaction_pooled=frozenset(
                    ["default"] if how == "transaction-pooled" else []
                ),
            )
            dbset.record_stock_calls = how == "recorded"
            async with dbset:
                (result, after), elapsed = await timed(
                    asyncio.wait_for(
                        asyncio.gather(
                            asyncio.gather(
                                sync_to_async(service)(),
                                Author.objects.acount(),
                                return_exceptions=True,
                            ),
                            sync_to_async(statement_timeout_of_this_thread)(),
                        ),
                        10,
                    )
                )
            left = await sync_to_async(statement_timeout_of_this_thread)()
            assert left == "0", (left, after, result)
            await sync_to_async(_close_all)()
    finally:
        post_save.disconnect(on_save, sender=Author)
    error = result[0]
    assert isinstance(error, OperationalError), result
    assert isinstance(error.__cause__, psycopg.errors.QueryCanceled)
    assert elapsed < 2
    assert seen == []
    assert after == "0"  # (the next code on that thread: no timeout left)
    await Author.objects.all().adelete()
    assert budget.total == 0


class ReadReplicaRouter:
    def db_for_read(self, model: object, **hints: object) -> str:
        return "other"

    def db_for_write(self, model: object, **hints: object) -> str:
        return "default"

    def allow_relation(self, *args: object, **kwargs: object) -> bool:
        return True


@override_settings(DATABASE_ROUTERS=[ReadReplicaRouter()])
def test_select_for_update_targets_the_write_database() -> None:
    qs = Author.objects.select_for_update()
    assert target_of(qs.get, (), {}) is not None
    assert target_of(qs.get, (), {}).alias == "default"  # type: ignore[union-attr]
    assert target_of(Author.objects.all().count, (), {}).alias == "other"  # type: ignore[union-attr]


def test_related_managers_route_by_their_instance() -> None:
    author = Author(name="x", pk=1)
    author._state.db = "other"
    manager = author.books
    target = target_of(manager.create, (), {})
    assert target is not None
    assert target.alias == "other"
    assert target_of(Book.objects.using("other").count, (), {}).alias == "other"  # type: ignore[union-attr]


SPIN = """
import asyncio, django
from django.conf import settings
settings.configure()
django.setup()
from asgi_dbset.dbset import ConnectionSet

async def main():
    async with ConnectionSet(parallelism=2) as dbset:
        async def ends_at_once():
            return None
        # Ends in the loop iteration in which the set starts closing, so its
        # done-callback is still only scheduled when the release looks.
        dbset._scheduler._spawn(ends_at_once())
    print("closed")

asyncio.run(main())
"""


def test_closing_with_a_background_task_that_just_ended_does_not_spin() -> None:
    import subprocess
    import sys

    # In a subprocess: the old code spun without yielding, which no timeout
    # inside the test's own event loop could interrupt (Python 3.12+).
    result = subprocess.run(
        [sys.executable, "-c", SPIN], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "closed"
