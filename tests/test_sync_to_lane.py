"""``asgi_dbset.sync_to_lane``: sync ORM code on the set's lanes.

Each pattern runs both ways where stock Django has one: with asgiref's
``sync_to_async`` (stock) and with ``sync_to_lane`` in a set; the rows,
commits and rollbacks are the same, and gathered functions run in parallel.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import OperationalError, connections, transaction
from rest_framework import serializers

import asgi_dbset
from asgi_dbset import TransactionLeftOpenError, connection_set, sync_to_lane
from asgi_dbset.budget import budget
from tests.helpers import active_sleeps, sleeping, timed
from tests.testapp.models import Author, Book, Tag, Tally

pytestmark = pytest.mark.django_db(transaction=True)


async def in_request(
    body: Callable[[], Awaitable[Any]], parallelism: int | None
) -> Any:
    """*body* as a request runs it: in its own thread-sensitive context, in a
    set of *parallelism* (None: no set, stock Django), its connections
    returned at the end."""
    async with ThreadSensitiveContext():
        try:
            if parallelism is None:
                return await body()
            async with connection_set(parallelism=parallelism, lease_timeout=5.0):
                return await body()
        finally:
            await sync_to_async(connections.close_all)()


@pytest.fixture
def library(transactional_db: None) -> None:
    for a in range(3):
        author = Author.objects.create(name=f"author {a}")
        for b in range(2):
            book = Book.objects.create(title=f"book {a}.{b}", author=author, pages=b)
            tag, _ = Tag.objects.get_or_create(name=f"tag {b}")
            tag.books.add(book)


# -- parallel, and the same rows ------------------------------------------------------


def two_slow_queries(n: int) -> list[int]:
    return [sleeping(0.15).count() + n, sleeping(0.15, Book).count() + n]


@pytest.mark.usefixtures("library")
async def test_gathered_functions_run_in_parallel() -> None:
    async def with_(wrap: Callable[[Any], Any]) -> list[Any]:
        return list(
            await asyncio.gather(*[wrap(two_slow_queries)(n) for n in range(3)])
        )

    stock, serial = await timed(in_request(lambda: with_(sync_to_async), None))
    lanes, parallel = await timed(in_request(lambda: with_(sync_to_lane), 4))
    assert lanes == stock == [[3, 6], [4, 7], [5, 8]]
    # Stock: six 0.15 s queries one after another; the lanes: three at once.
    assert parallel < serial / 2, (parallel, serial)
    assert budget.total == 0


def titles_with_relations() -> list[tuple[str, str, list[str]]]:
    """Lazy relations: a foreign key and a many-to-many, each a query of its own."""
    return [
        (book.title, book.author.name, [tag.name for tag in book.tags.all()])
        for book in Book.objects.order_by("title")
    ]


@pytest.mark.usefixtures("library")
async def test_lazy_relations_follow_as_on_stock_django() -> None:
    async def gathered(wrap: Callable[[Any], Any]) -> list[Any]:
        return list(
            await asyncio.gather(*[wrap(titles_with_relations)() for _ in range(3)])
        )

    stock = await in_request(lambda: gathered(sync_to_async), None)

    async def on_lanes() -> tuple[list[Any], int]:
        result = await gathered(sync_to_lane)
        dbset = asgi_dbset.active_set()
        assert dbset is not None
        return result, dbset.lanes_used

    lanes, used = await in_request(on_lanes, 3)
    assert lanes == stock
    assert stock[0][0] == ("book 0.0", "author 0", ["tag 0"])
    assert used == 3


class BookSerializer(serializers.ModelSerializer[Book]):
    author = serializers.StringRelatedField()
    tags = serializers.StringRelatedField(many=True)

    class Meta:
        model = Book
        fields = ("title", "pages", "author", "tags")


class AuthorSerializer(serializers.ModelSerializer[Author]):
    books = serializers.StringRelatedField(many=True)

    class Meta:
        model = Author
        fields = ("name", "books")


def serialized(serializer: Any) -> Any:
    return serializer.data


@pytest.mark.usefixtures("library")
async def test_two_serializers_data_gathered_on_lanes() -> None:
    """Django REST framework: each serializer's ``.data`` walks its queryset's
    relations with lazy queries; gathered on lanes, they run at once."""

    async def both(wrap: Callable[[Any], Any]) -> list[Any]:
        # (Each list's own query spends 0.2 s on the server.)
        books = BookSerializer(sleeping(0.2, Book).order_by("title"), many=True)
        authors = AuthorSerializer(sleeping(0.2, Author).order_by("name"), many=True)
        return [
            _plain(data)
            for data in await asyncio.gather(
                wrap(serialized)(books), wrap(serialized)(authors)
            )
        ]

    stock, serial = await timed(in_request(lambda: both(sync_to_async), None))
    lanes, parallel = await timed(in_request(lambda: both(sync_to_lane), 2))
    assert lanes == stock
    assert stock[0][0] == {
        "title": "book 0.0",
        "pages": 0,
        "author": "author 0",
        "tags": ["tag 0"],
    }
    assert [len(part) for part in stock] == [6, 3]
    assert parallel < serial * 0.75, (parallel, serial)


def _plain(data: Any) -> Any:
    return [dict(item) for item in data]


# -- transactions ---------------------------------------------------------------------


def write_two(name: str, fail: bool) -> None:
    with transaction.atomic():
        Author.objects.create(name=f"{name} 1")
        Author.objects.create(name=f"{name} 2")
        if fail:
            raise ValueError("rolled back")


async def test_atomic_inside_commits_or_rolls_back_as_on_stock_django() -> None:
    async def run(wrap: Callable[[Any], Any], prefix: str) -> list[str]:
        outcome = await asyncio.gather(
            wrap(write_two)(f"{prefix} kept", False),
            wrap(write_two)(f"{prefix} lost", True),
            return_exceptions=True,
        )
        return [type(o).__name__ for o in outcome]

    stock = await in_request(lambda: run(sync_to_async, "stock"), None)
    lanes = await in_request(lambda: run(sync_to_lane, "lanes"), 3)
    assert stock == lanes == ["NoneType", "ValueError"]
    names = sorted([a.name async for a in Author.objects.all()])
    assert names == ["lanes kept 1", "lanes kept 2", "stock kept 1", "stock kept 2"]


def leave_open_autocommit() -> None:
    transaction.set_autocommit(False)
    Author.objects.create(name="never committed")


def leave_open_atomic() -> None:
    transaction.atomic().__enter__()
    Author.objects.create(name="never committed")


@pytest.mark.parametrize("leave_open", [leave_open_autocommit, leave_open_atomic])
async def test_a_transaction_left_open_is_rolled_back_and_raises(
    leave_open: Callable[[], None],
) -> None:
    async def body() -> list[Any]:
        # Two at once, so one of them runs on an extra lane.
        return list(
            await asyncio.gather(
                sync_to_lane(leave_open)(),
                sync_to_lane(leave_open)(),
                return_exceptions=True,
            )
        )

    outcome = await in_request(body, 3)
    assert [type(o) for o in outcome] == [TransactionLeftOpenError] * 2
    assert "was rolled back" in str(outcome[0])
    assert "asgi_dbset.atomic()" in str(outcome[0])
    assert await Author.objects.acount() == 0
    assert budget.total == 0


class RollBackError(Exception):
    pass


async def test_inside_asgi_dbset_atomic_it_runs_in_the_block() -> None:
    def write(name: str) -> bool:
        Author.objects.create(name=name)
        return transaction.get_connection().in_atomic_block

    async def body() -> Any:
        dbset = asgi_dbset.active_set()
        assert dbset is not None
        inside: list[bool] = []
        seen = -1
        try:
            async with asgi_dbset.atomic():
                inside = await asyncio.gather(
                    sync_to_lane(write)("a"), sync_to_lane(write)("b")
                )
                seen = await Author.objects.acount()
                raise RollBackError
        except RollBackError:
            pass
        kept = await sync_to_lane(write)("after")
        return inside, seen, kept, {r.lane for r in dbset.records if r.name == "write"}

    inside, seen, kept, lanes = await in_request(body, 4)
    assert inside == [True, True]
    assert seen == 2  # the block sees its own writes
    assert kept is False
    assert [a.name async for a in Author.objects.all()] == ["after"]
    assert len(lanes) <= 2, lanes


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_inside_a_transaction_of_the_request_thread_it_stays_there() -> None:
    """The request's thread opened a transaction (as code the set does not see
    may): every sync_to_lane call runs inside it, on that thread, whatever its
    `using` - the function may write to any database - and rolls back with
    it. Stock Django: the same."""

    def write(name: str) -> None:
        Author.objects.create(name=name)

    async def body(wrap: Callable[..., Any]) -> None:
        await sync_to_async(transaction.set_autocommit)(False)
        await asyncio.gather(*[wrap(write)(f"w{i}") for i in range(4)])
        await sync_to_async(transaction.rollback)()
        await sync_to_async(transaction.set_autocommit)(True)

    await in_request(lambda: body(sync_to_async), None)
    stock = await Author.objects.acount()
    await in_request(
        lambda: body(lambda f: sync_to_lane(f, using="other")),
        4,
    )
    assert stock == await Author.objects.acount() == 0


# -- cancellation, fallback, errors -----------------------------------------------


async def test_cancelling_the_caller_cancels_its_running_query() -> None:
    def slow() -> int:
        return int(sleeping(30).count())

    async def body() -> None:
        task = asyncio.ensure_future(
            asyncio.gather(sync_to_lane(slow)(), sync_to_lane(slow)())
        )
        for _ in range(300):
            if await asyncio.to_thread(active_sleeps) == 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _, took = await timed(in_request(body, 3))
    assert took < 10, took
    assert await asyncio.to_thread(active_sleeps) == 0
    assert budget.total == 0


request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_var")


def where_and_set() -> int:
    request_var.set("set in the function")
    return threading.get_ident()


@pytest.mark.parametrize("parallelism", [None, 1])
async def test_without_a_set_or_at_parallelism_1_it_is_sync_to_async(
    parallelism: int | None,
) -> None:
    async def body() -> tuple[int, int, str]:
        stock = await sync_to_async(where_and_set)()
        request_var.set("reset")
        lane = await sync_to_lane(where_and_set)()
        return stock, lane, request_var.get()

    stock_thread, lane_thread, seen = await in_request(body, parallelism)
    # The request's own thread, and context changes copied back, as asgiref does.
    assert lane_thread == stock_thread
    assert seen == "set in the function"


def open_a_transaction() -> None:
    transaction.set_autocommit(False)
    Author.objects.create(name="inside")


def transaction_left_open() -> bool:
    left = not transaction.get_autocommit()
    transaction.rollback()
    transaction.set_autocommit(True)
    return left


@pytest.mark.django_db(transaction=True)
async def test_at_parallelism_1_recording_sets_it_is_still_sync_to_async() -> None:
    # With SERVER_TIMING or HISTORY on, the set records the calls it runs as
    # stock Django; sync_to_lane stays sync_to_async there: a transaction the
    # function leaves open stays open on the request's connection, as on
    # stock Django, and nothing raises.
    async def body(run: Any) -> bool:
        dbset = asgi_dbset.active_set()
        if dbset is not None:
            dbset.record_stock_calls = True
        await run(open_a_transaction)()
        return await sync_to_async(transaction_left_open)()

    stock = await in_request(lambda: body(sync_to_async), None)
    assert stock is True
    assert await in_request(lambda: body(sync_to_lane), 1) == stock
    assert await Author.objects.filter(name="inside").acount() == 0


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_decorator_forms() -> None:
    @sync_to_lane
    def plain() -> int:
        return Author.objects.count()

    @sync_to_lane(using="other")
    def on_other() -> int:
        return Author.objects.using("other").count()

    async def body() -> list[int]:
        return list(await asyncio.gather(plain(), on_other()))

    assert await in_request(body, 2) == [0, 0]
    assert plain.__name__ == "plain"


async def test_what_it_refuses() -> None:
    async def coroutine() -> None:
        pass

    with pytest.raises(TypeError, match="await it directly"):
        sync_to_lane(coroutine)
    with pytest.raises(TypeError, match="database alias"):
        sync_to_lane(plain_function, using=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="sync function"):
        sync_to_lane(42)  # type: ignore[call-overload]
    # An alias DATABASES does not have: it ran as sync_to_async at parallelism
    # 1 and raised ConnectionDoesNotExist above it, at request time.
    with pytest.raises(ValueError, match="no alias 'replica'"):
        sync_to_lane(plain_function, using="replica")
    with pytest.raises(ValueError, match="no alias 'replica'"):
        sync_to_lane(using="replica")


def plain_function() -> None:
    pass


# -- what review found: blocks of other aliases, nested blocks left open ----------


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_inside_a_block_of_another_database_it_runs_in_that_block() -> None:
    """The function may touch any database: inside asgi_dbset.atomic(using=
    "other") it runs on the block's connection, and sees the block's rows."""

    def count_other() -> int:
        return Author.objects.using("other").count()

    async def body() -> int:
        seen = -1
        try:
            async with asgi_dbset.atomic(using="other"):
                await Author.objects.using("other").acreate(name="in the block")
                seen = await sync_to_lane(count_other)()
                raise RollBackError
        except RollBackError:
            pass
        return seen

    assert await in_request(body, 4) == 1
    assert await Author.objects.using("other").acount() == 0


def rename_waiting_at_most(pk: int, name: str, lock_wait: str) -> None:
    with transaction.atomic():
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [lock_wait])
        Author.objects.filter(pk=pk).update(name=name)


def tally_default(name: str) -> None:
    Tally.objects.create(name=name)


async def test_in_a_block_while_the_request_thread_waits_for_the_blocks_lock() -> None:
    """Sync code on the request's thread (``sync_to_async``, gathered beside
    the block) updates a row the block has updated; then the block calls a
    ``sync_to_lane`` function. On stock Django both run on the one connection,
    inside the block's transaction: no wait. With the set, the update waits
    on lane 0 for the block's lock until the block commits - the function
    must not wait behind it for lane 0 (nothing would end: the block waits
    for the function). (The update gives up after 3 s, so a wait shows as
    its OperationalError, not a hang.)"""

    async def body(stock: bool) -> tuple[str, int]:
        author = await Author.objects.acreate(name="before")
        updated = asyncio.Event()

        async def in_block() -> None:
            if stock:
                atomic = transaction.atomic()
                await sync_to_async(atomic.__enter__)()
            else:
                atomic = asgi_dbset.atomic()
                await atomic.__aenter__()
            try:
                await Author.objects.filter(pk=author.pk).aupdate(name="block")
                updated.set()
                # The sibling's update is under way on the request's thread.
                await asyncio.sleep(0.3)
                run = sync_to_async if stock else sync_to_lane
                await run(tally_default)("in the block")
            finally:
                if stock:
                    await sync_to_async(atomic.__exit__)(None, None, None)
                else:
                    await atomic.__aexit__(None, None, None)

        async def sibling() -> None:
            await updated.wait()
            await sync_to_async(rename_waiting_at_most)(author.pk, "sibling", "3s")

        await asyncio.gather(in_block(), sibling())
        name = (await Author.objects.aget(pk=author.pk)).name
        return name, await Tally.objects.filter(name="in the block").acount()

    async def outcome(parallelism: int | None) -> tuple[str, int]:
        try:
            return await asyncio.wait_for(
                in_request(lambda: body(parallelism is None), parallelism), 20
            )
        finally:
            await Author.objects.all().adelete()
            await Tally.objects.all().adelete()

    assert await outcome(None) == ("sibling", 1)
    assert await outcome(4) == ("sibling", 1)


def leave_a_nested_block_open() -> None:
    transaction.atomic().__enter__()
    Author.objects.create(name="left open")


async def test_a_nested_block_left_open_rolls_back_to_its_savepoint() -> None:
    """Inside the set's own block, a block the function enters and never
    exits is rolled back to its savepoint; the enclosing block goes on and
    commits what it wrote itself."""

    async def body() -> type[BaseException] | None:
        raised = None
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="before")
            try:
                await sync_to_lane(leave_a_nested_block_open)()
            except TransactionLeftOpenError as exc:
                raised = type(exc)
            await Author.objects.acreate(name="after")
        return raised

    assert await in_request(body, 4) is TransactionLeftOpenError
    names = sorted([a.name async for a in Author.objects.all()])
    assert names == ["after", "before"]


@pytest.mark.usefixtures("library")
async def test_a_block_left_open_inside_a_snapshot_leaves_the_snapshot_whole() -> None:
    def read_in_a_block_left_open() -> int:
        transaction.atomic().__enter__()
        return Book.objects.count()

    def write() -> None:
        Author.objects.create(name="no")

    async def body() -> tuple[list[Any], Any]:
        async with ThreadSensitiveContext():
            async with connection_set(parallelism=2, snapshot=True):
                first = await asyncio.gather(
                    sync_to_lane(read_in_a_block_left_open)(),
                    sync_to_lane(read_in_a_block_left_open)(),
                    return_exceptions=True,
                )
                # Still one read-only snapshot: a read agrees, a write is refused.
                again = await asyncio.gather(
                    Book.objects.acount(),
                    sync_to_lane(write)(),
                    return_exceptions=True,
                )
            await sync_to_async(connections.close_all)()
        return first, again

    first, again = await body()
    assert [type(r) for r in first] == [TransactionLeftOpenError] * 2
    assert again[0] == 6
    assert type(again[1]) is asgi_dbset.SnapshotWriteError
    assert await Author.objects.acount() == 3


async def test_a_durable_block_inside_runs_with_a_statement_timeout() -> None:
    """The set's statement timeout does not wrap the function in a
    transaction of its own (behind a transaction pooler it would): a durable
    block inside is the outermost, as on stock Django."""

    def durable_write() -> None:
        with transaction.atomic(durable=True):
            Author.objects.create(name="durable")

    async def body() -> None:
        async with ThreadSensitiveContext():
            async with connection_set(parallelism=2, statement_timeout=5.0):
                await asyncio.gather(
                    sync_to_lane(durable_write)(), sync_to_lane(durable_write)()
                )
            await sync_to_async(connections.close_all)()

    await body()
    assert await Author.objects.acount() == 2


# -- functions that query two databases ------------------------------------------------


def first_then_second(first: str, second: str, meet: threading.Barrier) -> int:
    """A query of *first* (the lane's alias), then, once every call holds its
    first connection (or the barrier gives up), one of *second*."""
    seen = Author.objects.using(first).count()
    try:
        meet.wait()
    except threading.BrokenBarrierError:
        pass  # (fewer lanes than calls: the order no longer matters)
    return seen + Author.objects.using(second).count()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_a_second_database_s_connection_is_not_held_once_the_call_ends() -> None:
    """Two requests at once, each gathering five functions that read both
    databases, one starting with `default`, the other with `other`. Stock
    Django: each request's thread holds one connection of each pool. On
    lanes, each function opens its second database's connection on the
    lane's thread, which no budget counts: held by the lane until the set
    closed, the lanes of one request held every connection of one pool while
    waiting for the other pool, whose connections the other request's lanes
    held - until the pool's timeout failed them. Returned when each call
    ends, they go to the waiting lanes, and both requests finish."""

    async def request(
        wrap: Callable[..., Any], first: str, second: str, meet: Any
    ) -> Any:
        run = wrap(first_then_second)
        return await asyncio.gather(*[run(first, second, meet) for _ in range(5)])

    async def two_requests(parallelism: int | None) -> Any:
        meet = threading.Barrier(10, timeout=2.0)

        def wrap(using: str) -> Callable[..., Any]:
            if parallelism is None:
                return sync_to_async
            return lambda f: sync_to_lane(f, using=using)

        return await asyncio.wait_for(
            asyncio.gather(
                in_request(
                    lambda: request(wrap("default"), "default", "other", meet),
                    parallelism,
                ),
                in_request(
                    lambda: request(wrap("other"), "other", "default", meet),
                    parallelism,
                ),
            ),
            60,
        )

    async def rows() -> None:
        await Author.objects.acreate(name="here")
        await Author.objects.using("other").acreate(name="there")

    # (In a request, whose connections go back: no thread outside the two
    # requests holds one.)
    await in_request(rows, None)
    stock, took_stock = await timed(two_requests(None))
    lanes, took = await timed(two_requests(5))
    assert stock == lanes == [[2] * 5, [2] * 5]
    assert took < 8, (took, took_stock)
    assert budget.total == 0


def slow_count(alias: str) -> int | str:
    try:
        return int(sleeping(2).using(alias).count())
    except OperationalError as exc:
        return type(exc.__cause__).__name__


def idle_timeouts(alias: str) -> set[str]:
    """statement_timeout of every idle connection in *alias*'s pool."""
    pool = connections[alias].pool  # type: ignore[attr-defined]
    conns = [pool.getconn(5) for _ in range(pool.get_stats()["pool_available"])]
    try:
        return {str(c.execute("SHOW statement_timeout").fetchone()[0]) for c in conns}
    finally:
        for conn in conns:
            pool.putconn(conn)


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_the_statement_timeout_bounds_queries_of_a_second_database() -> None:
    """A set's statement timeout bounds each query it runs (docs/settings.md):
    a function on a `default` lane querying `other`, or the reverse, is
    cancelled there as its query made as an ORM call of the set would be. The
    connections go back to their pools without it. (Behind a transaction
    pooler a sync_to_lane function runs untimed, its own transactions
    unchanged.)"""

    async def body() -> list[Any]:
        return list(
            await asyncio.gather(
                *[sync_to_lane(slow_count)("other") for _ in range(2)],
                *[sync_to_lane(slow_count, using="other")("default") for _ in range(2)],
                return_exceptions=True,
            )
        )

    async def in_timed_set() -> list[Any]:
        async with ThreadSensitiveContext():
            try:
                async with connection_set(
                    parallelism=3, statement_timeout=0.2, lease_timeout=5.0
                ):
                    return await asyncio.wait_for(body(), 30)
            finally:
                await sync_to_async(connections.close_all)()

    results, took = await timed(in_timed_set())
    if settings.PGBOUNCER is None:
        assert results == ["QueryCanceled"] * 4, results
        assert took < 1.5, took
    else:
        assert results == [0] * 4, results
    for alias in ("default", "other"):
        assert await asyncio.to_thread(idle_timeouts, alias) == {"0"}
