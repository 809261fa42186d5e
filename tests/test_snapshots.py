"""db_parallelism(n, snapshot=True): every lane reads one snapshot.

A writer commits a book (of one page) every couple of milliseconds. A request
gathers a count of the books and, a few milliseconds later, the sum of their
pages: read from one snapshot the two agree; read the usual way (each query
its own snapshot, on whichever lane) they disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import (
    DatabaseError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.db.models import Sum
from psycopg.conninfo import make_conninfo

import asgi_dbset
from asgi_dbset import SnapshotWriteError, connection_set, db_parallelism
from asgi_dbset.budget import budget
from asgi_dbset.dbset import ConnectionSet
from tests.helpers import checked_out, sleeping, timed
from tests.testapp.models import Author, Book

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

REQUESTS = 200


def dsn_of(alias: str = "default") -> str:
    return make_conninfo(
        settings.DATABASE_URL, dbname=settings.DATABASES[alias]["NAME"]
    )


@contextlib.contextmanager
def writer(author_id: int, alias: str = "default") -> Iterator[list[int]]:
    """Commit a one-page book every 2 ms until the block ends."""
    written = [0]
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(dsn_of(alias), autocommit=True) as conn:
            deadline = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < deadline:
                conn.execute(
                    "INSERT INTO testapp_book (title, author_id, pages) "
                    "VALUES ('w', %s, 1)",
                    [author_id],
                )
                written[0] += 1
                stop.wait(0.002)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        while written[0] < 5:
            time.sleep(0.005)
        yield written
    finally:
        stop.set()
        thread.join(30)


async def count_and_sum(alias: str = "default") -> tuple[int, int]:
    async def pages_a_little_later() -> int:
        await asyncio.sleep(0.003)
        result = await Book.objects.using(alias).aaggregate(total=Sum("pages"))
        return int(result["total"] or 0)

    # (The count takes 10 ms on the server, so the sum runs beside it.)
    count, pages = await asyncio.gather(
        sleeping(0.01, Book).using(alias).acount(), pages_a_little_later()
    )
    return count, pages


async def agreements(*, snapshot: bool, parallelism: int = 2) -> tuple[int, set[int]]:
    agreed, lanes = 0, set()
    async with ThreadSensitiveContext():
        for _ in range(REQUESTS):
            async with connection_set(
                parallelism=parallelism, snapshot=snapshot, lease_timeout=5.0
            ) as dbset:
                count, pages = await count_and_sum()
            agreed += count == pages
            lanes.update(r.lane for r in dbset.records)
        await sync_to_async(connections.close_all)()
    return agreed, lanes


async def test_gathered_reads_of_one_snapshot_agree_while_a_writer_commits() -> None:
    author = await Author.objects.acreate(name="writer")
    with writer(author.pk) as written:
        agreed, lanes = await agreements(snapshot=True)
        control, _ = await agreements(snapshot=False)
    assert written[0] > REQUESTS
    assert agreed == REQUESTS
    assert lanes == {0, 1}  # the two reads ran on two connections
    # The control, side by side: without a snapshot they do not all agree.
    assert control < REQUESTS
    assert budget.total == 0


async def test_at_parallelism_1_a_snapshot_is_one_transaction() -> None:
    author = await Author.objects.acreate(name="writer")
    with writer(author.pk):
        agreed, lanes = await agreements(snapshot=True, parallelism=1)
    assert (agreed, lanes) == (REQUESTS, {0})


async def test_each_database_has_a_snapshot_of_its_own() -> None:
    author = await Author.objects.acreate(name="writer")
    other = await Author.objects.using("other").acreate(name="writer")
    with writer(author.pk), writer(other.pk, "other"):
        async with ThreadSensitiveContext():
            async with connection_set(parallelism=4, snapshot=True, lease_timeout=5.0):
                (c1, p1), (c2, p2) = await asyncio.gather(
                    count_and_sum("default"), count_and_sum("other")
                )
            await sync_to_async(connections.close_all)()
    assert c1 == p1
    assert c2 == p2


async def test_a_write_inside_a_snapshot_raises_what_to_do_instead() -> None:
    async with ThreadSensitiveContext():
        async with db_parallelism(2, snapshot=True) as dbset:
            before = await Author.objects.acount()
            with pytest.raises(SnapshotWriteError, match="read only") as raised:
                await Author.objects.acreate(name="refused")
            assert "asgi_dbset.atomic" in str(raised.value)
            assert isinstance(
                raised.value.__cause__.__cause__, psycopg.errors.ReadOnlySqlTransaction
            )  # type: ignore[union-attr]
            # The snapshot is still usable after the refused write...
            assert await Author.objects.acount() == before
            # ...and a write goes through in a transaction block of its own.
            async with asgi_dbset.atomic():
                await Author.objects.acreate(name="written in a block")
            assert dbset.snapshot
        await sync_to_async(connections.close_all)()
    assert await Author.objects.filter(name="written in a block").acount() == 1
    assert await Author.objects.filter(name="refused").acount() == 0


def idle_in_transaction() -> int:
    databases = [settings.DATABASES[alias]["NAME"] for alias in ("default", "other")]
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = ANY(%s) "
            "AND state LIKE 'idle in transaction%%'",
            [databases],
        ).fetchone()
    return int(row[0]) if row else 0


async def test_the_snapshot_ends_with_its_block_and_on_cancellation() -> None:
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
            async with db_parallelism(3, snapshot=True):
                await asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
                assert await asyncio.to_thread(idle_in_transaction) >= 1
            # The block's transactions ended on every lane at its exit.
            assert not dbset.snapshot
            assert await asyncio.to_thread(idle_in_transaction) == 0
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3), db_parallelism(3, snapshot=True):
                    await asyncio.gather(*(sleeping(20).acount() for _ in range(3)))
            assert await asyncio.to_thread(idle_in_transaction) == 0
        await sync_to_async(connections.close_all)()
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def test_a_views_snapshot_ends_when_the_view_returns() -> None:
    from tests.asgi import request

    app: Any = asgi_dbset.DBSetMiddleware(_snapshot_app)
    response = await request(app, "/snapshot/")
    assert response.status == 200
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


@db_parallelism(2, snapshot=True)
async def _snapshot_view() -> int:
    dbset = asgi_dbset.active_set()
    assert dbset is not None
    assert dbset.snapshot
    counts = await asyncio.gather(Author.objects.acount(), Author.objects.acount())
    return len(set(counts))


async def _snapshot_app(scope: Any, receive: Any, send: Any) -> None:
    distinct = await _snapshot_view()
    dbset = asgi_dbset.active_set()
    assert dbset is not None
    # Ended with the view, before Django returns the request's own connection.
    assert not dbset.snapshot
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(distinct).encode()})


async def first_call_without_a_connection(
    **set_options: Any,
) -> tuple[str, int, float]:
    """The first call finds the pool empty (other requests hold every
    connection) and fails; the pool then has room again and the next call
    reads. Returns the first call's error, the second call's count and how
    long the second call took."""
    expected = await Author.objects.acount()
    pool = connections["default"].pool  # type: ignore[attr-defined]
    async with ThreadSensitiveContext():
        async with contextlib.AsyncExitStack() as stack:
            if set_options:
                await stack.enter_async_context(connection_set(**set_options))
            held = []
            while checked_out() < pool.max_size:
                held.append(await asyncio.to_thread(pool.getconn, 5))
            timeout, pool.timeout = pool.timeout, 0.3
            try:
                with pytest.raises(
                    OperationalError, match="couldn't get a connection"
                ) as first:
                    await Author.objects.acount()
            finally:
                pool.timeout = timeout
                for conn in held:
                    pool.putconn(conn)
            count, seconds = await timed(Author.objects.acount())
        await sync_to_async(connections.close_all)()
    assert count == expected
    return type(first.value).__name__, count, seconds


async def test_a_snapshot_whose_export_found_no_connection_is_exported_by_the_next_call() -> (
    None
):
    await Author.objects.acreate(name="one")
    stock = await first_call_without_a_connection()
    for parallelism in (1, 2):
        error, count, seconds = await first_call_without_a_connection(
            parallelism=parallelism, snapshot=True, lease_timeout=5.0
        )
        # As on stock Django: the first call fails for want of a connection,
        # the next one reads - at once, not after waiting for an export that
        # the failed call never made.
        assert (error, count) == stock[:2]
        assert seconds < 5.0
    assert budget.total == 0


def request_connection_pid() -> int:
    connections["default"].ensure_connection()
    return int(connections["default"].connection.info.backend_pid)


def terminate(pid: int) -> None:
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])
    time.sleep(0.2)  # (the backend is gone before the test goes on)


async def three_reads_after_the_connection_died(**set_options: Any) -> list[Any]:
    async with ThreadSensitiveContext():
        await asyncio.to_thread(
            terminate, await sync_to_async(request_connection_pid)()
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                if set_options:
                    await stack.enter_async_context(connection_set(**set_options))
                return await asyncio.wait_for(
                    asyncio.gather(
                        sleeping(0.05).acount(),
                        Author.objects.acount(),
                        Author.objects.acount(),
                        return_exceptions=True,
                    ),
                    10,
                )
        finally:
            await sync_to_async(connections.close_all)()


async def test_a_snapshot_on_a_dead_connection_raises_djangos_error_at_once() -> None:
    def errors(results: list[Any]) -> set[type]:
        return {type(result) for result in results if not isinstance(result, int)}

    stock = await three_reads_after_the_connection_died()
    library = await three_reads_after_the_connection_died(
        parallelism=3, snapshot=True, lease_timeout=5.0
    )
    # On a direct connection, the call on the request's dead connection fails
    # as on stock Django (Django's error, not psycopg's); calls on the other
    # lanes' live connections may read instead - one of them exports the
    # snapshot. (Through PgBouncer the client's connection outlives the
    # server's: every read succeeds, on stock and here.)
    assert errors(library) == errors(stock) <= {OperationalError}, library


async def on_commit_after_a_read(*, snapshot: bool, robust: bool) -> list[str]:
    ran: list[str] = []

    def callback() -> None:
        ran.append("ran")
        if robust:
            raise RuntimeError("a robust callback's error is logged")

    async with ThreadSensitiveContext():
        async with db_parallelism(2, snapshot=snapshot):
            await asyncio.gather(Author.objects.acount(), Author.objects.acount())
            await asgi_dbset.on_commit(callback, robust=robust)
            ran.append("returned")
        await sync_to_async(connections.close_all)()
    return ran


@pytest.mark.parametrize("robust", [False, True])
async def test_on_commit_in_a_snapshot_runs_at_once_as_in_autocommit(
    robust: bool, caplog: pytest.LogCaptureFixture
) -> None:
    outside = await on_commit_after_a_read(snapshot=False, robust=robust)
    inside = await on_commit_after_a_read(snapshot=True, robust=robust)
    assert inside == outside == ["ran", "returned"]
    errors = [r for r in caplog.records if "in on_commit()" in r.getMessage()]
    assert len(errors) == (2 if robust else 0)


async def reads_after_the_exporting_lane_is_wanted_elsewhere(how: str) -> list[int]:
    """An extra lane exports the snapshot of ``default`` (lane 0 is busy with
    ``other``); then a transaction block, or a lower parallelism, wants that
    lane; then three reads join the snapshot."""
    async with ThreadSensitiveContext():
        try:
            async with connection_set(parallelism=3, lease_timeout=5.0):
                async with db_parallelism(3, snapshot=True):
                    await asyncio.gather(
                        sleeping(0.3).using("other").acount(), Author.objects.acount()
                    )
                    if how == "block":
                        async with asgi_dbset.atomic():
                            await Author.objects.acreate(name="written in a block")
                    else:
                        async with db_parallelism(1):
                            await Author.objects.acount()
                    return list(
                        await asyncio.gather(
                            sleeping(0.2).acount(),
                            Author.objects.acount(),
                            Author.objects.acount(),
                        )
                    )
        finally:
            await sync_to_async(connections.close_all)()


@pytest.mark.parametrize("how", ["block", "lower parallelism"])
async def test_the_lane_that_exported_the_snapshot_stays_in_it(how: str) -> None:
    await Author.objects.acreate(name="one")
    counts = await reads_after_the_exporting_lane_is_wanted_elsewhere(how)
    # One snapshot, taken before the block's write.
    assert counts == [1, 1, 1]
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def iterate_with_a_failed_call_midway(how: str) -> list[str]:
    """Iterate ten books two at a time; after the third, one call of the set
    fails on the server: a read given up on, or a refused write."""
    titles: list[str] = []
    async for book in Book.objects.order_by("title").aiterator(chunk_size=2):
        titles.append(book.title)
        if len(titles) == 3:
            if how == "given up":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await sleeping(1).acount()
            else:
                with contextlib.suppress(SnapshotWriteError):
                    await Author.objects.acreate(name="refused")
    return titles


@pytest.mark.parametrize("parallelism", [1, 4])
@pytest.mark.parametrize("how", ["given up", "refused write"])
async def test_an_open_cursor_outlives_a_failed_call_in_the_snapshot(
    how: str, parallelism: int
) -> None:
    author = await Author.objects.acreate(name="a")
    await Book.objects.abulk_create(
        [Book(title=f"b{i:02}", author=author, pages=1) for i in range(10)]
    )
    results = []
    for snapshot in (False, True):
        async with ThreadSensitiveContext():
            try:
                async with connection_set(
                    parallelism=parallelism, snapshot=snapshot, lease_timeout=5.0
                ):
                    results.append(await iterate_with_a_failed_call_midway(how))
            finally:
                await sync_to_async(connections.close_all)()
    assert results[1] == results[0] == [f"b{i:02}" for i in range(10)]
    assert budget.total == 0


def insert_author(alias: str = "default") -> None:
    """A concurrent writer's committed row."""
    with psycopg.connect(dsn_of(alias), autocommit=True) as conn:
        conn.execute("INSERT INTO testapp_author (name) VALUES ('concurrent')")


