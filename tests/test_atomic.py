"""asgi_dbset.atomic: Django's transaction.atomic for async code, on one lane.

Each pattern is also written the way async code must write it on stock Django
(a sync function wrapped in ``sync_to_async``), and both must leave the same
rows behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from asgiref.sync import ThreadSensitiveContext, async_to_sync, sync_to_async
from django.conf import settings
from django.db import connections, transaction
from django.db.models.signals import post_save

import asgi_dbset
from asgi_dbset import connection_set, db_parallelism
from asgi_dbset.budget import budget
from tests.helpers import active_sleeps, sleeping, timed
from tests.testapp.models import Author, Tally

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


class RollbackRequestedError(Exception):
    pass


@contextlib.asynccontextmanager
async def request_like(parallelism: int = 4) -> AsyncIterator[Any]:
    """A request's thread and set, with its extra lanes leased."""
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=parallelism, lease_timeout=5.0) as dbset:
            if parallelism > 1:
                await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
            yield dbset
        await sync_to_async(connections.close_all)()


def names(prefix: str, alias: str = "default") -> list[str]:
    return sorted(
        Author.objects.using(alias)
        .filter(name__startswith=prefix)
        .values_list("name", flat=True)
    )


async def anames(prefix: str, alias: str = "default") -> list[str]:
    return await sync_to_async(names)(prefix, alias)


def idle_in_transaction() -> int:
    """Sessions on this suite's test databases left idle inside a transaction."""
    databases = [settings.DATABASES[alias]["NAME"] for alias in ("default", "other")]
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s) "
            "AND state LIKE 'idle in transaction%%'",
            [databases],
        ).fetchone()
    return int(row[0]) if row else 0


# -- commit and rollback -------------------------------------------------------------


def stock_create(prefix: str, fail: bool) -> None:
    with transaction.atomic():
        for i in range(3):
            Author.objects.create(name=f"{prefix}{i}")
        if fail:
            raise RollbackRequestedError


async def atomic_create(prefix: str, fail: bool) -> None:
    async with asgi_dbset.atomic():
        await asyncio.gather(
            *(Author.objects.acreate(name=f"{prefix}{i}") for i in range(3))
        )
        if fail:
            raise RollbackRequestedError


@pytest.mark.parametrize("fail", [False, True])
async def test_commit_on_success_and_rollback_on_an_exception(fail: bool) -> None:
    async with request_like():
        with contextlib.suppress(RollbackRequestedError):
            await sync_to_async(stock_create)("stock", fail)
        with contextlib.suppress(RollbackRequestedError):
            await atomic_create("lib", fail)
    stock = await anames("stock")
    assert stock == ([] if fail else ["stock0", "stock1", "stock2"])
    assert [n.replace("lib", "stock") for n in await anames("lib")] == stock
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def test_rollback_on_cancellation_reaches_the_server() -> None:
    async def write_then_hang() -> None:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="cancelled")
            await sleeping(30).acount()

    async with request_like():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await write_then_hang()
        assert await asyncio.to_thread(active_sleeps) == 0
    assert await anames("cancelled") == []
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


@contextlib.contextmanager
def slow_enter(seconds: float) -> Any:
    """Each block's entry takes *seconds* more on its lane's thread, after
    Django's atomic is entered there: the window in which a cancelled caller
    has given up on an entry that went on (a slow SAVEPOINT round trip)."""
    import time

    from asgi_dbset import blocks

    enter = blocks._enter

    def slow(*args: Any) -> Any:
        entered = enter(*args)
        time.sleep(seconds)
        return entered

    blocks._enter = slow  # type: ignore[assignment]
    try:
        yield
    finally:
        blocks._enter = enter  # type: ignore[assignment]


def stock_inner_gives_up(prefix: str) -> None:
    # Stock Django: an inner block that fails as it starts leaves the outer
    # one to commit.
    with transaction.atomic():
        Author.objects.create(name=f"{prefix}-outer")
        with contextlib.suppress(TimeoutError):
            with transaction.atomic():
                raise TimeoutError
        Author.objects.create(name=f"{prefix}-after")


@pytest.mark.parametrize("parallelism", [1, 4])
@pytest.mark.parametrize("nested", [True, False])
async def test_a_block_cancelled_while_it_is_entered_is_left_as_django_leaves_it(
    parallelism: int, nested: bool
) -> None:
    # The entry goes on on the lane's thread after its caller gave up: the
    # block must be left (rolled back) there, or the lane stays inside it -
    # and an enclosing block's exit pops the abandoned savepoint instead of
    # committing, or later writes on the lane are lost with the set.
    async def lib(prefix: str) -> None:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name=f"{prefix}-outer")
            with contextlib.suppress(TimeoutError), slow_enter(0.3):
                async with asyncio.timeout(0.1), asgi_dbset.atomic():
                    pass
            await Author.objects.acreate(name=f"{prefix}-after")

    async def lib_outermost(prefix: str) -> None:
        with contextlib.suppress(TimeoutError), slow_enter(0.3):
            async with asyncio.timeout(0.1), asgi_dbset.atomic():
                pass
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name=f"{prefix}-outer")
        await Author.objects.acreate(name=f"{prefix}-after")

    async with request_like(parallelism):
        await sync_to_async(stock_inner_gives_up)("stock")
        await (lib if nested else lib_outermost)("lib")
        lane0_in_block = await sync_to_async(
            lambda: connections["default"].in_atomic_block
        )()
    stock = await anames("stock")
    assert stock == ["stock-after", "stock-outer"]
    assert [n.replace("lib", "stock") for n in await anames("lib")] == stock
    assert not lane0_in_block
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


