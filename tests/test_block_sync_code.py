"""Sync code inside ``asgi_dbset.atomic()``: asgiref's ``sync_to_async``, and
Django's own hops to the request's thread (a signal's sync receivers under
``asend``), run inside the block's transaction at every parallelism.

On stock Django, sync code run inside ``transaction.atomic()`` is inside its
transaction: it sees the block's rows, and its writes go with the block's
commit or rollback. The library keeps that when the block holds an extra lane
of its own (parallelism above 1) by running such code on the block's lane,
whose connection holds the transaction. Each pattern is written both ways:
the stock form (a sync function with ``transaction.atomic()``), and the
library's at parallelism 4 with the block on an extra lane.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, async_to_sync, sync_to_async
from django.core.asgi import get_asgi_application
from django.db import connection, connections, transaction
from django.db.models.signals import post_save
from django.dispatch import Signal
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import override_settings
from django.urls import path

import asgi_dbset
from asgi_dbset import DBSetMiddleware
from asgi_dbset.context import current_block
from tests.asgi import request
from tests.helpers import sleeping
from tests.test_atomic import RollbackRequestedError, anames, names, request_like
from tests.testapp.models import Author, Tag

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def on_an_extra_lane() -> bool:
    block = current_block.get()
    assert block is not None
    return block.lane.index != 0


# -- a service function inside the block ----------------------------------------


def service(prefix: str) -> int:
    """Sync ORM code: counts the rows it sees, adds one."""
    seen = Author.objects.filter(name__startswith=prefix).count()
    Author.objects.create(name=f"{prefix}service{seen}")
    return seen


def stock_order(prefix: str, fail: bool) -> int:
    with transaction.atomic():
        Author.objects.create(name=f"{prefix}order")
        seen = service(prefix)
        if fail:
            raise RollbackRequestedError
    return seen


async def library_order(prefix: str, fail: bool) -> tuple[int, bool]:
    async with asgi_dbset.atomic():
        await Author.objects.acreate(name=f"{prefix}order")
        seen = await sync_to_async(service)(prefix)
        extra = on_an_extra_lane()
        if fail:
            raise RollbackRequestedError
    return seen, extra


async def stock_outcome(fail: bool) -> tuple[int | None, list[str]]:
    """What stock_order saw (None: rolled back) and the rows it left."""
    try:
        seen: int | None = await sync_to_async(stock_order)("stock", fail)
    except RollbackRequestedError:
        seen = None
    return seen, await anames("stock")


@pytest.mark.parametrize("fail", [False, True])
async def test_sync_to_async_inside_a_block_is_inside_its_transaction(
    fail: bool,
) -> None:
    stock_seen, stock_rows = await stock_outcome(fail)

    async with request_like(parallelism=4):
        try:
            seen, extra = await library_order("lib", fail)
        except RollbackRequestedError:
            seen = None
            # (Where the block ran is checked on the committing path.)
            extra = True
    lib_rows = await anames("lib")

    assert extra, "the block must hold an extra lane for this test to mean anything"
    assert stock_seen == (None if fail else 1)
    assert seen == stock_seen
    assert [r.removeprefix("lib") for r in lib_rows] == [
        r.removeprefix("stock") for r in stock_rows
    ]
    assert lib_rows == ([] if fail else ["liborder", "libservice1"])


def lock_then_update(prefix: str) -> int:
    # The row the block locked: on stock Django this runs inside the block's
    # transaction, so it does not wait for the lock.
    return Author.objects.filter(name=f"{prefix}locked").update(name=f"{prefix}done")


async def test_gathered_sync_code_inside_a_block_does_not_wait_for_its_locks() -> None:
    def stock() -> list[int]:
        with transaction.atomic():
            Author.objects.select_for_update().get(name="stocklocked")
            updated = lock_then_update("stock")
            return [updated, Author.objects.filter(name__startswith="stock").count()]

    await Author.objects.acreate(name="stocklocked")
    stock_result = await sync_to_async(stock)()

    await Author.objects.acreate(name="liblocked")
    async with request_like(parallelism=4):

        async def library() -> list[int]:
            async with asgi_dbset.atomic():
                await Author.objects.select_for_update().aget(name="liblocked")
                updated, count = await asyncio.gather(
                    sync_to_async(lock_then_update)("lib"),
                    Author.objects.filter(name__startswith="lib").acount(),
                )
                assert on_an_extra_lane()
                return [updated, count]

        # (Before, the update waited on the request's connection for the
        # block's row lock, and the block for the update: for ever.)
        lib_result = await asyncio.wait_for(library(), 5)

    assert stock_result == [1, 1]
    assert lib_result == stock_result
    assert await anames("lib") == ["libdone"]


# -- Django's own hops: a signal's sync receivers ---------------------------------

order_placed = Signal()


def write_audit(sender: Any, prefix: str, **kwargs: Any) -> None:
    Author.objects.create(name=f"{prefix}audit")


async def test_a_signals_sync_receiver_under_asend_is_inside_the_block() -> None:
    order_placed.connect(write_audit)
    try:

        def stock() -> None:
            with transaction.atomic():
                Author.objects.create(name="stockorder")
                order_placed.send(sender=None, prefix="stock")
                raise RollbackRequestedError

        with pytest.raises(RollbackRequestedError):
            await sync_to_async(stock)()

        async def library() -> None:
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="liborder")
                await order_placed.asend(sender=None, prefix="lib")
                assert on_an_extra_lane()
                raise RollbackRequestedError

        async with request_like(parallelism=4):
            with pytest.raises(RollbackRequestedError):
                await library()
    finally:
        order_placed.disconnect(write_audit)

    assert await anames("stock") == []
    assert await anames("lib") == []


class DatabaseSyncToAsync(SyncToAsync):  # type: ignore[type-arg]
    """As channels' database_sync_to_async: a thread_handler of its own."""

    def thread_handler(self, loop: Any, *args: Any, **kwargs: Any) -> Any:
        return super().thread_handler(loop, *args, **kwargs)