async def two_counts() -> int:
    count, _ = await asyncio.gather(Author.objects.acount(), Book.objects.acount())
    return count


def block_a(how: str) -> Any:
    """The sibling entered first, which leaves first."""
    if how == "decorated":
        return db_parallelism(2, snapshot=True)(two_counts)

    async def block() -> int:
        async with db_parallelism(
            2, statement_timeout=30.0, snapshot=how == "block with a snapshot"
        ):
            return await two_counts()

    return block


@db_parallelism(2, snapshot=True)
async def _decorated_b(a_done: asyncio.Event) -> tuple[int, int]:
    return await _reads_b(a_done)


async def _reads_b(a_done: asyncio.Event) -> tuple[int, int]:
    before = await two_counts()
    await a_done.wait()
    await asyncio.to_thread(insert_author)
    return before, await two_counts()


async def siblings(how: str) -> tuple[tuple[int, int], list[Any]]:
    """Two helpers gathered in one request: A (entered first, a block or a
    decorated coroutine) leaves while B, with a snapshot, still reads in it;
    a writer commits a row in between. Returns B's two counts and the set's
    (snapshot, parallelism, statement timeout, transactions left open) at A's
    exit, at B's exit and at the end."""
    a_done = asyncio.Event()
    seen: list[Any] = []

    async def part_a() -> None:
        await block_a(how)()
        seen.append((dbset.snapshot, dbset.parallelism, dbset.statement_timeout))
        a_done.set()

    async def part_b() -> tuple[int, int]:
        if how == "decorated":
            result = await _decorated_b(a_done)
        else:
            async with db_parallelism(3, snapshot=True):
                result = await _reads_b(a_done)
        seen.append((dbset.snapshot, dbset.parallelism, dbset.statement_timeout))
        return result

    async with ThreadSensitiveContext():
        try:
            async with connection_set(parallelism=1, lease_timeout=5.0) as dbset:
                await asyncio.sleep(0)
                _, counts = await asyncio.wait_for(
                    asyncio.gather(part_a(), part_b()), 30
                )
                seen.append(await asyncio.to_thread(idle_in_transaction))
        finally:
            await sync_to_async(connections.close_all)()
    return counts, seen