def stock_send_inside_then_fail(prefix: str) -> None:
    with contextlib.suppress(RollbackRequestedError), transaction.atomic():
        Author.objects.create(name=f"{prefix}-before")
        Author.objects.create(name=f"{prefix}-after")
        raise RollbackRequestedError


async def test_a_block_open_when_the_response_is_sent_keeps_its_lane() -> None:
    # The middleware returns a set's idle extra lanes as the response's last
    # body goes out; a block's lane is idle between its calls, but inside its
    # transaction: it stays until the block ends, which here rolls back.
    from asgi_dbset import DBSetMiddleware, db_parallelism
    from tests.asgi import request
    from tests.helpers import checked_out

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with db_parallelism(4):
            await asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
            with contextlib.suppress(RollbackRequestedError):
                async with asgi_dbset.atomic():
                    await Author.objects.acreate(name="lib-before")
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": []}
                    )
                    await send({"type": "http.response.body", "body": b"sent"})
                    await Author.objects.acreate(name="lib-after")
                    raise RollbackRequestedError

    async with ThreadSensitiveContext():
        await sync_to_async(stock_send_inside_then_fail)("stock")
        await sync_to_async(connections.close_all)()
    before = checked_out()
    response = await request(DBSetMiddleware(app), "/")
    assert response.body == b"sent"
    assert checked_out() == before
    assert budget.total == 0
    stock = await anames("stock")
    assert stock == []
    assert await anames("lib") == stock
    assert await asyncio.to_thread(idle_in_transaction) == 0


@pytest.mark.parametrize("then", ["writes", "registers_on_commit", "leaves"])
async def test_a_block_that_outlives_its_request_is_refused_and_rolled_back(
    then: str,
) -> None:
    # A view gathers a writer and a task that fails: gather does not cancel
    # the writer, the view answers 500 and the request's set closes while the
    # writer's block is still open. The block must not end half committed
    # (its first write rolled back with its lane, its next one autocommitted
    # as stock Django outside it), nor hang in its exit, nor give its lane
    # back inside its transaction: the set rolls it back on its lane as it
    # closes, and what the block does next raises CallNotRunError - its next
    # call, an on_commit (whose callback never runs), or its normal exit.
    from asgi_dbset import CallNotRunError, DBSetMiddleware, db_parallelism
    from tests.asgi import request
    from tests.helpers import checked_out

    writers: list[asyncio.Task[None]] = []
    callbacks: list[str] = []

    async def writer() -> None:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="outlived-1")
            await sleeping(0.4).acount()  # the set closes meanwhile
            if then == "writes":
                await Author.objects.acreate(name="outlived-2")
            elif then == "registers_on_commit":
                await asgi_dbset.on_commit(lambda: callbacks.append("ran"))

    async def boom() -> None:
        await asyncio.sleep(0.2)
        raise RollbackRequestedError

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with db_parallelism(4):
            await asyncio.gather(*(sleeping(0.05).acount() for _ in range(4)))
            task = asyncio.ensure_future(writer())
            writers.append(task)
            status = 200
            try:
                await asyncio.gather(task, boom())
            except RollbackRequestedError:
                status = 500  # (as Django's handler answers a view's exception)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    before = checked_out()
    response = await request(DBSetMiddleware(app), "/")
    assert response.status == 500
    _, pending = await asyncio.wait(writers, timeout=5)
    for task in pending:
        task.cancel()
    assert not pending, "the block's exit hung"
    with pytest.raises(CallNotRunError, match="outlived its connection set"):
        writers[0].result()
    assert checked_out() == before
    assert budget.total == 0
    assert await anames("outlived") == []
    assert callbacks == []
    assert await asyncio.to_thread(idle_in_transaction) == 0


async def test_a_block_that_fails_to_begin_leaves_its_lane_to_other_calls() -> None:
    # A block's entry that fails on its extra lane (an error injected into
    # the entry, after the lane was set aside for the block) raises; no block
    # holds the lane then, and the request's next calls run on it again.
    from asgi_dbset import blocks

    class EntryFailedError(Exception):
        pass

    def failing(*args: Any) -> Any:
        raise EntryFailedError

    enter = blocks._enter
    async with request_like(parallelism=2) as dbset:
        blocks._enter = failing  # type: ignore[assignment]
        try:
            with pytest.raises(EntryFailedError):
                async with asgi_dbset.atomic():
                    pass
        finally:
            blocks._enter = enter  # type: ignore[assignment]
        seen = len(dbset.records)
        await asyncio.gather(sleeping(0.2).acount(), sleeping(0.2).acount())
        lanes = sorted(record.lane for record in dbset.records[seen:])
    # (Lane 1 still set aside for a block would leave both on lane 0.)
    assert lanes == [0, 1]
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def test_the_decorator_form() -> None:
    @asgi_dbset.atomic
    async def plain() -> None:
        await Author.objects.acreate(name="decorated")

    @asgi_dbset.atomic(using="default", durable=True)
    async def failing() -> None:
        await Author.objects.acreate(name="decorated-failing")
        raise RollbackRequestedError

    async with request_like():
        await plain()
        with pytest.raises(RollbackRequestedError):
            await failing()
    assert await anames("decorated") == ["decorated"]