async def test_a_sync_to_async_subclass_inside_a_block_is_inside_it() -> None:
    stock_seen = await DatabaseSyncToAsync(stock_order)("stock", False)

    async with request_like(parallelism=4):
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="liborder")
            # (Before, refused: "this asgiref's SyncToAsync hands the block's
            # executor a call asgi_dbset does not know".)
            seen = await DatabaseSyncToAsync(service)("lib")
            assert on_an_extra_lane()

    assert stock_seen == seen == 1
    assert await anames("lib") == ["liborder", "libservice1"]


# -- async code under async_to_sync in that sync code -----------------------------


async def count_and_add(sender: Any, instance: Tag, **kwargs: Any) -> None:
    """An async receiver of a sync save: Django runs it under async_to_sync,
    its ORM calls on the thread of the save, inside its transaction."""
    prefix = instance.name.removesuffix("tag")
    seen = await Author.objects.filter(name__startswith=prefix).acount()
    await Author.objects.acreate(name=f"{prefix}receiver{seen}")


def save_tag(prefix: str) -> None:
    Tag.objects.create(name=f"{prefix}tag")


@pytest.mark.parametrize("fail", [False, True])
async def test_an_async_receiver_of_sync_code_inside_a_block_is_inside_it(
    fail: bool,
) -> None:
    def stock() -> None:
        with transaction.atomic():
            Author.objects.create(name="stockorder")
            save_tag("stock")
            if fail:
                raise RollbackRequestedError

    async def library() -> bool:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="liborder")
            await sync_to_async(save_tag)("lib")
            extra = on_an_extra_lane()
            if fail:
                raise RollbackRequestedError
        return extra

    post_save.connect(count_and_add, sender=Tag)
    try:
        with contextlib.suppress(RollbackRequestedError):
            await sync_to_async(stock)()
        async with request_like(parallelism=4):
            try:
                # (Before, the receiver's calls queued on the block's lane,
                # busy with the save that waited for them: for ever.)
                extra = await asyncio.wait_for(library(), 10)
            except RollbackRequestedError:
                extra = True  # (checked on the committing path)
    finally:
        post_save.disconnect(count_and_add, sender=Tag)

    assert extra, "the block must hold an extra lane for this test to mean anything"
    stock_rows = await anames("stock")
    assert stock_rows == ([] if fail else ["stockorder", "stockreceiver1"])
    assert await anames("lib") == [r.replace("stock", "lib") for r in stock_rows]


def stock_inner() -> None:
    with transaction.atomic():
        Author.objects.create(name="stockinner")
        raise RollbackRequestedError


async def stock_inner_async() -> None:
    with contextlib.suppress(RollbackRequestedError):
        await sync_to_async(stock_inner)()


async def library_inner_async() -> None:
    with contextlib.suppress(RollbackRequestedError):
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="libinner")
            raise RollbackRequestedError


def library_service() -> None:
    Author.objects.create(name="libservice")
    async_to_sync(library_inner_async)()