@pytest.mark.parametrize(
    "how", ["block without a snapshot", "block with a snapshot", "decorated"]
)
async def test_a_sibling_leaving_first_does_not_end_the_others_snapshot(
    how: str,
) -> None:
    await Author.objects.acreate(name="first")
    counts, seen = await siblings(how)
    # B's reads are of one snapshot, taken before the concurrent write.
    assert counts == (1, 1)
    a_left, b_left, left_open = seen
    assert a_left[0]  # the snapshot outlived A, for B
    # B's snapshot ended with B, before its lanes could go back.
    assert not b_left[0]
    assert left_open == 0
    if how != "decorated":
        # B, entered last, keeps its parallelism (3) until it leaves; when both
        # have left, the set has its own settings again, whatever the order.
        assert a_left[1:] == (3, 30.0)
        assert b_left[1:] == (1, None)
    assert budget.total == 0


async def test_nested_blocks_keep_the_snapshot_they_found() -> None:
    """Plain nesting as before: an inner block, with or without a snapshot of
    its own, leaves on the snapshot it found; the outer block's ends with it;
    a set's own snapshot lasts until the set closes."""
    await Author.objects.acreate(name="first")
    on: list[bool] = []
    async with ThreadSensitiveContext():
        try:
            async with connection_set(snapshot=True, lease_timeout=5.0) as dbset:
                await two_counts()
                for snapshot in (True, False):
                    async with db_parallelism(2, snapshot=snapshot):
                        await two_counts()
                    on.append(dbset.snapshot)
            async with connection_set(lease_timeout=5.0) as dbset:
                async with db_parallelism(2, snapshot=True):
                    before = await two_counts()
                    for snapshot in (True, False):
                        async with db_parallelism(1, snapshot=snapshot):
                            await two_counts()
                        on.append(dbset.snapshot)
                    await asyncio.to_thread(insert_author)
                    after = await two_counts()
                on.append(dbset.snapshot)
        finally:
            await sync_to_async(connections.close_all)()
    assert on == [True, True, True, True, False]
    assert (before, after) == (1, 1)
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def test_a_block_that_has_to_share_the_snapshots_lane_says_so() -> None:
    # At parallelism 1 the block can only run on lane 0, which is in the
    # snapshot: its write is refused, and the error says why and what to do.
    async with ThreadSensitiveContext():
        try:
            async with connection_set(parallelism=1, snapshot=True):
                await Author.objects.acount()
                with pytest.raises(SnapshotWriteError) as raised:
                    async with asgi_dbset.atomic():
                        await Author.objects.acreate(name="refused")
        finally:
            await sync_to_async(connections.close_all)()
    message = str(raised.value)
    assert "lane of its own" in message
    assert "into `async with asgi_dbset.atomic():`" not in message
    assert await Author.objects.filter(name="refused").acount() == 0