# -- nesting ---------------------------------------------------------------------------


def stock_nested(prefix: str, savepoint: bool) -> None:
    with transaction.atomic():
        Author.objects.create(name=f"{prefix}-outer")
        try:
            with transaction.atomic(savepoint=savepoint):
                Author.objects.create(name=f"{prefix}-inner")
                raise RollbackRequestedError
        except RollbackRequestedError:
            pass
        if savepoint:
            Author.objects.create(name=f"{prefix}-after")


async def atomic_nested(prefix: str, savepoint: bool) -> None:
    async with asgi_dbset.atomic():
        await Author.objects.acreate(name=f"{prefix}-outer")
        try:
            async with asgi_dbset.atomic(savepoint=savepoint):
                await Author.objects.acreate(name=f"{prefix}-inner")
                raise RollbackRequestedError
        except RollbackRequestedError:
            pass
        if savepoint:
            await Author.objects.acreate(name=f"{prefix}-after")


@pytest.mark.parametrize("savepoint", [True, False])
async def test_nested_blocks_are_savepoints_as_in_django(savepoint: bool) -> None:
    async with request_like():
        await sync_to_async(stock_nested)("stock", savepoint)
        await atomic_nested("lib", savepoint)
    stock = await anames("stock")
    # A savepoint rolls back the inner block alone; without one, the inner
    # error dooms the whole transaction.
    assert stock == (["stock-after", "stock-outer"] if savepoint else [])
    assert [n.replace("lib", "stock") for n in await anames("lib")] == stock


async def test_a_durable_block_inside_another_is_refused_as_in_django() -> None:
    def stock() -> None:
        with transaction.atomic(), transaction.atomic(durable=True):
            pass

    async def lib() -> None:
        async with asgi_dbset.atomic(), asgi_dbset.atomic(durable=True):
            pass

    async with request_like():
        with pytest.raises(RuntimeError, match="durable") as stock_error:
            await sync_to_async(stock)()
        with pytest.raises(RuntimeError, match="durable") as lib_error:
            await lib()
    assert str(lib_error.value) == str(stock_error.value)
    assert await asyncio.to_thread(idle_in_transaction) == 0


# -- on_commit, select_for_update ----------------------------------------------------


async def test_on_commit_callbacks_run_after_the_commit_in_order() -> None:
    ran: list[str] = []

    def on_save(sender: Any, instance: Author, **kwargs: Any) -> None:
        transaction.on_commit(lambda: ran.append(f"saved {instance.name}"))

    async def notify() -> None:
        ran.append("async callback")

    post_save.connect(on_save, sender=Author)
    try:
        async with request_like():
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="a")
                await asgi_dbset.on_commit(lambda: ran.append("registered"))
                await Author.objects.acreate(name="b")
                await asgi_dbset.on_commit(notify)
                assert ran == []  # nothing before the commit
            assert ran == ["saved a", "registered", "saved b", "async callback"]
            ran.clear()
            with contextlib.suppress(RollbackRequestedError):
                async with asgi_dbset.atomic():
                    await Author.objects.acreate(name="c")
                    await asgi_dbset.on_commit(lambda: ran.append("never"))
                    raise RollbackRequestedError
            assert ran == []
            # Outside a block, a callback runs at once (autocommit).
            await asgi_dbset.on_commit(lambda: ran.append("now"))
            assert ran == ["now"]
    finally:
        post_save.disconnect(on_save, sender=Author)


async def test_on_commit_outside_a_block_is_djangos_on_the_requests_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Outside asgi_dbset.atomic(), the callback goes to Django's on_commit on
    # the request's own connection, as through sync_to_async: a robust
    # callback's error is logged, not raised; inside a transaction that
    # connection is in (opened by sync code), it waits for that commit.
    ran: list[str] = []

    def fails() -> None:
        raise RollbackRequestedError

    def begin() -> Any:
        # (Django's atomic, entered in one hop and left in another.)
        block = transaction.atomic()
        block.__enter__()
        return block

    def commit(block: Any) -> None:
        block.__exit__(None, None, None)

    async def callbacks(register: Any) -> list[str]:
        ran.clear()
        await register(fails, robust=True)
        block = await sync_to_async(begin)()
        await register(lambda: ran.append("after the commit"))
        ran.append("before the commit")
        await sync_to_async(commit)(block)
        return list(ran)

    async def stock(func: Any, robust: bool = False) -> None:
        await sync_to_async(transaction.on_commit)(func, robust=robust)

    async with request_like():
        with caplog.at_level("ERROR", logger="django.db.backends.base"):
            expected = await callbacks(stock)
            stock_logged = len(caplog.records)
            assert await callbacks(asgi_dbset.on_commit) == expected
            lib_logged = len(caplog.records) - stock_logged
    assert expected == ["before the commit", "after the commit"]
    assert stock_logged == lib_logged == 1