async def test_a_block_entered_under_async_to_sync_in_sync_code_is_a_savepoint() -> (
    None
):
    def stock() -> None:
        with transaction.atomic():
            Author.objects.create(name="stockorder")
            Author.objects.create(name="stockservice")
            async_to_sync(stock_inner_async)()

    async def library() -> bool:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="liborder")
            await sync_to_async(library_service)()
            return on_an_extra_lane()

    await sync_to_async(stock)()
    async with request_like(parallelism=4):
        # (Before, the inner block's BEGIN queued on the outer block's lane,
        # busy with the code that waited for it, and waited on even when
        # cancelled: a hang no timeout ended.)
        extra = await asyncio.wait_for(library(), 10)

    assert extra
    assert await anames("stock") == ["stockorder", "stockservice"]
    assert await anames("lib") == ["liborder", "libservice"]


# -- the request path: a block around a sync view --------------------------------


def gathering_view(request: HttpRequest) -> HttpResponse:
    """A sync view whose async helper (async_to_sync) gathers ORM calls, as
    test_atomic_requests' view: stock runs them on the view's thread."""
    Author.objects.create(name="viewrow")

    async def gathered() -> list[int]:
        counts = (Author.objects.filter(name="viewrow").acount() for _ in range(3))
        return list(await asyncio.gather(*counts))

    seen = async_to_sync(gathered)()
    if request.GET.get("fail"):
        raise RuntimeError("the view failed")
    return JsonResponse({"in_atomic": connection.in_atomic_block, "seen": seen})


urlpatterns = [path("sync/", gathering_view)]

#: Where the middleware's blocks ran (True: an extra lane).
BLOCK_LANES: list[bool] = []


def atomic_middleware(get_response: Any) -> Any:
    """ATOMIC_REQUESTS for an async stack: the request inside a block."""

    async def middleware(request: HttpRequest) -> HttpResponse:
        async with asgi_dbset.atomic():
            BLOCK_LANES.append(on_an_extra_lane())
            response = await get_response(request)
            if response.status_code >= 500:
                raise RollbackRequestedError  # (a 500 rolls back, as there)
            return response

    return middleware


atomic_middleware.async_capable = True  # type: ignore[attr-defined]
atomic_middleware.sync_capable = False  # type: ignore[attr-defined]


async def test_a_sync_view_inside_a_middlewares_block_is_inside_it() -> None:
    async def requests(app: Any) -> list[Any]:
        ok = await asyncio.wait_for(request(app, "/sync/"), 10)
        ok_rows = await anames("view")
        await Author.objects.all().adelete()
        failed = await asyncio.wait_for(request(app, "/sync/", "fail=1"), 10)
        return [ok.status, ok.json(), ok_rows, failed.status, await anames("view")]

    settings_dict = connections.settings["default"]
    settings_dict["ATOMIC_REQUESTS"] = True
    try:
        with override_settings(ROOT_URLCONF=__name__):
            stock = await requests(get_asgi_application())
    finally:
        settings_dict["ATOMIC_REQUESTS"] = False

    BLOCK_LANES.clear()
    with override_settings(
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[f"{__name__}.atomic_middleware"],
        ASGI_DBSET={"DEFAULT_PARALLELISM": 4},
    ):
        app = DBSetMiddleware(get_asgi_application())
        # (Before, the helper's calls queued on the block's lane, busy with
        # the view that waited for them: TimeoutError.)
        library = await requests(app)

    assert BLOCK_LANES == [True, True]
    assert stock == [
        200,
        {"in_atomic": True, "seen": [1, 1, 1]},
        ["viewrow"],
        500,
        [],
    ]
    assert library == stock


# -- the set's statement timeout -------------------------------------------------


def slow_service() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(0.5)")
    return "slept"


async def test_sync_code_inside_a_block_runs_without_the_statement_timeout() -> None:
    """The set's statement timeout is for its ORM calls: sync code in a block
    runs without it at parallelism 1 (on the request's thread), so at 4."""

    def stock() -> str:
        with transaction.atomic():
            return slow_service()

    stock_result = await sync_to_async(stock)()

    async def outcome(call: Any) -> str:
        try:
            return str(await call)
        except Exception as exc:
            return type(exc).__name__

    results = {}
    for parallelism in (1, 4):
        async with request_like(parallelism=parallelism):
            async with asgi_dbset.db_parallelism(parallelism, statement_timeout=0.2):
                async with asgi_dbset.atomic():
                    first = await outcome(Author.objects.acount())
                    # (Before, at 4: OperationalError, the lane's timeout.)
                    service = await outcome(sync_to_async(slow_service)())
                    # The block's own calls stay timed.
                    orm = await outcome(sleeping(0.5).acount())
                    extra = on_an_extra_lane()
        results[parallelism] = [first, service, orm, extra]

    assert stock_result == "slept"
    assert results[1] == ["0", "slept", "OperationalError", False]
    assert results[4] == ["0", "slept", "OperationalError", True]