def _refused_or(result: Any) -> Any:
    return "refused" if isinstance(result, DatabaseError) else result


@contextlib.contextmanager
def pool_warnings_off() -> Iterator[None]:
    """Stock Django's close() inside a transaction returns the connection to
    its pool inside it (the pool rolls it back and warns): stock's doing, which
    the suite-wide check of the library's returns must not count."""
    pool_logger = logging.getLogger("psycopg.pool")
    pool_logger.disabled = True
    try:
        yield
    finally:
        pool_logger.disabled = False


def stock_close_in_a_repeatable_read_transaction() -> list[Any]:
    """Stock Django's nearest thing to a snapshot: a REPEATABLE READ transaction
    on the request's connection; code in it closes the connection, a writer
    commits, and the code reads three times more."""
    reads: list[Any] = []
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        reads.append(Author.objects.count())
        connection.close()
        insert_author()
        for _ in range(3):
            try:
                reads.append(Author.objects.count())
            except DatabaseError as exc:
                reads.append(_refused_or(exc))
    return reads


def close_the_connection() -> None:
    connection.close()


async def close_in_a_snapshot(parallelism: int, how: str) -> list[Any]:
    async with ThreadSensitiveContext():
        try:
            async with connection_set(
                parallelism=parallelism, snapshot=True, lease_timeout=5.0
            ):
                reads: list[Any] = list(
                    await asyncio.gather(Author.objects.acount(), two_counts())
                )[:1]
                if how == "sync_to_async":
                    await sync_to_async(close_the_connection)()
                else:
                    await asgi_dbset.sync_to_lane(connections.close_all)()
                await asyncio.to_thread(insert_author)
                after = await asyncio.wait_for(
                    asyncio.gather(
                        *(Author.objects.acount() for _ in range(3)),
                        return_exceptions=True,
                    ),
                    20,
                )
                reads.extend(_refused_or(result) for result in after)
        finally:
            await sync_to_async(connections.close_all)()
    return reads