async def test_an_async_on_commit_callback_outside_a_block_runs_as_on_stock() -> None:
    # A coroutine function outside a block: Django's on_commit runs it at
    # once in autocommit (through async_to_sync, on this loop), as for stock
    # code that registers async_to_sync(func) through sync_to_async.
    loops: list[tuple[str, asyncio.AbstractEventLoop]] = []

    def notify(name: str) -> Any:
        async def callback() -> None:
            loops.append((name, asyncio.get_running_loop()))

        return callback

    async with request_like():
        await sync_to_async(transaction.on_commit)(async_to_sync(notify("stock")))
        await asgi_dbset.on_commit(notify("lib"))
    loop = asyncio.get_running_loop()
    assert loops == [("stock", loop), ("lib", loop)]


async def test_select_for_update_inside_a_block() -> None:
    author = await Author.objects.acreate(name="locked")
    async with request_like():
        async with asgi_dbset.atomic():
            locked = await Author.objects.select_for_update().aget(pk=author.pk)
            locked.name = "updated"
            await locked.asave()
        # Outside a transaction Django refuses it, with or without lanes.
        with pytest.raises(transaction.TransactionManagementError):
            await Author.objects.select_for_update().aget(pk=author.pk)
    assert await anames("updated") == ["updated"]


# -- where the calls run ---------------------------------------------------------------


async def test_a_blocks_calls_share_one_lane_while_other_tasks_run_in_parallel() -> (
    None
):
    async with request_like(parallelism=4) as dbset:
        block_lanes: set[int] = set()

        async def in_block() -> float:
            async with asgi_dbset.atomic():
                _, elapsed = await timed(
                    asyncio.gather(*(sleeping(0.2).aexists() for _ in range(3)))
                )
            block_lanes.update(r.lane for r in dbset.records if r.name == "exists")
            return elapsed

        async def outside() -> float:
            await asyncio.sleep(0.05)  # the block holds its lane by now
            _, elapsed = await timed(
                asyncio.gather(*(sleeping(0.2).acount() for _ in range(2)))
            )
            return elapsed

        block_elapsed, outside_elapsed = await asyncio.gather(in_block(), outside())
        other_lanes = {r.lane for r in dbset.records if r.name == "count"} - block_lanes
    # The block's three queries ran one after another on its one lane...
    assert len(block_lanes) == 1
    assert block_lanes != {0}
    assert block_elapsed >= 0.55
    # ...while the other task's two ran side by side on other lanes.
    assert outside_elapsed < 0.35
    assert other_lanes
    assert budget.total == 0


async def test_at_parallelism_1_the_block_is_on_the_requests_connection() -> None:
    async with request_like(parallelism=1) as dbset:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="p1")
        with contextlib.suppress(RollbackRequestedError):
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="p1-rolled-back")
                raise RollbackRequestedError
        assert len(dbset.lanes) == 1
    assert await anames("p1") == ["p1"]


async def test_outside_a_request_the_block_opens_a_set_of_its_own() -> None:
    async with ThreadSensitiveContext():
        assert asgi_dbset.active_set() is None
        async with asgi_dbset.atomic():
            assert asgi_dbset.active_set() is not None
            await Author.objects.acreate(name="scripted")
        assert asgi_dbset.active_set() is None
        await sync_to_async(connections.close_all)()
    assert await anames("scripted") == ["scripted"]


async def test_a_call_for_another_database_runs_outside_the_block_as_in_django() -> (
    None
):
    def stock() -> None:
        with transaction.atomic(using="default"):
            Author.objects.create(name="stock-default")
            Author.objects.using("other").create(name="stock-other")
            raise RollbackRequestedError

    async def lib() -> None:
        async with asgi_dbset.atomic(using="default"):
            await Author.objects.acreate(name="lib-default")
            await Author.objects.using("other").acreate(name="lib-other")
            raise RollbackRequestedError

    async with request_like():
        with contextlib.suppress(RollbackRequestedError):
            await sync_to_async(stock)()
        with contextlib.suppress(RollbackRequestedError):
            await lib()
    # The other database's write was in autocommit: it stays, both ways.
    assert await anames("stock") == []
    assert await anames("stock", "other") == ["stock-other"]
    assert await anames("lib") == []
    assert await anames("lib", "other") == ["lib-other"]


def tally_on_other(sender: Any, instance: Author, **kwargs: Any) -> None:
    """A receiver that writes to another database than its model's."""
    Tally.objects.using("other").create(name=f"saved {instance.name}")


async def test_a_query_of_the_blocks_database_from_another_connection_is_refused() -> (
    None
):
    """A call for ``default`` inside a block of ``other``, whose receiver writes
    ``other``: on stock Django (``transaction.atomic(using="other")`` around the
    save) that write is inside the transaction and rolls back with it. The
    call runs on a lane that is not the block's, where it could only write
    outside the transaction: the query is refused, never sent. Run on the
    block's lane (``sync_to_lane``), the write rolls back as on stock."""

    def stock() -> None:
        with transaction.atomic(using="other"):
            Author.objects.create(name="stock")
            raise RollbackRequestedError

    post_save.connect(tally_on_other, sender=Author)
    try:
        async with request_like():
            with contextlib.suppress(RollbackRequestedError):
                await sync_to_async(stock)()
            with contextlib.suppress(RollbackRequestedError):
                async with asgi_dbset.atomic(using="other"):
                    with pytest.raises(
                        transaction.TransactionManagementError,
                        match=r"made inside asgi_dbset\.atomic\(using='other'\) "
                        r"queried 'other'.*sync_to_lane",
                    ):
                        await asyncio.gather(
                            sleeping(0.05).acount(), Author.objects.acreate(name="lib")
                        )
                    await asgi_dbset.sync_to_lane(Author.objects.create)(
                        name="lib on the block's lane"
                    )
                    raise RollbackRequestedError
    finally:
        post_save.disconnect(tally_on_other, sender=Author)
    tallies = Tally.objects.using("other").values_list("name", flat=True)
    assert [name async for name in tallies] == []  # both ways
    # (The authors were written in autocommit, outside the block, both ways:
    # the refused query was the receiver's, after the insert.)
    assert await anames("stock") == ["stock"]
    assert await anames("lib") == ["lib", "lib on the block's lane"]
    assert budget.total == 0


