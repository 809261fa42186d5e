"""Cancellation and failures: no lane stays busy, no connection stays out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import connections, transaction
from django.db.models.signals import post_save

import asgi_dbset
from asgi_dbset import connection_set, get_stats
from asgi_dbset.budget import budget
from tests.helpers import active_sleeps, sleeping, timed
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


async def no_sleeps_within(seconds: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if await asyncio.to_thread(active_sleeps) == 0:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_a_timeout_around_a_gather_cancels_on_the_server() -> None:
    async with connection_set(parallelism=3) as dbset:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.4):
                await asyncio.gather(*(sleeping(20).acount() for _ in range(3)))
        assert await no_sleeps_within(1.0)
        # The same set keeps working, on the same lanes.
        results, elapsed = await timed(
            asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
        )
        assert results == [0, 0, 0]
        assert elapsed < 0.5
        assert not any(lane.busy for lane in dbset.lanes)
    assert budget.total == 0


async def test_calls_queued_on_lane_0_are_cancelled_like_the_others() -> None:
    """Under a full budget the calls behind lane 0's go to its thread at once
    (lane0_queued_calls); a cancelled one that runs has its query cancelled on
    the server, one that has not started never starts, and the call queued
    after them is not hit by a late cancel."""
    limit = budget.limit("default")
    taken = [budget.try_acquire("default") for _ in range(limit)]
    assert all(taken)
    before = get_stats()
    try:
        async with connection_set(parallelism=3) as dbset:
            first = asyncio.ensure_future(sleeping(0.3).acount())
            running = asyncio.ensure_future(sleeping(20).acount())
            never = asyncio.ensure_future(sleeping(20).acount())
            after = asyncio.ensure_future(sleeping(0.05).acount())
            assert await first == 0
            await asyncio.sleep(0.2)  # `running` is on the server now
            assert await asyncio.to_thread(active_sleeps) == 1
            never.cancel()
            running.cancel()
            results = await asyncio.gather(
                running, never, after, return_exceptions=True
            )
            assert isinstance(results[0], asyncio.CancelledError)
            assert isinstance(results[1], asyncio.CancelledError)
            assert results[2] == 0
            assert await no_sleeps_within(1.0)
            assert len(dbset.lanes) == 1
    finally:
        for _ in taken:
            budget.release("default")
    counters = get_stats()
    assert counters["lane0_queued_calls"] == before["lane0_queued_calls"] + 3
    assert counters["cancels"] > before["cancels"]
    assert budget.total == 0


async def test_a_failing_task_group_member_cancels_its_siblings_queries() -> None:
    async def boom() -> None:
        await asyncio.sleep(0.2)
        raise ValueError("boom")

    async with connection_set(parallelism=3):

        async def run_group() -> None:
            async with asyncio.TaskGroup() as group:
                group.create_task(sleeping(20).acount())
                group.create_task(sleeping(20).acount())
                group.create_task(boom())

        with pytest.raises(ExceptionGroup):
            await run_group()
        assert await no_sleeps_within(1.0)
    assert budget.total == 0


async def test_cancelling_the_task_that_owns_the_set() -> None:
    async def request() -> None:
        async with connection_set(parallelism=3):
            await asyncio.gather(*(sleeping(20).acount() for _ in range(3)))

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0.3)
    task.cancel()
    _, elapsed = await timed(asyncio.gather(task, return_exceptions=True))
    assert elapsed < 2
    assert await no_sleeps_within(1.0)
    assert budget.total == 0
    # The next set on the same workers is unaffected.
    async with connection_set(parallelism=3):
        assert await asyncio.gather(*(sleeping(0.01).acount() for _ in range(3))) == [
            0,
            0,
            0,
        ]


async def test_a_query_error_leaves_the_lane_usable() -> None:
    from django.db import DatabaseError

    from tests.testapp.models import Author

    async with connection_set(parallelism=2) as dbset:
        results = await asyncio.gather(
            sleeping(0.1).acount(),
            Author.objects.raw("SELECT * FROM no_such_table").__aiter__().__anext__(),
            return_exceptions=True,
        )
        assert results[0] == 0
        assert isinstance(results[1], DatabaseError)
        assert await asyncio.gather(
            sleeping(0.05).acount(), sleeping(0.05).acount()
        ) == [0, 0]
        assert len(dbset.lanes) == 2


# -- a query inside a transaction is not cancelled when its caller gives up -----
#
# Stock Django (sync_to_async) cannot interrupt its thread: the abandoned query
# finishes and the transaction goes on. A server-side cancel would abort the
# whole transaction instead, so the program could not commit.


async def in_request(
    p: int | None, fn: Callable[[], Awaitable[Any]], timeout: float | None = None
) -> Any:
    """*fn* in a request-like context: stock Django (*p* None) or a set of
    parallelism *p* (whose extra lanes are leased first)."""
    async with ThreadSensitiveContext():
        try:
            if p is None:
                return await fn()
            async with connection_set(
                parallelism=p, lease_timeout=5.0, statement_timeout=timeout
            ):
                if p > 1:
                    await asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
                return await fn()
        finally:
            await sync_to_async(connections.close_all)()


def names(prefix: str) -> list[str]:
    return sorted(
        Author.objects.filter(name__startswith=prefix).values_list("name", flat=True)
    )


async def user_transaction(prefix: str) -> str:
    await sync_to_async(transaction.set_autocommit)(False)
    try:
        await Author.objects.acreate(name=f"{prefix}-a")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                await sleeping(0.6).acount()
        await Author.objects.acreate(name=f"{prefix}-b")
        await sync_to_async(transaction.commit)()
        return "committed"
    except Exception as exc:
        await sync_to_async(transaction.rollback)()
        return f"{type(exc).__name__}: {exc}"
    finally:
        await sync_to_async(transaction.set_autocommit)(True)


async def atomic_block(prefix: str) -> str:
    try:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name=f"{prefix}-a")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await sleeping(0.6).acount()
            await Author.objects.acreate(name=f"{prefix}-b")
        return "committed"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize(
    ("p", "timeout"), [(None, None), (1, None), (1, 5.0), (4, None)]
)
async def test_giving_up_on_a_query_in_a_user_transaction_keeps_it(
    p: int | None, timeout: float | None
) -> None:
    out = await in_request(p, lambda: user_transaction("ut"), timeout)
    assert (out, await sync_to_async(names)("ut")) == ("committed", ["ut-a", "ut-b"])


@pytest.mark.parametrize(("p", "timeout"), [(1, None), (1, 5.0), (4, None)])
async def test_giving_up_on_a_query_in_a_block_keeps_the_block(
    p: int, timeout: float | None
) -> None:
    out = await in_request(p, lambda: atomic_block("ab"), timeout)
    assert (out, await sync_to_async(names)("ab")) == ("committed", ["ab-a", "ab-b"])


@pytest.mark.parametrize("p", [1, 4])
async def test_giving_up_on_a_get_or_create_in_a_block_keeps_the_block(p: int) -> None:
    # The abandoned call runs on to its end, as on stock: its row is created
    # inside its savepoint and the block commits it.
    def slow_save(sender: Any, instance: Author, **kwargs: Any) -> None:
        if instance.name.startswith("go-"):
            sleeping(0.6).count()

    async def body() -> str:
        try:
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="goc-a")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await Author.objects.aget_or_create(name="go-x")
                await Author.objects.acreate(name="goc-b")
            return "committed"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    post_save.connect(slow_save, sender=Author)
    try:
        out = await in_request(p, body, 5.0 if p == 1 else None)
    finally:
        post_save.disconnect(slow_save, sender=Author)
    assert (out, await sync_to_async(names)("go")) == (
        "committed",
        ["go-x", "goc-a", "goc-b"],
    )


@pytest.mark.parametrize("p", [1, 4])
async def test_a_block_left_on_an_exception_cancels_the_query_its_caller_gave_up(
    p: int,
) -> None:
    # The nested block rolls back to its savepoint anyway: the abandoned
    # get_or_create in it is cancelled then (its own savepoint rollback goes
    # through), the block's exit does not wait for it, and the outer block
    # goes on and commits.
    def slow_save(sender: Any, instance: Author, **kwargs: Any) -> None:
        if instance.name.startswith("nb-"):
            sleeping(30).count()

    async def body() -> tuple[str, float]:
        try:
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="nbo-a")
                _, took = await timed(nested())
                await Author.objects.acreate(name="nbo-b")
            return "committed", took
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}", 0.0

    async def nested() -> None:
        with contextlib.suppress(TimeoutError):
            async with asgi_dbset.atomic():
                async with asyncio.timeout(0.3):
                    await Author.objects.aget_or_create(name="nb-x")

    post_save.connect(slow_save, sender=Author)
    try:
        (out, took) = await in_request(p, body, 5.0 if p == 1 else None)
    finally:
        post_save.disconnect(slow_save, sender=Author)
    assert (out, await sync_to_async(names)("nb")) == ("committed", ["nbo-a", "nbo-b"])
    assert took < 5, took
    assert await asyncio.to_thread(active_sleeps) == 0


@pytest.mark.parametrize("p", [1, 4])
async def test_a_block_left_while_its_abandoned_call_is_between_queries_does_not_wait(
    p: int,
) -> None:
    # The abandoned call is in Python code (an HTTP call in a receiver, say)
    # when the block is left: its next query is refused, so the rollback does
    # not wait for it.
    def slow_receiver(sender: Any, instance: Author, **kwargs: Any) -> None:
        if instance.name.startswith("bq-"):
            time.sleep(0.5)
            sleeping(3).count()

    async def body() -> float:
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asgi_dbset.atomic():
                async with asyncio.timeout(0.2):
                    await Author.objects.acreate(name="bq-x")
        return time.monotonic() - started

    post_save.connect(slow_receiver, sender=Author)
    try:
        took = await in_request(p, body, 30.0 if p == 1 else None)
    finally:
        post_save.disconnect(slow_receiver, sender=Author)
    assert await sync_to_async(names)("bq") == []
    assert took < 1.5, f"the block's exit waited {took:.2f} s for the abandoned call"


@pytest.mark.parametrize("savepoint", [True, False])
async def test_an_outermost_block_on_lane_0_left_on_an_exception_does_not_wait(
    savepoint: bool,
) -> None:
    # At parallelism 1 (with a statement timeout, so calls are routed) the
    # block is on lane 0 and is a whole transaction, whatever `savepoint`
    # says: its rollback cancels the query its caller gave up on.
    async def body() -> float:
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asgi_dbset.atomic(savepoint=savepoint):
                await Author.objects.acreate(name="sp-a")
                async with asyncio.timeout(0.2):
                    await sleeping(3).acount()
        return time.monotonic() - started

    took = await in_request(1, body, 30.0)
    assert await sync_to_async(names)("sp") == []
    assert took < 1.5, f"the block's exit waited {took:.2f} s for the abandoned query"


# -- a cancel aimed at a query whose backend was terminated ---------------------------
#
# The cancel of a call whose connection's backend died (pg_terminate_backend
# from elsewhere) is a no-op in psycopg (cancel_safe on a closed connection
# returns; on one not yet seen closed, the server ignores a cancel for a pid
# that is gone): it never raises, so the call's cancel loop ends as any other.
# What a request sees: no hang, no query left on the server, every connection
# back in its pool.


def terminate_one_sleep() -> int:
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM "
            "pg_stat_activity WHERE datname = %s AND state = 'active' AND query "
            "LIKE %s AND pid <> pg_backend_pid() LIMIT 1) AS one",
            [settings.DATABASES["default"]["NAME"], "%pg_sleep%"],
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("how", ["timeout", "task.cancel"])
@pytest.mark.parametrize(("p", "timeout"), [(4, None), (1, 30.0)])
async def test_cancelling_calls_one_of_whose_backends_was_terminated(
    p: int, timeout: float | None, how: str
) -> None:
    async def gathered() -> list[Any]:
        return await asyncio.gather(
            *(sleeping(20).acount() for _ in range(3)), return_exceptions=True
        )

    async with ThreadSensitiveContext():
        async with connection_set(parallelism=p, statement_timeout=timeout):
            task = asyncio.ensure_future(gathered())
            await asyncio.sleep(0.4)  # every lane's query is on the server
            assert await asyncio.to_thread(terminate_one_sleep) == 1
            if how == "timeout":
                # (At parallelism 1 the calls after the terminated one fail at
                # once on its dead connection, as on stock: the gather ends.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await asyncio.shield(task)
            else:
                await asyncio.sleep(0.2)
            task.cancel()
            _, elapsed = await timed(
                asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
            )
            assert elapsed < 2
            assert await no_sleeps_within(1.0)
            # The set goes on: a dead lane is retired, lane 0's dead connection
            # fails the next call as on stock, then Django replaces it.
            await asyncio.gather(
                *(sleeping(0.01).acount() for _ in range(p)), return_exceptions=True
            )
        await sync_to_async(connections.close_all)()
    assert budget.total == 0