@pytest.mark.parametrize("how", ["sync_to_async", "sync_to_lane"])
@pytest.mark.parametrize("parallelism", [1, 3])
async def test_a_connection_closed_in_the_snapshot_never_reads_outside_it(
    parallelism: int, how: str
) -> None:
    await Author.objects.acreate(name="first")
    async with ThreadSensitiveContext():
        with pool_warnings_off():
            stock = await sync_to_async(stock_close_in_a_repeatable_read_transaction)()
        await sync_to_async(connections.close_all)()
    await Author.objects.filter(name="concurrent").adelete()
    library = await close_in_a_snapshot(parallelism, how)
    # Stock Django refuses every query after the close (ProgrammingError), until
    # the transaction ends; it never reads the writer's row.
    assert stock == [1, "refused", "refused", "refused"]
    # The library refuses the closed connection's reads (SnapshotError) and
    # reads the snapshot on the lanes still in it: never the writer's row.
    assert library[0] == 1
    assert "refused" in library[1:]
    assert set(library) <= {1, "refused"}, library
    if parallelism == 1:
        assert library == stock
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


def commit() -> None:
    transaction.commit()


def roll_back() -> None:
    transaction.rollback()


async def reads_and_a_write_after(
    end: Any, wrap: Any, parallelism: int | None
) -> list[Any]:
    """Two reads, then sync code calls Django's commit() or rollback() (*end*;
    None: it does not), a writer commits, and the request reads three times
    and writes once. Without a parallelism: stock Django, in autocommit."""
    async with ThreadSensitiveContext():
        try:
            async with contextlib.AsyncExitStack() as stack:
                if parallelism is not None:
                    await stack.enter_async_context(
                        connection_set(
                            parallelism=parallelism, snapshot=True, lease_timeout=5.0
                        )
                    )
                outcome: list[Any] = [await two_counts(), await two_counts()]
                if end is not None:
                    await wrap(end)()
                await asyncio.to_thread(insert_author)
                outcome.extend(
                    await asyncio.gather(*(Author.objects.acount() for _ in range(3)))
                )
                write = await asyncio.gather(
                    Author.objects.acreate(name="written"), return_exceptions=True
                )
                outcome.append(type(write[0]).__name__)
        finally:
            await sync_to_async(connections.close_all)()
    outcome.append(await Author.objects.filter(name="written").acount())
    await Author.objects.exclude(name="first").adelete()
    return outcome