# -- bad use -----------------------------------------------------------------------------


def test_sync_use_is_refused_with_what_to_write() -> None:
    with pytest.raises(TypeError, match=r"async with asgi_dbset\.atomic"):
        with asgi_dbset.atomic():  # type: ignore[attr-defined]
            pass
    with pytest.raises(TypeError, match=r"transaction\.atomic on sync code"):

        @asgi_dbset.atomic
        def sync_view() -> None:
            pass

    with pytest.raises(ValueError, match="no such database"):
        asyncio.run(_enter_unknown_alias())


async def _enter_unknown_alias() -> None:
    async with asgi_dbset.atomic(using="nope"):
        pass


async def test_leaving_a_block_from_another_task_is_refused() -> None:
    block = asgi_dbset.atomic()
    async with request_like():
        await block.__aenter__()
        await Author.objects.acreate(name="orphan")
        with pytest.raises(RuntimeError, match="another task"):
            await asyncio.ensure_future(block.__aexit__(None, None, None))
        await block.__aexit__(RollbackRequestedError, RollbackRequestedError(), None)
    assert await anames("orphan") == []
    assert await asyncio.to_thread(idle_in_transaction) == 0


def refreshed_in_a_stock_block(pk: int) -> str:
    author = Author.objects.get(pk=pk)
    with transaction.atomic(using="other"):
        Author.objects.using("other").filter(pk=pk).update(name="updated in the block")
        author.refresh_from_db(from_queryset=Author.objects.using("other"))
        transaction.set_rollback(True, using="other")
    return author.name


async def test_refresh_from_a_queryset_of_the_blocks_database_reads_in_the_block() -> (
    None
):
    author = await Author.objects.acreate(name="as committed")
    await Author.objects.using("other").acreate(pk=author.pk, name="as committed")
    stock = await sync_to_async(refreshed_in_a_stock_block)(author.pk)
    async with request_like():
        with contextlib.suppress(RollbackRequestedError):
            async with asgi_dbset.atomic(using="other"):
                await (
                    Author.objects.using("other")
                    .filter(pk=author.pk)
                    .aupdate(name="updated in the block")
                )
                # Django reads from from_queryset's database, not the instance's.
                await author.arefresh_from_db(
                    from_queryset=Author.objects.using("other")
                )
                raise RollbackRequestedError
    assert stock == author.name == "updated in the block"
    assert budget.total == 0


# -- beside sync code on the request's thread ----------------------------------------


def rename_waiting_at_most(pk: int, name: str, lock_wait: str) -> None:
    """Sync code on the request's thread that updates a row, giving up on a
    row lock after *lock_wait* (so a wait shows as an error, not a hang)."""
    with transaction.atomic():
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [lock_wait])
        Author.objects.filter(pk=pk).update(name=name)


def tally_in_a_stock_block(name: str) -> None:
    with transaction.atomic(using="other"):
        Tally.objects.using("other").create(name=name)


async def test_a_block_of_another_database_while_the_request_thread_waits_for_a_lock() -> (
    None
):
    """Sync code on the request's thread (``sync_to_async``, gathered beside
    the block) updates a row the block has updated; then the block enters a
    block of another database. On stock Django every one of them runs on the
    request's thread, the update inside the outer block's transaction: no
    wait. With the set, the outer block is on a lane of its own and the update
    waits on lane 0 for its lock until the block commits - the inner block's
    entry must not wait behind it for lane 0 (nothing would end: the outer
    block waits for the inner one)."""

    async def body(stock: bool) -> tuple[str, int]:
        author = await Author.objects.acreate(name="before")
        updated = asyncio.Event()

        async def in_block() -> None:
            if stock:
                outer = transaction.atomic()
                await sync_to_async(outer.__enter__)()
            else:
                outer = asgi_dbset.atomic()
                await outer.__aenter__()
            try:
                await Author.objects.filter(pk=author.pk).aupdate(name="block")
                updated.set()
                # The sibling's update is under way on the request's thread.
                await asyncio.sleep(0.3)
                if stock:
                    await sync_to_async(tally_in_a_stock_block)("in the inner block")
                else:
                    async with asgi_dbset.atomic(using="other"):
                        await Tally.objects.using("other").acreate(
                            name="in the inner block"
                        )
            finally:
                if stock:
                    await sync_to_async(outer.__exit__)(None, None, None)
                else:
                    await outer.__aexit__(None, None, None)

        async def sibling() -> None:
            await updated.wait()
            await sync_to_async(rename_waiting_at_most)(author.pk, "sibling", "3s")

        await asyncio.gather(in_block(), sibling())
        name = (await Author.objects.aget(pk=author.pk)).name
        return name, await Tally.objects.using("other").acount()

    async def outcome(parallelism: int | None) -> tuple[str, int]:
        async def run() -> tuple[str, int]:
            async with ThreadSensitiveContext():
                try:
                    if parallelism is None:
                        return await body(True)
                    async with connection_set(
                        parallelism=parallelism, lease_timeout=5.0
                    ):
                        return await body(False)
                finally:
                    await sync_to_async(connections.close_all)()

        try:
            return await asyncio.wait_for(run(), 20)
        finally:
            await Author.objects.all().adelete()
            await Tally.objects.using("other").all().adelete()

    assert await outcome(None) == ("sibling", 1)
    assert await outcome(4) == ("sibling", 1)
    assert budget.total == 0