# -- outside a request: no ThreadSensitiveContext ----------------------------------


@pytest.mark.parametrize("fail", [False, True])
async def test_outside_a_request_sync_code_inside_a_block_is_inside_it(
    fail: bool,
) -> None:
    """A script (asyncio.run: no ThreadSensitiveContext; asgiref runs sync
    code on its one shared thread), with a set of parallelism 4."""
    stock_seen, stock_rows = await stock_outcome(fail)

    go_on = asyncio.Event()

    async def after_the_block() -> list[str]:
        await go_on.wait()
        return await sync_to_async(names)("lib")

    extra = False
    async with asgi_dbset.connection_set(parallelism=4, lease_timeout=5.0):
        await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
        try:
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="liborder")
                # (Before, it ran on asgiref's shared thread, outside the
                # block: it saw 0 rows, and its row stayed after a rollback.)
                seen = await asyncio.wait_for(sync_to_async(service)("lib"), 10)
                extra = on_an_extra_lane()
                later = asyncio.create_task(after_the_block())
                if fail:
                    raise RollbackRequestedError
        except RollbackRequestedError:
            seen = None
        go_on.set()
        # After the block, on asgiref's shared thread again, as on stock.
        seen_after = await asyncio.wait_for(later, 10)
    lib_rows = await anames("lib")
    await sync_to_async(connections.close_all)()

    assert extra, "the block must hold an extra lane for this test to mean anything"
    assert stock_seen == (None if fail else 1)
    assert seen == (1 if not fail else None)
    assert lib_rows == [r.replace("stock", "lib") for r in stock_rows]
    assert seen_after == lib_rows


# -- what cannot be inside the block ---------------------------------------------


async def test_sync_code_of_a_task_that_outlives_the_block_runs_outside_it() -> None:
    go_on = asyncio.Event()

    async def later() -> list[str]:
        await go_on.wait()
        return await sync_to_async(names)("lib")

    async with request_like(parallelism=4):
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="lib1")
            task = asyncio.create_task(later())
            assert on_an_extra_lane()
        go_on.set()
        # After the commit, on the request's thread, as on stock Django.
        assert await asyncio.wait_for(task, 10) == ["lib1"]


async def test_sync_code_inside_blocks_of_two_databases_on_two_lanes_is_refused() -> (
    None
):
    async with request_like(parallelism=4):
        async with asgi_dbset.atomic():
            async with asgi_dbset.atomic(using="other"):
                block = current_block.get()
                assert block is not None
                assert block.outer is not None
                assert block.lane is not block.outer.lane
                assert block.lane.index != 0
                assert block.outer.lane.index != 0
                with pytest.raises(
                    transaction.TransactionManagementError,
                    match="several databases",
                ):
                    await sync_to_async(names)("lib")


async def test_at_parallelism_1_sync_code_is_on_the_requests_connection_as_before() -> (
    None
):
    async def library() -> None:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="lib1")
            assert not on_an_extra_lane()
            assert await sync_to_async(names)("lib") == ["lib1"]
            raise RollbackRequestedError

    async with request_like(parallelism=1):
        with pytest.raises(RollbackRequestedError):
            await library()
    assert await anames("lib") == []


@pytest.mark.parametrize("fail", [False, True])
async def test_sync_code_in_a_block_entered_by_a_sync_callers_async_code_is_inside_it(
    fail: bool,
) -> None:
    # A sync view (or service) runs async code under async_to_sync, which
    # enters a block and calls sync code through sync_to_async. On stock
    # Django all of it runs on the sync caller's one thread, inside the
    # transaction. (asgiref sends that sync code to the sync caller's thread
    # before it asks any context: the block must be there too.)
    stock_seen, stock_rows = await stock_outcome(fail)

    def sync_caller() -> int | None:
        try:
            seen, _ = async_to_sync(library_order)("lib", fail)
        except RollbackRequestedError:
            return None
        return seen

    async with request_like(parallelism=4):
        seen = await asyncio.wait_for(sync_to_async(sync_caller)(), 10)
    lib_rows = await anames("lib")

    assert seen == stock_seen
    assert [r.removeprefix("lib") for r in lib_rows] == [
        r.removeprefix("stock") for r in stock_rows
    ]