@pytest.mark.parametrize("parallelism", [1, 3])
@pytest.mark.parametrize("wrap", [sync_to_async, asgi_dbset.sync_to_lane])
@pytest.mark.parametrize("end", [commit, roll_back])
async def test_commit_or_rollback_in_the_snapshot_changes_nothing(
    end: Any, wrap: Any, parallelism: int
) -> None:
    await Author.objects.acreate(name="first")
    # Stock Django, in autocommit: commit() and rollback() change nothing.
    stock = await reads_and_a_write_after(None, sync_to_async, None)
    assert await reads_and_a_write_after(end, sync_to_async, None) == stock
    assert stock == [1, 1, 2, 2, 2, "Author", 1]
    # To the request a snapshot's connection is in autocommit too: they change
    # nothing - every read is of the snapshot, the write is refused, as without.
    library = await reads_and_a_write_after(None, wrap, parallelism)
    assert library == [1, 1, 1, 1, 1, "SnapshotWriteError", 0]
    assert await reads_and_a_write_after(end, wrap, parallelism) == library
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


def delete_every_author() -> str:
    # (Django's delete() runs in transaction.atomic(savepoint=False).)
    try:
        Author.objects.all().delete()
    except DatabaseError as exc:
        return type(exc).__name__
    return "deleted"


async def refused_write(how: str) -> str:
    try:
        if how == "adelete":
            await Author.objects.all().adelete()
        elif how == "abulk_create":
            await Author.objects.abulk_create([Author(name="refused")])
        elif how == "acreate":
            await Author.objects.acreate(name="refused")
        else:
            return await sync_to_async(delete_every_author)()
    except DatabaseError as exc:
        return type(exc).__name__
    return "written"