async def test_a_block_nested_in_one_on_its_own_lane_joins_a_block_on_lane_0() -> None:
    """Inside a block on a lane of its own, a block of another database is
    entered without asking lane 0 (see above); while another task's block of
    that database is open on lane 0 - before that block has made a call, so
    no report of lane 0 shows its transaction yet - the nested block still
    runs there, inside that transaction, as on stock Django (one thread, one
    connection per database): the other block's rollback undoes its write."""

    async def body(stock: bool) -> None:
        go_busy, lane0_free, go_sibling = (asyncio.Event() for _ in range(3))
        sibling_in, inner_done = asyncio.Event(), asyncio.Event()

        async def enter(alias: str) -> Any:
            if stock:
                atomic = transaction.atomic(using=alias)
                await sync_to_async(atomic.__enter__)()
            else:
                atomic = asgi_dbset.atomic(using=alias)
                await atomic.__aenter__()
            return atomic

        async def leave(atomic: Any, exc: BaseException | None) -> None:
            exc_type = None if exc is None else type(exc)
            if stock:
                await sync_to_async(atomic.__exit__)(exc_type, exc, None)
            else:
                await atomic.__aexit__(exc_type, exc, None)

        async def busy() -> None:
            # A query of 'other' made while lane 0 runs one: at parallelism 3
            # it has lane 2 (lane 1 is the outer block's) for 0.6 s.
            async def first() -> None:
                await sleeping(0.1).acount()
                lane0_free.set()

            await go_busy.wait()
            await asyncio.gather(first(), sleeping(0.6).using("other").acount())

        async def sibling() -> None:
            # (Lane 2 is busy and the set may have no other: lane 0.)
            await go_sibling.wait()
            atomic = await enter("other")
            sibling_in.set()
            await inner_done.wait()
            await leave(atomic, RollbackRequestedError())

        # (Made outside the outer block: they are not inside it.)
        tasks = [asyncio.ensure_future(busy()), asyncio.ensure_future(sibling())]
        try:
            outer = await enter("default")
            try:
                await Author.objects.acreate(name="outer")
                go_busy.set()
                await lane0_free.wait()
                go_sibling.set()
                await sibling_in.wait()
                await tasks[0]  # lane 2 is idle again
                try:
                    if stock:
                        await sync_to_async(tally_in_a_stock_block)("inner")
                    else:
                        async with asgi_dbset.atomic(using="other"):
                            await Tally.objects.using("other").acreate(name="inner")
                finally:
                    inner_done.set()
            finally:
                await leave(outer, None)
        finally:
            for event in (go_busy, go_sibling, inner_done):
                event.set()
            await asyncio.gather(*tasks)

    async def outcome(parallelism: int | None) -> tuple[list[str], int]:
        async def run() -> None:
            async with ThreadSensitiveContext():
                try:
                    if parallelism is None:
                        return await body(True)
                    async with connection_set(
                        parallelism=parallelism, lease_timeout=5.0
                    ):
                        return await body(False)
                finally:
                    await sync_to_async(connections.close_all)()

        try:
            await asyncio.wait_for(run(), 20)
            return await anames("outer"), await Tally.objects.using("other").acount()
        finally:
            await Author.objects.all().adelete()
            await Tally.objects.using("other").all().adelete()

    assert await outcome(None) == (["outer"], 0)
    assert await outcome(3) == (["outer"], 0)
    assert budget.total == 0