@pytest.mark.parametrize("parallelism", [1, 2])
@pytest.mark.parametrize("how", ["adelete", "abulk_create", "sync delete()"])
async def test_a_refused_write_in_djangos_own_atomic_leaves_the_request_usable(
    how: str, parallelism: int
) -> None:
    """Django's delete() and bulk_create() write inside
    ``transaction.atomic(savepoint=False)``: in autocommit, a transaction of
    its own, rolled back on a failure. In the snapshot's transaction it has
    no savepoint, so Django only marked the connection for rollback, and
    every later query of the request - in the snapshot and after it -
    raised TransactionManagementError. Now the write is refused as a plain
    acreate() is, and the reads after it run as after that one."""
    await Author.objects.acreate(name="first")

    async def outcome(write: str) -> list[object]:
        seen: list[object] = []

        async def read() -> None:
            try:
                seen.append(await Author.objects.acount())
            except DatabaseError as exc:
                seen.append(type(exc).__name__)

        async with ThreadSensitiveContext():
            async with db_parallelism(parallelism, snapshot=True):
                await read()
                seen.append(await refused_write(write))
                await read()
                await read()
            await read()
            await sync_to_async(connections.close_all)()
        return seen

    expected = await outcome("acreate")
    assert expected == [1, "SnapshotWriteError", 1, 1, 1]
    refused = "SnapshotWriteError" if how.startswith("a") else "InternalError"
    assert await outcome(how) == [1, refused, 1, 1, 1]


def stock_repeatable_read_around_a_commit() -> list[int]:
    """Stock Django's nearest thing to a snapshot: a REPEATABLE READ
    transaction on the request's connection, read before and after a
    concurrent commit."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        reads = [Author.objects.count()]
        insert_author()
        reads.append(Author.objects.count())
    return reads


async def test_another_set_on_the_requests_thread_never_ends_a_sets_snapshot() -> None:
    """Two connection sets of one request's thread (a script's gathered
    helpers, a connection_set() in a view) share lane 0's connection. A call
    of the set without a snapshot ran there while the other set's snapshot
    was on it, and ended it: lane 0 had exported the snapshot, so the
    snapshot set's next reads failed with PostgreSQL's "invalid snapshot
    identifier". Now that call is refused, and the snapshot reads on."""
    await Author.objects.acreate(name="first")
    stock = await sync_to_async(stock_repeatable_read_around_a_commit)()
    await Author.objects.filter(name="concurrent").adelete()
    in_snapshot = asyncio.Event()
    other_done = asyncio.Event()
    reads: list[Any] = []
    other: list[Any] = []

    async def snapshot_set() -> None:
        async with connection_set(parallelism=3, snapshot=True, lease_timeout=5.0):
            reads.append(await Author.objects.acount())  # lane 0 exports
            in_snapshot.set()
            await asyncio.wait_for(other_done.wait(), 10)
            reads.append(await Author.objects.acount())

    async def set_beside_it() -> None:
        await asyncio.wait_for(in_snapshot.wait(), 10)
        await asyncio.to_thread(insert_author)
        try:
            async with connection_set(parallelism=3, lease_timeout=5.0):
                # (Three calls: one runs on lane 0.)
                counts = asyncio.gather(*(Author.objects.acount() for _ in range(3)))
                other.append(await counts)
        except DatabaseError as exc:
            other.append(exc)
        finally:
            other_done.set()

    async with ThreadSensitiveContext():
        try:
            await asyncio.wait_for(asyncio.gather(snapshot_set(), set_beside_it()), 30)
        finally:
            await sync_to_async(connections.close_all)()
    assert reads == stock == [1, 1]
    assert len(other) == 1
    assert isinstance(other[0], asgi_dbset.SnapshotError)
    assert "db_parallelism(n)" in str(other[0])
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


@contextlib.asynccontextmanager
async def a_snapshot(how: str) -> AsyncIterator[ConnectionSet]:
    """A set of the request's thread whose snapshot is on: its own
    (connection_set(snapshot=True)) or a block's (db_parallelism)."""
    if how == "set":
        async with connection_set(
            parallelism=3, snapshot=True, lease_timeout=5.0
        ) as dbset:
            yield dbset
    else:
        async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
            async with db_parallelism(3, snapshot=True):
                yield dbset


@db_parallelism(3)
async def _gathered_reads_view() -> list[int]:
    return list(await asyncio.gather(*(Author.objects.acount() for _ in range(6))))


@pytest.mark.parametrize("how", ["set", "block"])
async def test_a_connection_set_opened_inside_a_snapshot_is_refused(how: str) -> None:
    """Code inside a snapshot reads the snapshot (stock Django's nearest
    thing, a REPEATABLE READ transaction, reads the same count before and
    after a concurrent commit). A connection_set() opened inside another
    set's snapshot ran its calls on lanes of its own: those that landed on
    lane 0 (the request's connection, in the snapshot) raised SnapshotError,
    the others read the concurrent commit live - timing decided which. Now
    it is refused at once, before its body runs; db_parallelism(n) and a
    decorated view there, which change the set in use, read the snapshot on
    every lane."""
    await Author.objects.acreate(name="first")
    stock = await sync_to_async(stock_repeatable_read_around_a_commit)()
    await Author.objects.filter(name="concurrent").adelete()
    entered = False
    reads: list[int] = []

    async def an_inner_set() -> None:
        nonlocal entered
        async with connection_set(parallelism=3, lease_timeout=5.0):
            entered = True
            gathered = asyncio.gather(*(Author.objects.acount() for _ in range(6)))
            await asyncio.wait_for(gathered, 20)

    async with ThreadSensitiveContext():
        try:
            async with a_snapshot(how) as dbset:
                reads.append(await Author.objects.acount())
                await asyncio.to_thread(insert_author)
                with pytest.raises(asgi_dbset.SnapshotError) as raised:
                    await an_inner_set()
                async with db_parallelism(3):
                    reads.extend(
                        await asyncio.wait_for(
                            asyncio.gather(
                                *(Author.objects.acount() for _ in range(6))
                            ),
                            20,
                        )
                    )
                reads.extend(await asyncio.wait_for(_gathered_reads_view(), 20))
                lanes = {record.lane for record in dbset.records}
        finally:
            await sync_to_async(connections.close_all)()
    assert stock == [1, 1]
    assert not entered
    assert "db_parallelism(n)" in str(raised.value)
    assert reads == [1] * 13  # every read of the snapshot, as stock's
    assert len(lanes) > 1  # on more than one lane
    assert await Author.objects.acount() == 2  # (live again after it)
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def _gathered_counts() -> list[int]:
    async with connection_set(parallelism=2, lease_timeout=5.0):
        return list(
            await asyncio.wait_for(
                asyncio.gather(*(Author.objects.acount() for _ in range(4))), 20
            )
        )


async def _on_another_request_thread(
    func: Callable[[], Awaitable[list[int]]],
) -> list[int]:
    """*func()* as a request of its own would run it beside this one: in a
    task whose thread-sensitive context (the request's thread) is a new one,
    as Django's ASGIHandler enters one per request - the rest of the context
    (the set in use here) inherited. (asgiref 3.9 has no
    ``ThreadSensitiveContext(executor=...)`` and a nested context is the outer
    one, so it is set here, and its thread shut down after, as its exit does.)"""
    request = ThreadSensitiveContext()
    context = contextvars.copy_context()
    context.run(SyncToAsync.thread_sensitive_context.set, request)

    async def run() -> list[int]:
        try:
            return await func()
        finally:
            await sync_to_async(connections.close_all)()

    try:
        return await asyncio.create_task(run(), context=context)
    finally:
        executor = SyncToAsync.context_to_thread_executor.pop(request, None)
        if executor is not None:
            executor.shutdown()


async def test_a_set_opened_after_a_snapshot_or_for_another_request_is_opened() -> None:
    """The refusal is only inside a live snapshot of the request's thread: a
    set opened once the snapshot has ended (its block left; a task created
    in a snapshot set that outlives it), or on another request thread (a
    thread-sensitive context of its own: the set's lane 0 is another thread,
    whose connection is in no snapshot), opens and reads the
    database live, as stock Django does outside a transaction. (A nested
    ThreadSensitiveContext() without an executor is the outer one - asgiref's
    outer context wins - so its lane 0 is the request's thread: refused.)"""
    await Author.objects.acreate(name="first")
    closed = asyncio.Event()

    async def outliving() -> list[int]:
        await asyncio.wait_for(closed.wait(), 20)
        return await _gathered_counts()

    async with ThreadSensitiveContext():
        try:
            async with connection_set(parallelism=3, lease_timeout=5.0):
                async with db_parallelism(3, snapshot=True):
                    snapshot = await Author.objects.acount()
                    await asyncio.to_thread(insert_author)
                    other_request = await _on_another_request_thread(_gathered_counts)
                after_block = await _gathered_counts()
            async with connection_set(parallelism=3, snapshot=True, lease_timeout=5.0):
                await Author.objects.acount()
                task = asyncio.create_task(outliving())
            closed.set()
            outlived = await asyncio.wait_for(task, 20)
        finally:
            await sync_to_async(connections.close_all)()
    assert snapshot == 1
    assert other_request == after_block == outlived == [2, 2, 2, 2]
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0