async def test_a_block_of_another_database_while_a_call_waits_on_the_request_thread() -> (
    None
):
    """As above, and a task's ORM call is handed to lane 0 meanwhile, where
    it waits behind the sibling's update: its report of lane 0's
    transactions is still to come when the inner block is entered. Stock
    Django runs everything on the request's thread: no wait. The inner block
    must go by lane 0's last report (outside a transaction), not wait for
    that one, and its lease neither: it waited for lane 0 until the sibling's
    3 s lock timeout."""

    async def body(stock: bool) -> tuple[str, int, int]:
        author = await Author.objects.acreate(name="before")
        updated = asyncio.Event()
        counted: list[int] = []

        async def in_block() -> None:
            if stock:
                outer = transaction.atomic()
                await sync_to_async(outer.__enter__)()
            else:
                outer = asgi_dbset.atomic()
                await outer.__aenter__()
            try:
                await Author.objects.filter(pk=author.pk).aupdate(name="block")
                updated.set()
                # The sibling's update and the reader's call are under way on
                # the request's thread.
                await asyncio.sleep(0.3)
                if stock:
                    await sync_to_async(tally_in_a_stock_block)("in the inner block")
                else:
                    async with asgi_dbset.atomic(using="other"):
                        await Tally.objects.using("other").acreate(
                            name="in the inner block"
                        )
            finally:
                if stock:
                    await sync_to_async(outer.__exit__)(None, None, None)
                else:
                    await outer.__aexit__(None, None, None)

        async def sibling() -> None:
            await updated.wait()
            await sync_to_async(rename_waiting_at_most)(author.pk, "sibling", "3s")

        async def reader() -> None:
            await updated.wait()
            await asyncio.sleep(0.1)
            counted.append(await Tally.objects.using("other").acount())

        await asyncio.gather(in_block(), sibling(), reader())
        name = (await Author.objects.aget(pk=author.pk)).name
        return name, await Tally.objects.using("other").acount(), len(counted)

    async def outcome(parallelism: int | None) -> tuple[str, int, int]:
        async def run() -> tuple[str, int, int]:
            async with ThreadSensitiveContext():
                try:
                    if parallelism is None:
                        return await body(True)
                    async with connection_set(
                        parallelism=parallelism, lease_timeout=5.0
                    ):
                        return await body(False)
                finally:
                    await sync_to_async(connections.close_all)()

        try:
            return await asyncio.wait_for(run(), 20)
        finally:
            await Author.objects.all().adelete()
            await Tally.objects.using("other").all().adelete()

    assert await outcome(None) == ("sibling", 1, 1)
    assert await outcome(4) == ("sibling", 1, 1)


def stock_reads_inside_a_block() -> None:
    """Rolled back, with what the reads inside the block saw."""
    with transaction.atomic():
        Author.objects.create(name="stock-inside")
        seen = [Author.objects.filter(name="stock-inside").count() for _ in range(3)]
        raise RollbackRequestedError(seen)


@pytest.mark.parametrize("parallelism", [1, 4])
async def test_a_connection_set_opened_inside_a_block_is_refused(
    parallelism: int,
) -> None:
    """A connection_set() opened inside asgi_dbset.atomic() of another set
    (the request's) ran the calls made in it on lanes of its own, outside the
    block's transaction: gathered reads of a row the block had written found
    none, where stock Django (transaction.atomic, one connection) finds it
    each time. Now it is refused at once (at every parallelism, so a test
    whose block runs on lane 0 fails as production would), and
    db_parallelism(n), which it points to, reads inside the block."""
    seen: list[int] = []
    async with request_like(parallelism=parallelism):
        try:
            await sync_to_async(stock_reads_inside_a_block)()
        except RollbackRequestedError as exc:
            stock = exc.args[0]
        with contextlib.suppress(RollbackRequestedError):
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="lib-inside")
                with pytest.raises(transaction.TransactionManagementError) as raised:
                    async with connection_set(parallelism=3, lease_timeout=5.0):
                        await Author.objects.filter(name="lib-inside").acount()
                async with db_parallelism(3):
                    seen = await asyncio.gather(
                        *(
                            Author.objects.filter(name="lib-inside").acount()
                            for _ in range(3)
                        )
                    )
                raise RollbackRequestedError
    assert stock == [1, 1, 1]
    assert seen == stock
    assert "db_parallelism(n)" in str(raised.value)
    assert await anames("stock-inside") == await anames("lib-inside") == []
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def test_a_task_started_in_a_block_opens_a_set_after_the_block_ended() -> None:
    """A task created inside asgi_dbset.atomic() (asyncio copies the context,
    the block with it) that goes on after the block has committed - a
    fire-and-forget notification, say - is outside any block then: a
    connection_set() it opens (a library helper's) must not be refused as
    "opened inside a block", and reads the committed rows as stock Django's
    task does (its queries, after transaction.atomic ended, see the commit)."""

    async def later(
        ended: asyncio.Event, stock: bool, prefix: str
    ) -> list[int] | BaseException:
        await asyncio.wait_for(ended.wait(), 10)
        try:
            if stock:
                return [
                    await sync_to_async(
                        Author.objects.filter(name=f"{prefix}-task").count
                    )()
                    for _ in range(3)
                ]
            async with connection_set(parallelism=3, lease_timeout=5.0):
                return list(
                    await asyncio.gather(
                        *(
                            Author.objects.filter(name=f"{prefix}-task").acount()
                            for _ in range(3)
                        )
                    )
                )
        except Exception as exc:
            return exc

    async def outcome(parallelism: int | None) -> list[int] | BaseException:
        ended = asyncio.Event()
        prefix = "stock" if parallelism is None else f"lib{parallelism}"
        if parallelism is None:
            async with ThreadSensitiveContext():
                block = transaction.atomic()
                await sync_to_async(block.__enter__)()
                try:
                    task = asyncio.create_task(later(ended, True, prefix))
                    await Author.objects.acreate(name=f"{prefix}-task")
                finally:
                    await sync_to_async(block.__exit__)(None, None, None)
                ended.set()
                result = await asyncio.wait_for(task, 20)
                await sync_to_async(connections.close_all)()
                return result
        async with request_like(parallelism=parallelism):
            async with asgi_dbset.atomic():
                task = asyncio.create_task(later(ended, False, prefix))
                await Author.objects.acreate(name=f"{prefix}-task")
            ended.set()
            return await asyncio.wait_for(task, 20)

    stock = await outcome(None)
    assert stock == [1, 1, 1]
    assert await outcome(1) == stock
    assert await outcome(4) == stock
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


@pytest.mark.parametrize(
    "then", ["new_block_rolls_back", "lanes_returned", "set_closed"]
)
async def test_a_task_started_in_a_block_runs_its_calls_outside_it_after_it_ended(
    then: str,
) -> None:
    """A task created inside asgi_dbset.atomic() that makes its calls after
    the block committed runs them outside it, as stock Django's task does
    after transaction.atomic ended (autocommit, on the request's connection):
    they see the commit, and their writes stay - not on the block's old lane,
    where a new block of the request would hold them in its transaction (and
    lose them to its rollback), nor on a lane gone back to the pool (a
    connection left checked out), nor refused as made in a block that
    outlived its set."""

    def count(prefix: str) -> int:
        return Author.objects.filter(name__startswith=prefix).count()

    async def later(ended: asyncio.Event, stock: bool, prefix: str) -> list[Any]:
        await asyncio.wait_for(ended.wait(), 10)
        if stock:
            return [
                await sync_to_async(count)(prefix),
                await sync_to_async(Author.objects.create)(name=f"{prefix}-task"),
                await sync_to_async(count)(prefix),
            ]
        seen: list[Any] = [
            await Author.objects.filter(name__startswith=prefix).acount()
        ]
        await Author.objects.acreate(name=f"{prefix}-task")
        seen.append(await Author.objects.aget(name=f"{prefix}-task"))
        seen.append(await asgi_dbset.sync_to_lane(count)(prefix))
        seen.append(
            [a.name async for a in Author.objects.filter(name__startswith=prefix)]
        )
        return seen

    def stock_block_that_rolls_back(prefix: str) -> None:
        with transaction.atomic():
            Author.objects.create(name=f"{prefix}-block2")
            raise RollbackRequestedError

    async def outcome(stock: bool) -> tuple[list[Any], list[str]]:
        ended = asyncio.Event()
        prefix = "stock" if stock else "lib"
        async with ThreadSensitiveContext():
            if stock:
                block = transaction.atomic()
                await sync_to_async(block.__enter__)()
                try:
                    task = asyncio.create_task(later(ended, True, prefix))
                    await Author.objects.acreate(name=f"{prefix}-block1")
                finally:
                    await sync_to_async(block.__exit__)(None, None, None)
                ended.set()
                if then == "new_block_rolls_back":
                    with contextlib.suppress(RollbackRequestedError):
                        await sync_to_async(stock_block_that_rolls_back)(prefix)
                seen = await asyncio.wait_for(task, 20)
                seen = [seen[0], seen[1].name, seen[2]]
            else:
                async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
                    # (Extra lanes leased: the block takes one of its own.)
                    await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
                    async with asgi_dbset.atomic():
                        task = asyncio.create_task(later(ended, False, prefix))
                        await Author.objects.acreate(name=f"{prefix}-block1")
                    if then == "new_block_rolls_back":
                        with contextlib.suppress(RollbackRequestedError):
                            async with asgi_dbset.atomic():
                                await Author.objects.acreate(name=f"{prefix}-block2")
                                ended.set()
                                await asyncio.wait_for(asyncio.shield(task), 20)
                                raise RollbackRequestedError
                    elif then == "lanes_returned":
                        dbset.return_idle_lanes()  # (as after a response)
                        ended.set()
                        await asyncio.wait_for(asyncio.shield(task), 20)
                ended.set()  # set_closed: the task goes on after the request
                got = await asyncio.wait_for(task, 20)
                assert got[2] == got[0] + 1
                seen = [got[0], got[1].name, got[2]]
                assert got[3] == [f"{prefix}-block1", f"{prefix}-task"]
            await sync_to_async(connections.close_all)()
        return seen, [n.replace(prefix, "x") for n in await anames(prefix)]

    stock = await outcome(True)
    assert stock == ([1, "stock-task", 2], ["x-block1", "x-task"])
    assert await outcome(False) == (
        [1, "lib-task", 2],
        ["x-block1", "x-task"],
    )
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def test_a_block_entered_by_a_task_after_its_creators_block_ended() -> None:
    """A task created inside asgi_dbset.atomic() that enters a block of its
    own after that block ended opens a new block (a lane of its own), not a
    savepoint on the ended block's lane - a lane no block holds then, whose
    transaction would take the request's other calls and roll them back with
    the task's block. Stock Django: the request's other writes stay."""

    async def later(ended: asyncio.Event, inside: asyncio.Event) -> None:
        await asyncio.wait_for(ended.wait(), 10)
        with contextlib.suppress(RollbackRequestedError):
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="lib-task")
                inside.set()
                await asyncio.sleep(0.3)  # the request's other calls meanwhile
                raise RollbackRequestedError

    ended, inside = asyncio.Event(), asyncio.Event()
    async with request_like(parallelism=3):
        async with asgi_dbset.atomic():
            task = asyncio.create_task(later(ended, inside))
            await Author.objects.acreate(name="lib-block1")
        ended.set()
        await asyncio.wait_for(inside.wait(), 10)
        await asyncio.gather(
            *(Author.objects.acreate(name=f"lib-other{i}") for i in range(3))
        )
        await asyncio.wait_for(task, 20)
    assert await anames("lib") == [
        "lib-block1",
        "lib-other0",
        "lib-other1",
        "lib-other2",
    ]
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0
