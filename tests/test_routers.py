"""Database routers on lanes.

Stock Django asks ``DATABASE_ROUTERS`` on the request's thread, the one that
runs every query. A lane's call runs on another thread, so a router that keeps
per-request state in ``threading.local`` (django-multidb-router's pinning
router: after a write, reads go to the primary) cannot see it there. The
library cannot keep such a router's semantics, and says so at startup
(``asgi_dbset.W003``). A router whose per-request state lives in a context
variable (the recipe in docs/deployment.md) works on lanes exactly as on
stock Django. Whatever alias Django picks on a lane, the call's queries there
can be cancelled.

A call runs on a lane of the database Django will send it to, as Django
decides it: a related manager's writes go where the routers send the through
model (many-to-many links) or the related model, whatever the manager's own
alias - so a call inside ``asgi_dbset.atomic()`` of that database runs inside
the block, as it does on stock Django.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

import django
import pytest
from asgiref.sync import ThreadSensitiveContext, async_to_sync, sync_to_async
from django.core.exceptions import FieldDoesNotExist
from django.db import connections, transaction
from django.db.models import (
    Max,
    Model,
    Prefetch,
    QuerySet,
    Value,
    aprefetch_related_objects,
    prefetch_related_objects,
)
from django.db.models.expressions import RawSQL
from django.db.models.functions import Concat
from django.db.models.signals import post_save
from django.test import override_settings

import asgi_dbset
from asgi_dbset import connection_set
from asgi_dbset.budget import budget
from asgi_dbset.checks import check_routers
from tests.helpers import active_sleeps, checked_out, sleeping
from tests.testapp.models import Author, Book, Tag

T = TypeVar("T")

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

# -- a pinning router as django-multidb-router writes it: state per thread ----------

_thread_pins = threading.local()


def this_thread_is_pinned() -> bool:
    return bool(getattr(_thread_pins, "pinned", False))


def pin_this_thread() -> None:
    _thread_pins.pinned = True


def unpin_this_thread() -> None:
    _thread_pins.pinned = False


class ThreadPinningRouter:
    """Reads go to the replica ("other") unless this thread wrote before."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "default" if this_thread_is_pinned() else "other"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        pin_this_thread()
        return "default"

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


# -- the same router with its state in a context variable (the documented recipe) ---

# One mutable dict per request, set where the request starts: every task and
# every lane of the request sees (and updates) that same dict.
request_pins: ContextVar[dict[str, bool] | None] = ContextVar(
    "tests.request_pins", default=None
)


class ContextPinningRouter:
    def db_for_read(self, model: Any, **hints: Any) -> str:
        pins = request_pins.get()
        return "default" if pins and pins.get("pinned") else "other"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        pins = request_pins.get()
        if pins is not None:
            pins["pinned"] = True
        return "default"

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


class StatelessRouter:
    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "other" if model is Book else "default"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"


def check_ids(routers: list[Any]) -> list[str]:
    with override_settings(DATABASE_ROUTERS=routers):
        return [str(message.id) for message in check_routers()]


def test_a_router_with_thread_local_state_is_named_at_startup() -> None:
    with override_settings(DATABASE_ROUTERS=[ThreadPinningRouter()]):
        (message,) = check_routers()
    assert message.id == "asgi_dbset.W003"
    assert "ThreadPinningRouter" in message.msg
    assert "threading.local" in message.msg
    assert "ContextVar" in str(message.hint)
    # By dotted path too, as settings usually name them.
    assert check_ids([f"{__name__}.ThreadPinningRouter"]) == ["asgi_dbset.W003"]


def test_routers_without_thread_state_pass() -> None:
    assert check_ids([ContextPinningRouter(), StatelessRouter()]) == []
    assert check_ids([]) == []


def test_no_router_warning_when_queries_never_leave_the_request_thread() -> None:
    with override_settings(
        DATABASE_ROUTERS=[ThreadPinningRouter()],
        ASGI_DBSET={"MAX_PARALLELISM": 1},
    ):
        assert check_routers() == []


async def reads_after_a_write(parallel: bool) -> list[bool]:
    """A request: one write, then ten gathered reads of the row it wrote."""
    token = request_pins.set({})
    try:
        async with ThreadSensitiveContext():
            if parallel:
                async with connection_set(parallelism=4, lease_timeout=5.0):
                    seen = await _write_then_read()
            else:
                seen = await _write_then_read()
            await sync_to_async(connections.close_all)()
    finally:
        request_pins.reset(token)
    return seen


async def _write_then_read() -> list[bool]:
    author = await Author.objects.acreate(name="just written")
    return list(
        await asyncio.gather(
            *(Author.objects.filter(pk=author.pk).aexists() for _ in range(10))
        )
    )


@override_settings(DATABASE_ROUTERS=[ContextPinningRouter()])
async def test_a_context_variable_router_reads_its_writes_on_lanes_as_on_stock() -> (
    None
):
    stock = await reads_after_a_write(parallel=False)
    with_lanes = await reads_after_a_write(parallel=True)
    assert stock == [True] * 10
    assert with_lanes == stock
    assert budget.total == 0


def other_sleeps() -> int:
    from django.conf import settings

    return active_sleeps(settings.DATABASES["other"]["NAME"])


async def test_a_query_a_lane_runs_on_another_alias_is_cancelled_too() -> None:
    """The call is for 'default'; a receiver of its save queries 'other' on the
    same lane's thread. Cancelling the caller cancels that query as well."""

    def slow_audit(sender: Any, instance: Author, **kwargs: Any) -> None:
        sleeping(30, Book).using("other").count()

    post_save.connect(slow_audit, sender=Author)
    try:
        async with ThreadSensitiveContext():
            async with connection_set(parallelism=2, lease_timeout=5.0) as dbset:
                # (Books: the save commits its author while this may still wait
                # to start, since the two run in parallel.)
                busy = asyncio.ensure_future(sleeping(0.5, Book).acount())  # lane 0
                save = asyncio.ensure_future(Author.objects.acreate(name="audited"))
                for _ in range(200):
                    if await asyncio.to_thread(other_sleeps) == 1:
                        break
                    await asyncio.sleep(0.02)
                assert {r.lane for r in dbset.records if r.name == "create"} == {1}
                save.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await save
                assert await busy == 0
                for _ in range(50):
                    if await asyncio.to_thread(other_sleeps) == 0:
                        break
                    await asyncio.sleep(0.02)
                assert await asyncio.to_thread(other_sleeps) == 0
            await sync_to_async(connections.close_all)()
    finally:
        post_save.disconnect(slow_audit, sender=Author)
    assert budget.total == 0


# -- related managers: the database Django writes, not the manager's model's -------

Links = Tag.books.through


class LinksElsewhereRouter:
    """Tag.books' link table lives on "other"; every model on its instance's."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "other" if model is Links else None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "other" if model is Links else None

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


class RollbackRequestedError(Exception):
    pass


def seed_tags(count: int) -> tuple[list[Tag], Book]:
    """Tags and a book on "default", copied to "other" under the same keys (the
    link table's foreign keys are checked there)."""
    author = Author.objects.create(name="linked")
    book = Book.objects.create(title="linked", author=author)
    tags = [Tag.objects.create(name=f"tag{i}") for i in range(count)]
    Author.objects.using("other").create(pk=author.pk, name=author.name)
    Book.objects.using("other").create(
        pk=book.pk, title=book.title, author_id=author.pk
    )
    for tag in tags:
        Tag.objects.using("other").create(pk=tag.pk, name=tag.name)
    return tags, book


def links(alias: str) -> list[tuple[int, int]]:
    return sorted(Links.objects.using(alias).values_list("tag_id", "book_id"))


def forget_links() -> None:
    for alias in ("default", "other"):
        Links.objects.using(alias).all().delete()


@contextlib.asynccontextmanager
async def request_with(parallelism: int) -> AsyncIterator[Any]:
    """A request's thread and set; its connections closed even on a failure."""
    async with ThreadSensitiveContext():
        try:
            async with connection_set(
                parallelism=parallelism, lease_timeout=5.0
            ) as dbset:
                yield dbset
        finally:
            await sync_to_async(connections.close_all)()


async def link_in_steps(tags: list[Tag], book: Book) -> list[list[tuple[int, int]]]:
    """Gathered aadd, then aremove and aset, then aclear: the links after each."""
    seen = []
    await asyncio.gather(*(tag.books.aadd(book) for tag in tags))
    seen.append(await sync_to_async(links)("other"))
    await asyncio.gather(tags[0].books.aremove(book), tags[1].books.aset([]))
    seen.append(await sync_to_async(links)("other"))
    await asyncio.gather(*(tag.books.aclear() for tag in tags))
    seen.append(await sync_to_async(links)("other"))
    return seen


@override_settings(DATABASE_ROUTERS=[LinksElsewhereRouter()])
async def test_many_to_many_links_run_on_lanes_of_the_through_models_database() -> None:
    tags, book = await sync_to_async(seed_tags)(4)
    async with ThreadSensitiveContext():
        stock = await link_in_steps(tags, book)
        await sync_to_async(connections.close_all)()
    before = checked_out("other")
    async with request_with(4) as dbset:
        await asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
        await asyncio.gather(*(tag.books.aadd(book) for tag in tags))
        # Every connection to "other" the set holds is one of its lanes -
        # lane 0's, or an extra lane of the budget's - and no lane of
        # "default" opened one of its own, outside the budget, to write there.
        assert checked_out("other") - before <= 1 + budget.held("other")
        await sync_to_async(forget_links)()
        library = await link_in_steps(tags, book)
        names = {"add", "remove", "set", "clear"}
        assert {r.alias for r in dbset.records if r.name in names} == {"other"}
    everything = [(tag.pk, book.pk) for tag in tags]
    assert stock[0] == everything
    assert library == stock
    assert await sync_to_async(links)("default") == []
    assert budget.total == 0


def stock_links_in_a_block(tag: Tag, book: Book) -> None:
    with transaction.atomic(using="other"):
        tag.books.add(book)
        book.tags.create(name="stock-new")
        raise RollbackRequestedError


async def links_in_a_block(tag: Tag, book: Book) -> None:
    async with asgi_dbset.atomic(using="other"):
        await tag.books.aadd(book)
        # (The tag is written on "default", where the book is; its link on
        # "other": the call is inside the block of either database.)
        await book.tags.acreate(name="lib-new")
        raise RollbackRequestedError


@override_settings(DATABASE_ROUTERS=[LinksElsewhereRouter()])
async def test_links_made_inside_a_block_of_their_database_roll_back_with_it() -> None:
    tags, book = await sync_to_async(seed_tags)(2)
    async with ThreadSensitiveContext():
        with contextlib.suppress(RollbackRequestedError):
            await sync_to_async(stock_links_in_a_block)(tags[0], book)
        await sync_to_async(connections.close_all)()
    assert await sync_to_async(links)("other") == []
    # Parallelism 3: the block holds an extra lane of "other", lane 0 is free.
    async with request_with(3):
        with contextlib.suppress(RollbackRequestedError):
            await links_in_a_block(tags[1], book)
    assert await sync_to_async(links)("other") == []
    # The new tags were written on "default", in autocommit, both ways.
    made = Tag.objects.filter(name__endswith="-new").order_by("name")
    assert [t.name async for t in made] == ["lib-new", "stock-new"]
    assert budget.total == 0


async def relink_inside_a_block(tag: Tag, book: Book) -> list[tuple[int, int]]:
    async with asgi_dbset.atomic(using="other"):
        await Links.objects.acreate(tag=tag, book=book)
        # Outside the block, this insert would wait for the block's own
        # uncommitted link to commit or roll back: forever.
        async with asyncio.timeout(10):
            await tag.books.aadd(book)
    return await sync_to_async(links)("other")


def stock_relink(tag: Tag, book: Book) -> list[tuple[int, int]]:
    with transaction.atomic(using="other"):
        Links.objects.create(tag=tag, book=book)
        tag.books.add(book)
    return links("other")


@override_settings(DATABASE_ROUTERS=[LinksElsewhereRouter()])
async def test_a_link_the_block_already_made_is_seen_not_waited_for() -> None:
    tags, book = await sync_to_async(seed_tags)(2)
    async with ThreadSensitiveContext():
        stock = await sync_to_async(stock_relink)(tags[0], book)
        await sync_to_async(connections.close_all)()
    async with request_with(3):
        library = await relink_inside_a_block(tags[1], book)
    assert stock == [(tags[0].pk, book.pk)]
    assert library == [(tags[0].pk, book.pk), (tags[1].pk, book.pk)]
    assert budget.total == 0


def stock_create_by_a_db_manager(author: Author) -> None:
    with transaction.atomic(using="default"):
        # Django's related managers write where the routers send them, with
        # the instance as hint: db_manager()'s alias is not asked.
        author.books.db_manager("other").create(title="stock")
        raise RollbackRequestedError


async def test_a_related_managers_writes_ignore_its_db_manager_alias_as_in_django() -> (
    None
):
    author = await Author.objects.acreate(name="the author")
    async with ThreadSensitiveContext():
        with contextlib.suppress(RollbackRequestedError):
            await sync_to_async(stock_create_by_a_db_manager)(author)
        await sync_to_async(connections.close_all)()
    async with request_with(3):
        with contextlib.suppress(RollbackRequestedError):
            async with asgi_dbset.atomic(using="default"):
                await author.books.db_manager("other").acreate(title="lib")
                raise RollbackRequestedError
    for alias in ("default", "other"):
        assert [b.title async for b in Book.objects.using(alias)] == []
    assert budget.total == 0


@override_settings(DATABASE_ROUTERS=[LinksElsewhereRouter()])
async def test_a_call_that_writes_two_blocks_on_two_lanes_is_refused() -> None:
    _, book = await sync_to_async(seed_tags)(1)
    async with request_with(4):
        with contextlib.suppress(RollbackRequestedError):
            async with asgi_dbset.atomic(using="default"):
                async with asgi_dbset.atomic(using="other"):
                    with pytest.raises(
                        transaction.TransactionManagementError,
                        match="different connections",
                    ):
                        await book.tags.acreate(name="refused")
                    raise RollbackRequestedError
    assert [t.name async for t in Tag.objects.filter(name="refused")] == []
    assert budget.total == 0


# -- prefetches: each lookup's queryset goes where the routers send its model -------


class BooksElsewhereRouter:
    """Books (and their reviews) live on "other"; authors on their instance's."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "other" if model is Book else None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "other" if model is Book else None

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


class RelationsAllowedRouter:
    """No database chosen (each instance is written where it was read), but
    relations across databases allowed."""

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


def seed_books_elsewhere(count: int) -> list[Author]:
    """Authors on "default" (copied to "other" under the same keys, which the
    books' foreign key checks there), one book each on "other"."""
    authors = [Author.objects.create(name=f"author{i}") for i in range(count)]
    for author in authors:
        Author.objects.using("other").create(pk=author.pk, name=author.name)
        Book.objects.create(title=f"book of {author.name}", author=author)
    return authors


def stock_prefetch_in_a_block(pk: int) -> tuple[list[str], list[str]]:
    with contextlib.suppress(RollbackRequestedError):
        with transaction.atomic(using="other"):
            Book.objects.create(title="uncommitted", author_id=pk)
            author = Author.objects.get(pk=pk)
            prefetch_related_objects([author], "books")
            (listed,) = Author.objects.filter(pk=pk).prefetch_related("books")
            seen = (
                sorted(b.title for b in author.books.all()),
                sorted(b.title for b in listed.books.all()),
            )
            raise RollbackRequestedError
    return seen


async def prefetch_in_a_block(pk: int) -> tuple[list[str], list[str]]:
    with contextlib.suppress(RollbackRequestedError):
        async with asgi_dbset.atomic(using="other"):
            await Book.objects.acreate(title="uncommitted", author_id=pk)
            author = await Author.objects.aget(pk=pk)
            await aprefetch_related_objects([author], "books")
            (listed,) = [
                a async for a in Author.objects.filter(pk=pk).prefetch_related("books")
            ]
            seen = (
                sorted(b.title for b in author.books.all()),
                sorted(b.title for b in listed.books.all()),
            )
            raise RollbackRequestedError
    return seen


@override_settings(DATABASE_ROUTERS=[BooksElsewhereRouter()])
async def test_a_prefetch_inside_a_block_of_its_related_database_sees_its_rows() -> (
    None
):
    """Author on "default", its books on "other": Django's prefetch of
    "books" reads "other", inside the block of "other" (was: the call went to
    a lane of "default", whose query on "other" was refused)."""
    (author,) = await sync_to_async(seed_books_elsewhere)(1)
    async with ThreadSensitiveContext():
        stock = await sync_to_async(stock_prefetch_in_a_block)(author.pk)
        await sync_to_async(connections.close_all)()
    # Parallelism 3: the block holds an extra lane of "other", lane 0 is free.
    async with request_with(3):
        library = await prefetch_in_a_block(author.pk)
    mine = sorted(["book of author0", "uncommitted"])
    assert stock == (mine, mine)
    assert library == stock
    assert [b.title async for b in Book.objects.filter(title="uncommitted")] == []
    assert budget.total == 0


_RAW_AUTHORS = "SELECT * FROM testapp_author"


def stock_raw_prefetch_in_a_block(pk: int) -> list[list[str]]:
    with contextlib.suppress(RollbackRequestedError):
        with transaction.atomic(using="other"):
            Book.objects.create(title="uncommitted", author_id=pk)
            raw = Author.objects.raw(_RAW_AUTHORS).prefetch_related("books")
            seen = [sorted(b.title for b in a.books.all()) for a in raw]
            raise RollbackRequestedError
    return seen


async def raw_prefetch_in_a_block(pk: int) -> list[list[list[str]]]:
    async def read() -> list[list[str]]:
        raw = Author.objects.raw(_RAW_AUTHORS).prefetch_related("books")
        return [sorted(b.title for b in a.books.all()) async for a in raw]

    with contextlib.suppress(RollbackRequestedError):
        async with asgi_dbset.atomic(using="other"):
            await Book.objects.acreate(title="uncommitted", author_id=pk)
            seen = await asyncio.wait_for(
                asyncio.gather(*(read() for _ in range(3))), 10
            )
            raise RollbackRequestedError
    return list(seen)


@override_settings(DATABASE_ROUTERS=[BooksElsewhereRouter()])
async def test_a_raw_querysets_prefetch_inside_a_block_of_its_related_database() -> (
    None
):
    """raw(...).prefetch_related("books"), authors on "default", books on
    "other": as a QuerySet's, the prefetch reads inside the block of "other"
    and sees its uncommitted book, as on stock Django. (Was: a raw queryset's
    target ignored its prefetch lookups; the call went to a lane of
    "default", whose prefetch query on "other" was refused.)"""
    (author,) = await sync_to_async(seed_books_elsewhere)(1)
    async with ThreadSensitiveContext():
        stock = await sync_to_async(stock_raw_prefetch_in_a_block)(author.pk)
        await sync_to_async(connections.close_all)()
    assert stock == [sorted(["book of author0", "uncommitted"])]
    async with request_with(3):
        library = await raw_prefetch_in_a_block(author.pk)
    assert library == [stock] * 3
    assert [b.title async for b in Book.objects.filter(title="uncommitted")] == []
    assert budget.total == 0


def stock_prefetch_using_in_a_block(pk: int) -> list[str]:
    with contextlib.suppress(RollbackRequestedError):
        with transaction.atomic(using="other"):
            Book.objects.using("other").create(title="uncommitted", author_id=pk)
            author = Author.objects.get(pk=pk)
            books = Prefetch("books", queryset=Book.objects.using("other"))
            prefetch_related_objects([author], books)
            seen = sorted(b.title for b in author.books.all())
            raise RollbackRequestedError
    return seen


async def prefetch_using_in_a_block(pk: int) -> list[str]:
    with contextlib.suppress(RollbackRequestedError):
        async with asgi_dbset.atomic(using="other"):
            await Book.objects.using("other").acreate(title="uncommitted", author_id=pk)
            author = await Author.objects.aget(pk=pk)
            books = Prefetch("books", queryset=Book.objects.using("other"))
            await aprefetch_related_objects([author], books)
            seen = sorted(b.title for b in author.books.all())
            raise RollbackRequestedError
    return seen


@override_settings(DATABASE_ROUTERS=[RelationsAllowedRouter()])
async def test_a_prefetch_querysets_database_is_the_one_it_reads() -> None:
    """No router sends books elsewhere; ``Prefetch(queryset=qs.using("other"))``
    does: the prefetch is inside the block of "other" (was: refused)."""
    author = await Author.objects.acreate(name="the author")
    await Author.objects.using("other").acreate(pk=author.pk, name=author.name)
    await Book.objects.using("other").acreate(title="committed", author_id=author.pk)
    async with ThreadSensitiveContext():
        stock = await sync_to_async(stock_prefetch_using_in_a_block)(author.pk)
        await sync_to_async(connections.close_all)()
    async with request_with(3):
        library = await prefetch_using_in_a_block(author.pk)
    assert stock == ["committed", "uncommitted"]
    assert library == stock
    assert budget.total == 0


@override_settings(DATABASE_ROUTERS=[BooksElsewhereRouter()])
async def test_gathered_prefetches_run_on_lanes_of_the_related_database() -> None:
    """A Prefetch whose queryset names its database runs on a lane of it. (A
    plain "books" lookup runs on lane 0 with routers configured: the routers
    decide its database on the thread that runs it - see
    test_prefetches_ask_a_changing_router_as_on_stock_and_only_on_lane_0.)"""
    authors = await sync_to_async(seed_books_elsewhere)(4)

    async def titles(author: Author) -> list[str]:
        books = Prefetch("books", queryset=Book.objects.using("other"))
        await aprefetch_related_objects([author], books)
        return [b.title for b in author.books.all()]

    async def listed(author: Author) -> list[str]:
        # (The rows and their books in one call: "default", then "other".)
        found = Author.objects.filter(pk=author.pk).prefetch_related("books")
        return [b.title async for a in found for b in a.books.all()]

    async with ThreadSensitiveContext():
        stock = [await titles(await Author.objects.aget(pk=a.pk)) for a in authors]
        stock_listed = [await listed(a) for a in authors]
        await sync_to_async(connections.close_all)()
    fresh = [await Author.objects.aget(pk=a.pk) for a in authors]
    before = checked_out("other")
    async with request_with(4) as dbset:
        busy = asyncio.ensure_future(sleeping(0.3).acount())  # lane 0
        library = await asyncio.gather(*(titles(a) for a in fresh))
        library_listed = await asyncio.gather(*(listed(a) for a in authors))
        # Every connection to "other" the set holds is one of its lanes -
        # lane 0's, or an extra lane of the budget's - and no lane of
        # "default" opened one of its own, outside the budget, to read there.
        assert checked_out("other") - before <= 1 + budget.held("other")
        await busy
        prefetches = [r for r in dbset.records if r.name == "prefetch_related_objects"]
        assert {r.alias for r in prefetches} == {"other"}
    assert stock == [[f"book of {a.name}"] for a in authors]
    assert library == stock
    assert stock_listed == stock
    assert library_listed == stock
    assert budget.total == 0


# -- a reverse foreign key's add(bulk=False): each object saved where it is routed --


def seed_a_book_on_other() -> tuple[Author, Book]:
    """An author on "default"; a book of another author on "other" only."""
    author = Author.objects.create(name="adopter")
    Author.objects.using("other").create(pk=author.pk, name=author.name)
    first = Author.objects.using("other").create(pk=author.pk + 1, name="first")
    book = Book.objects.using("other").create(pk=1, title="moved", author=first)
    return author, Book.objects.using("other").get(pk=book.pk)


def book_owners() -> dict[str, list[tuple[int, int]]]:
    return {
        alias: sorted(Book.objects.using(alias).values_list("pk", "author_id"))
        for alias in ("default", "other")
    }


def stock_adopt_in_a_block(author: Author, book: Book, how: str) -> None:
    with contextlib.suppress(RollbackRequestedError):
        with transaction.atomic(using="other"):
            if how == "add":
                author.books.add(book, bulk=False)
            else:
                author.books.set([book], bulk=False)
            raise RollbackRequestedError


async def adopt_in_a_block(author: Author, book: Book, how: str) -> None:
    with contextlib.suppress(RollbackRequestedError):
        async with asgi_dbset.atomic(using="other"):
            if how == "add":
                await author.books.aadd(book, bulk=False)
            else:
                await author.books.aset([book], bulk=False)
            raise RollbackRequestedError


@pytest.mark.parametrize("how", ["add", "set"])
@override_settings(DATABASE_ROUTERS=[RelationsAllowedRouter()])
async def test_objects_saved_one_by_one_are_inside_the_block_of_their_database(
    how: str,
) -> None:
    """``author.books.aadd(book, bulk=False)`` saves the book where it was read
    ("other"), whatever the author's database: inside a block of "other" the
    save rolls back with it (was: the call went to a lane of "default", whose
    save on "other" was refused)."""
    author, book = await sync_to_async(seed_a_book_on_other)()
    rows = await sync_to_async(book_owners)()
    async with ThreadSensitiveContext():
        await sync_to_async(stock_adopt_in_a_block)(author, book, how)
        await sync_to_async(connections.close_all)()
    assert await sync_to_async(book_owners)() == rows
    book = await Book.objects.using("other").aget(pk=book.pk)
    async with request_with(3) as dbset:
        await adopt_in_a_block(author, book, how)
        assert {r.alias for r in dbset.records if r.name == how} == {"other"}
    assert await sync_to_async(book_owners)() == rows
    # Outside a block, both write the book on "other".
    async with ThreadSensitiveContext():
        await sync_to_async(author.books.add)(book, bulk=False)
        await sync_to_async(connections.close_all)()
    stock = await sync_to_async(book_owners)()
    await (
        Book.objects.using("other").filter(pk=book.pk).aupdate(author_id=author.pk + 1)
    )
    book = await Book.objects.using("other").aget(pk=book.pk)
    async with request_with(3):
        await author.books.aadd(book, bulk=False)
    assert await sync_to_async(book_owners)() == stock
    assert stock["other"] == [(book.pk, author.pk)]
    assert budget.total == 0


# -- a router whose answer changes from call to call ----------------------------------


class RoundRobinRouter:
    """Django's documented replica router (``random.choice`` of the replicas on
    every read), answering in turn rather than at random so that runs compare;
    it keeps every answer it gave."""

    def __init__(self) -> None:
        self.answers: list[str] = []
        self._turns = itertools.cycle(["default", "other"])

    def db_for_read(self, model: Any, **hints: Any) -> str:
        answer = next(self._turns)
        self.answers.append(answer)
        return answer

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


async def on_stock(scenario: Callable[[], Awaitable[T]]) -> tuple[T, RoundRobinRouter]:
    """*scenario* on stock Django (no set), with a fresh round-robin router:
    what it returned, and the router (its answers); the thread's connections
    closed after."""
    router = RoundRobinRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with ThreadSensitiveContext():
            result = await scenario()
            await sync_to_async(connections.close_all)()
    return result, router


async def on_library(
    parallelism: int, scenario: Callable[[], Awaitable[T]]
) -> tuple[T, RoundRobinRouter]:
    """*scenario* in a request's set at *parallelism*, recording its stock
    calls, with a fresh round-robin router."""
    router = RoundRobinRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(parallelism) as dbset:
            dbset.record_stock_calls = True
            result = await asyncio.wait_for(scenario(), 10)
    return result, router


def served(answers: list[str]) -> list[str]:
    """The rows the routers' *answers* select: each database's one author."""
    return sorted("d" if answer == "default" else "o" for answer in answers)


async def _first_name(queryset: Any) -> str:
    names = [author.name async for author in queryset]
    return str(names[0])


async def reads_in_turn() -> list[str]:
    names = Author.objects.values_list("name", flat=True)
    return list(
        await asyncio.gather(
            *(names.aget() for _ in range(4)),
            *(Author.objects.values_list("name", flat=True).afirst() for _ in range(4)),
            *(_first_name(Author.objects.all()) for _ in range(4)),
        )
    )


@pytest.mark.parametrize("snapshot", [False, True])
async def test_a_router_answering_differently_each_call_is_asked_once_as_on_stock(
    snapshot: bool,
) -> None:
    """Twelve gathered reads, each read where the routers said on the loop - the
    alias of the lane it runs on - not where a second answer, on the lane's
    thread, would send it (was: the router asked twice per call; half of a
    lane's queries went to a connection of the other database that the lane's
    thread opened, outside the set's budget and the lane's snapshot)."""
    await Author.objects.using("default").acreate(name="d")
    await Author.objects.using("other").acreate(name="o")
    stock, stock_router = await on_stock(reads_in_turn)
    assert len(stock_router.answers) == 12
    assert sorted(stock) == served(stock_router.answers) == ["d"] * 6 + ["o"] * 6
    before = {alias: checked_out(alias) for alias in ("default", "other")}
    router = RoundRobinRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with ThreadSensitiveContext():
            try:
                async with connection_set(
                    parallelism=3, lease_timeout=5.0, snapshot=snapshot
                ) as dbset:
                    with_lanes = await reads_in_turn()
                    # Lane 0 (the request's thread) holds one connection of
                    # each database at most; the extra lanes, their budget.
                    lent = {
                        alias: checked_out(alias) - before[alias] for alias in before
                    }
                    held = {alias: budget.held(alias) for alias in before}
                    aliases = sorted(record.alias for record in dbset.records)
            finally:
                await sync_to_async(connections.close_all)()
    assert with_lanes == stock
    assert router.answers == stock_router.answers
    assert aliases == sorted(router.answers)
    assert len({record.lane for record in dbset.records}) > 1
    for alias in before:
        assert lent[alias] <= held[alias] + 1, (lent, held)
    assert budget.total == 0


async def test_a_router_answering_differently_each_call_inside_a_block() -> None:
    """Inside a block of "other": the reads the router sends to "other" see the
    block's uncommitted row, the others read "default" outside it - as inside
    Django's transaction.atomic(using="other"). (Was: a read sent to a lane of
    "default" asked the router again there, was sent to "other", and refused:
    "queried 'other' ... outside that block".)"""
    await Author.objects.using("default").acreate(name="d")
    await Author.objects.using("other").acreate(name="o")

    def stock_block() -> list[int]:
        with transaction.atomic(using="other"):
            Author.objects.using("other").create(name="uncommitted")
            counts = [Author.objects.count() for _ in range(10)]
            transaction.set_rollback(True, using="other")
        return counts

    stock, stock_router = await on_stock(sync_to_async(stock_block))
    assert stock == [1, 2] * 5
    router = RoundRobinRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(3):
            with contextlib.suppress(RollbackRequestedError):
                async with asgi_dbset.atomic(using="other"):
                    await Author.objects.using("other").acreate(name="uncommitted")
                    with_lanes = await asyncio.wait_for(
                        asyncio.gather(*(Author.objects.acount() for _ in range(10))),
                        10,
                    )
                    raise RollbackRequestedError
    assert with_lanes == stock
    assert router.answers == stock_router.answers
    assert await Author.objects.using("other").acount() == 1
    assert budget.total == 0


async def iterators_and_refreshes() -> tuple[list[list[str]], list[str]]:
    first = await Author.objects.using("default").aget(name="d")
    second = await Author.objects.using("default").aget(name="d")

    async def names() -> list[str]:
        return [author.name async for author in Author.objects.aiterator(1)]

    *iterated, _, _ = await asyncio.gather(
        *(names() for _ in range(4)),
        first.arefresh_from_db(),
        second.arefresh_from_db(),
    )
    return iterated, sorted(str(each._state.db) for each in (first, second))


async def test_iterators_and_refreshes_ask_a_changing_router_as_often_as_stock() -> (
    None
):
    """aiterator() and arefresh_from_db() with the round-robin router: the
    routers are asked as many times as on stock Django (aiterator() itself asks
    once on the loop, its rows once more), and every chunk of an iterator
    comes from one database (was: 19 answers for stock's 10 - every chunk's
    call asked again on the loop and on the lane's thread)."""
    await Author.objects.using("default").acreate(pk=1, name="d")
    await Author.objects.using("default").acreate(pk=2, name="d2")
    await Author.objects.using("other").acreate(pk=1, name="o")
    (stock, stock_refreshed), stock_router = await on_stock(iterators_and_refreshes)
    assert len(stock_router.answers) == 10
    assert stock_refreshed == ["default", "other"]
    router = RoundRobinRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(3):
            iterated, refreshed = await asyncio.wait_for(iterators_and_refreshes(), 10)
    assert len(router.answers) == len(stock_router.answers)
    assert refreshed == stock_refreshed
    for rows in stock + iterated:
        assert rows in (["d", "d2"], ["o"]), (stock, iterated)
    assert budget.total == 0


# -- what a call on a queryset pinned to the routed alias leaves on it ---------------

# (A read that takes 0.3 s on the server: it ends after a gathered fast one.)
_SLOW = RawSQL("(SELECT 1 FROM pg_sleep(0.3))", ())


async def fetch_beside_a_slow_aggregate() -> tuple[list[str], Any, list[str]]:
    authors = Author.objects.all()

    async def names() -> list[str]:
        return [author.name async for author in authors]

    fetched, aggregated = await asyncio.wait_for(
        asyncio.gather(names(), authors.aaggregate(slow=Max(_SLOW))), 10
    )
    # Evaluated, the queryset iterates in async code without a query.
    return fetched, aggregated, [author.name for author in authors]


@override_settings(DATABASE_ROUTERS=[StatelessRouter()])
async def test_a_gathered_call_keeps_the_result_cache_another_filled() -> None:
    """A slow aaggregate() gathered with an `async for` over the same queryset:
    the queryset stays evaluated, as on stock Django. (Was: the aggregate's
    stand-in, copied before the read filled the cache, set its None back on
    the queryset when it ended; the next sync iteration queried, in async
    code: SynchronousOnlyOperation.)"""
    await Author.objects.acreate(name="d")
    async with ThreadSensitiveContext():
        stock = await fetch_beside_a_slow_aggregate()
        await sync_to_async(connections.close_all)()
    assert stock == (["d"], {"slow": 1}, ["d"])
    async with request_with(3) as dbset:
        assert await fetch_beside_a_slow_aggregate() == stock
        assert len({record.lane for record in dbset.records}) == 2
    assert budget.total == 0


async def fetch_beside_a_slow_update() -> tuple[list[str], int, list[str]]:
    authors = Author.objects.all()

    async def names() -> list[str]:
        return [author.name async for author in authors]

    slow = authors.aupdate(
        name=Concat(Value("x"), RawSQL("(SELECT '' FROM pg_sleep(0.3))", ()))
    )
    fetched, updated = await asyncio.wait_for(asyncio.gather(names(), slow), 10)
    # The update cleared the cache: the queryset reads the updated row.
    return fetched, updated, [author.name async for author in authors]


@override_settings(DATABASE_ROUTERS=[StatelessRouter()])
async def test_an_update_clears_the_result_cache_a_gathered_read_filled() -> None:
    """aupdate() ends by clearing the queryset's result cache, as on stock
    Django, even one a gathered `async for` filled while it ran (its stand-in's
    cache was None before and after)."""
    await Author.objects.acreate(name="d")
    async with ThreadSensitiveContext():
        stock = await fetch_beside_a_slow_update()
        await sync_to_async(connections.close_all)()
    assert stock == (["d"], 1, ["x"])
    await Author.objects.aupdate(name="d")
    async with request_with(3):
        assert await fetch_beside_a_slow_update() == stock
    assert budget.total == 0


async def refreshes_from_a_queryset() -> list[tuple[str, str]]:
    first = await Author.objects.using("default").aget(name="d")
    second = await Author.objects.using("default").aget(name="d")
    await asyncio.gather(
        first.arefresh_from_db(from_queryset=Author.objects.all()),
        second.arefresh_from_db(from_queryset=Author.objects.all()),
    )
    return [(author.name, str(author._state.db)) for author in (first, second)]


async def test_a_refresh_from_a_queryset_asks_a_changing_router_once_as_on_stock() -> (
    None
):
    """arefresh_from_db(from_queryset=...) with the round-robin router: as many
    answers as stock, each refresh read where its lane's answer said. (Was:
    from_queryset was not pinned; its get() asked again on the lane's
    thread: 4 answers for stock's 2.)"""
    await Author.objects.using("default").acreate(pk=1, name="d")
    await Author.objects.using("other").acreate(pk=1, name="o")
    stock, stock_router = await on_stock(refreshes_from_a_queryset)
    assert sorted(stock) == [("d", "default"), ("o", "other")]
    router = RoundRobinRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(3) as dbset:
            refreshed = await asyncio.wait_for(refreshes_from_a_queryset(), 10)
            aliases = sorted(record.alias for record in dbset.records)
    assert sorted(refreshed) == sorted(stock)
    assert router.answers == stock_router.answers
    assert aliases == ["default", "default", "default", "other"]
    assert budget.total == 0


async def gathered_prefetches(how: str) -> list[tuple[str, list[str]]]:
    """Four gathered prefetches of "books": of authors read from "default"
    (aprefetch_related_objects), of a queryset's rows, or of aiterator()'s."""
    if how == "objects":
        authors = [await Author.objects.using("default").aget(pk=1) for _ in range(4)]

        async def prefetched(author: Author) -> list[tuple[str, list[str]]]:
            await aprefetch_related_objects([author], "books")
            return [(author.name, [book.title for book in author.books.all()])]

        found = await asyncio.gather(*(prefetched(a) for a in authors))
    else:

        async def listed() -> list[tuple[str, list[str]]]:
            authors = Author.objects.filter(pk=1).prefetch_related("books")
            rows = authors.aiterator(1) if how == "aiterator" else authors
            return [(a.name, [b.title for b in a.books.all()]) async for a in rows]

        found = await asyncio.gather(*(listed() for _ in range(4)))
    return [row for rows in found for row in rows]


@pytest.mark.parametrize("how", ["objects", "queryset", "aiterator"])
async def test_prefetches_ask_a_changing_router_as_on_stock_and_only_on_lane_0(
    how: str,
) -> None:
    """Prefetches with the round-robin router, authors and books under the same
    keys on both databases: the routers decide each lookup's database on the
    thread that runs it, asked there as on stock, so the call runs on lane 0
    (the request's own connections): no lane's thread opens a connection of
    another database outside the set's budget, and the routers are asked as
    often as on stock. (Was: aprefetch_related_objects asked the router on the
    loop, leased a lane of that answer, whose thread asked again and opened a
    connection of the other database: 12 answers for stock's 8, one author's
    books read from "other" where stock read "default" for all four; a
    prefetching queryset asked for its rows twice: 16 answers for stock's 12.)"""
    for alias in ("default", "other"):
        author = await Author.objects.using(alias).acreate(pk=1, name=alias[0])
        await Book.objects.using(alias).acreate(title=f"b{alias[0]}", author=author)
    stock, stock_router = await on_stock(lambda: gathered_prefetches(how))
    before = {alias: checked_out(alias) for alias in ("default", "other")}
    router = RoundRobinRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(3):
            library = await asyncio.wait_for(gathered_prefetches(how), 10)
            lent = {alias: checked_out(alias) - before[alias] for alias in before}
            held = {alias: budget.held(alias) for alias in before}
    assert len(router.answers) == len(stock_router.answers)
    for alias in before:
        assert lent[alias] <= held[alias] + 1, (lent, held)
    if how == "objects":
        assert stock == [("d", ["bd"])] * 4
        assert library == stock
        return
    # Each queryset's rows and each row's books: one database's, where that
    # call's answer said (lane 0 asks for the books while the loop asks for
    # the next call's rows: the answers come in another order than on stock).
    assert len(library) == len(stock) == 4
    for name, titles in stock + library:
        assert name in ("d", "o")
        assert titles in (["bd"], ["bo"])
    assert budget.total == 0


async def test_an_overridden_save_keeps_its_own_default_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model whose save() reads using=None as "its own database": asave()
    writes there, as on stock Django. (Was: the set passed save() the routers'
    alias, and the rows went to "default".)"""

    def save(self: Author, *args: Any, using: str | None = None, **kwargs: Any) -> None:
        Model.save(self, *args, using=using or "other", **kwargs)

    monkeypatch.setattr(Author, "save", save)

    async def saved() -> dict[str, list[str]]:
        await asyncio.gather(*(Author(name=f"a{n}").asave() for n in range(3)))
        return {
            alias: sorted([a.name async for a in Author.objects.using(alias)])
            for alias in ("default", "other")
        }

    with override_settings(DATABASE_ROUTERS=[StatelessRouter()]):
        async with ThreadSensitiveContext():
            stock = await saved()
            await sync_to_async(connections.close_all)()
        assert stock == {"default": [], "other": ["a0", "a1", "a2"]}
        await Author.objects.using("other").adelete()
        async with request_with(3):
            assert await asyncio.wait_for(saved(), 10) == stock
    assert budget.total == 0


class OtherFirst(QuerySet[Author]):
    """A queryset whose own db property sends its reads to "other"."""

    @property
    def db(self) -> str:
        return str(self._db or "other")


@override_settings(DATABASE_ROUTERS=[StatelessRouter()])
async def test_a_queryset_with_its_own_db_property_reads_where_it_says() -> None:
    """Stock Django reads where the subclass's db property says ("other"); so
    does the set. (Was: the set pinned _db to the routers' "default", which the
    property answers first: every count read "default".)"""
    await Author.objects.using("other").acreate(name="o")

    async def counts() -> list[int]:
        return list(
            await asyncio.gather(*(OtherFirst(Author).acount() for _ in range(3)))
        )

    async with ThreadSensitiveContext():
        stock = await counts()
        await sync_to_async(connections.close_all)()
    assert stock == [1, 1, 1]
    async with request_with(3):
        assert await asyncio.wait_for(counts(), 10) == stock
    assert budget.total == 0


async def reads_of_a_read_queryset() -> tuple[list[str], int, bool, bool, list[str]]:
    """A queryset read once, then counted, tested and iterated again (stock
    Django answers those from its rows, asking the routers nothing), then
    two fresh reads."""
    authors = Author.objects.all()
    names = [author.name async for author in authors]
    count = await authors.acount()
    exists = await authors.aexists()
    contains = await authors.acontains(await Author.objects.using("default").aget())
    again = [author.name async for author in authors]
    fresh = [await _first_name(Author.objects.all()) for _ in range(2)]
    return names + again, count, exists, contains, fresh


@pytest.mark.parametrize("record", [False, True])
async def test_calls_answered_from_the_result_cache_ask_no_router_as_on_stock(
    record: bool,
) -> None:
    """With the round-robin router: acount(), aexists(), acontains() and a
    second ``async for`` of a queryset already read ask the routers nothing,
    as on stock, so the reads after them get the answers stock's get. Was:
    the set asked the routers for each of them on the loop (5 answers more
    than stock's), and the fresh reads after read "default" where stock read
    "other". *record*: a set that records the calls it runs as stock (the
    middleware's SERVER_TIMING / HISTORY) at parallelism 1 asked the routers
    for the record, then Django asked them again for each call."""
    for alias in ("default", "other"):
        await Author.objects.using(alias).acreate(pk=1, name=alias[0])
    stock, stock_router = await on_stock(reads_of_a_read_queryset)
    router = RoundRobinRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(1 if record else 3) as dbset:
            dbset.record_stock_calls = record
            library = await asyncio.wait_for(reads_of_a_read_queryset(), 10)
    assert stock == (["d", "d"], 1, True, True, ["o", "d"])
    assert library == stock
    assert router.answers == stock_router.answers
    assert budget.total == 0


class AskedRouter(RoundRobinRouter):
    """The round-robin router, also keeping every write question it was
    asked (always answered "default")."""

    def db_for_write(self, model: Any, **hints: Any) -> str:
        self.answers.append(f"write {model.__name__}")
        return "default"


async def calls_stock_answers_before_the_routers() -> list[Any]:
    """Calls that Django answers (or refuses) before it asks any router for
    their database - nothing to read or write, a wrong argument - then two
    fresh reads, which get the round-robin router's next answers."""
    results: list[Any] = [
        await Author.objects.ain_bulk([]),
        await Author.objects.abulk_create([]),
        await Author.objects.abulk_update((), ["name"]),
        await Author.objects.acontains(Book(pk=1, title="not an author")),
    ]
    for refused in (
        Author.objects.acontains(Author(name="unsaved")),
        Author.objects.values("name").acontains(Author(pk=1)),
        Author(name="unsaved").adelete(),
    ):
        try:
            await refused
        except (TypeError, ValueError) as exc:
            results.append(type(exc).__name__)
    results += [await _first_name(Author.objects.all()) for _ in range(2)]
    return results


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_calls_django_answers_before_any_router_ask_none_as_on_stock(
    parallelism: int,
) -> None:
    """An empty ``ain_bulk([])``, ``abulk_create([])`` or ``abulk_update()``,
    an ``acontains()`` of another model's object, and the calls Django
    refuses before it names a database, ask the routers nothing on stock
    Django: the reads after them get the answers stock's get. Was: the set
    asked the routers for each of them as the call was made (five read and
    two write answers more than stock's), and the fresh reads after read
    "other" and "default" where stock read "default" and "other"."""
    for alias in ("default", "other"):
        await Author.objects.using(alias).acreate(pk=1, name=alias[0])
    stock_router = AskedRouter()
    with override_settings(DATABASE_ROUTERS=[stock_router]):
        async with ThreadSensitiveContext():
            stock = await calls_stock_answers_before_the_routers()
            await sync_to_async(connections.close_all)()
    router = AskedRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(parallelism) as dbset:
            dbset.record_stock_calls = True
            library = await asyncio.wait_for(
                calls_stock_answers_before_the_routers(), 10
            )
    refused = ["ValueError", "TypeError", "ValueError"]
    assert stock == [{}, [], 0, False, *refused, "d", "o"]
    assert library == stock
    assert router.answers == stock_router.answers == ["default", "other"]
    assert budget.total == 0


async def calls_stock_refuses_before_the_routers() -> list[Any]:
    """Calls Django refuses (TypeError, ValueError) before it asks any router
    for their database - an in_bulk() of a sliced or values() queryset or by
    a field that is not unique, a sliced contains(), update() or delete(), a
    batch size below 1 - then two fresh reads."""
    results: list[Any] = []
    author = Author(pk=1)
    for refused in (
        Author.objects.all()[:5].ain_bulk([1]),
        Author.objects.ain_bulk([1], field_name="name"),
        Author.objects.ain_bulk([1], field_name="no_such_field"),
        Author.objects.all()[:5].acontains(author),
        Author.objects.abulk_create([Author(name="x")], batch_size=0),
        Author.objects.abulk_update([author], ["name"], batch_size=0),
        Author.objects.all()[:1].aupdate(name="x"),
        Author.objects.all()[:1].adelete(),
        Author.objects.distinct("name").adelete(),
        Author.objects.values("name").adelete(),
    ):
        try:
            await refused
        except (TypeError, ValueError, FieldDoesNotExist) as exc:
            results.append(type(exc).__name__)
    if django.VERSION < (6, 1):  # (6.1 reads values() querysets by ids)
        try:
            await Author.objects.values("name").ain_bulk([1])
        except TypeError as exc:
            results.append(type(exc).__name__)
    results += [await _first_name(Author.objects.all()) for _ in range(2)]
    return results


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_calls_django_refuses_before_any_router_ask_none_as_on_stock(
    parallelism: int,
) -> None:
    """Django refuses these calls before it asks the routers: the reads after
    them get the answers stock's get, and a router is asked nothing for them.
    Was: the set asked the routers for each of them as the call was made
    (twice for an in_bulk() by ids; the write questions too), so the reads
    after them read "other" and "default" where stock read "default" and
    "other" (and a router that raises would have raised in place of Django's
    TypeError)."""
    for alias in ("default", "other"):
        await Author.objects.using(alias).acreate(pk=1, name=alias[0])
    stock_router = AskedRouter()
    with override_settings(DATABASE_ROUTERS=[stock_router]):
        async with ThreadSensitiveContext():
            stock = await calls_stock_refuses_before_the_routers()
            await sync_to_async(connections.close_all)()
    router = AskedRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(parallelism) as dbset:
            dbset.record_stock_calls = True
            library = await asyncio.wait_for(
                calls_stock_refuses_before_the_routers(), 10
            )
    assert stock[-2:] == ["d", "o"]
    assert len(stock) == 12 + (django.VERSION < (6, 1))
    assert library == stock
    assert router.answers == stock_router.answers == ["default", "other"]
    assert await Author.objects.using("default").acount() == 1
    assert budget.total == 0


async def refreshes_of_nothing() -> list[Any]:
    """``arefresh_from_db()`` of fields Django reloads none of: only prefetched
    relations (it drops their cache), none, or a relation's field (refused);
    then two fresh reads."""
    author = await Author.objects.prefetch_related("books").aget(pk=1)
    results: list[Any] = [author.name]
    await author.arefresh_from_db(fields=["books"])
    results.append("books" in author._prefetched_objects_cache)  # type: ignore[attr-defined]
    await author.arefresh_from_db(fields=[])
    try:
        await author.arefresh_from_db(fields=["books__title"])
    except ValueError as exc:
        results.append(type(exc).__name__)
    results += [await _first_name(Author.objects.all()) for _ in range(2)]
    return results


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_a_refresh_of_no_field_asks_no_router_as_on_stock(
    parallelism: int,
) -> None:
    """Django's ``refresh_from_db(fields=...)`` returns before it asks the
    routers when no field is left to reload (the names were prefetched
    relations, whose cache it drops, or none), and refuses ``__`` in a name
    before them too. Was: the set asked the routers for each such call (three
    answers more than stock's), so the reads after them read "default" and
    "other" where stock read "other" and "default"."""
    for alias in ("default", "other"):
        await Author.objects.using(alias).acreate(pk=1, name=alias[0])
    stock, stock_router = await on_stock(refreshes_of_nothing)
    library, router = await on_library(parallelism, refreshes_of_nothing)
    assert stock == ["d", False, "ValueError", "o", "d"]
    assert library == stock
    assert router.answers == stock_router.answers
    assert budget.total == 0


async def bulk_reads_in_turn() -> list[Any]:
    """In_bulk() reads by ids, gathered, then one read after them."""
    found = await asyncio.gather(*(Author.objects.ain_bulk([1]) for _ in range(4)))
    names = [str(by_id[1]) for by_id in found]
    return [*names, await _first_name(Author.objects.all())]


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_in_bulk_by_ids_reads_the_routers_second_answer_as_on_stock(
    parallelism: int,
) -> None:
    """Django's ``in_bulk(id_list)`` asks the routers twice - for the database
    whose backend sizes its batches, then for the one it reads its rows from
    - so with the round-robin router it reads the second answer's database.
    Was: the set asked once and read the first answer's (each in_bulk read
    "default" where stock read "other"), and every read after it got the
    answer stock's read before it."""
    for alias in ("default", "other"):
        await Author.objects.using(alias).acreate(pk=1, name=alias[0])
    stock, stock_router = await on_stock(bulk_reads_in_turn)
    library, router = await on_library(parallelism, bulk_reads_in_turn)
    assert stock == ["o", "o", "o", "o", "d"]
    assert library == stock
    assert router.answers == stock_router.answers
    assert budget.total == 0


async def bulk_read_by_a_queryset_of_ids() -> list[Any]:
    """In_bulk() by a queryset of ids (run first, by Django), then one read."""
    found = await Author.objects.ain_bulk(Author.objects.values_list("pk", flat=True))
    return [sorted(map(str, found.values())), await _first_name(Author.objects.all())]


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_in_bulk_by_a_queryset_of_ids_asks_in_stocks_order(
    parallelism: int,
) -> None:
    """Django's ``in_bulk(qs)`` runs the queryset of ids first (its router
    answer first), then asks for its own database twice. With the round-robin
    router, stock reads the ids on "default" (author 1) and its rows on
    "default": ["d"]. Was: the set asked for in_bulk's two answers first, as
    the call was made, and the ids' query asked on the lane after them: the
    ids of "default" looked up on "other", [] (at parallelism 1 too, when the
    set records its calls)."""
    await Author.objects.using("default").acreate(pk=1, name="d")
    await Author.objects.using("other").acreate(pk=2, name="o")
    stock, stock_router = await on_stock(bulk_read_by_a_queryset_of_ids)
    library, router = await on_library(parallelism, bulk_read_by_a_queryset_of_ids)
    assert stock == [["d"], "o"]
    assert library == stock
    assert router.answers == stock_router.answers
    assert budget.total == 0


async def bulk_create_then_reads() -> list[Any]:
    await Author.objects.abulk_create([Author(name="new")])
    return [await _first_name(Author.objects.order_by("-pk")) for _ in range(2)]


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_bulk_create_asks_for_a_read_database_first_as_on_stock(
    parallelism: int,
) -> None:
    """Django's ``bulk_create()`` checks its options against
    ``connections[self.db]`` before it marks the queryset for writing: one
    ``db_for_read`` answer ("default" here), then the writes'. So the reads
    after it read "other" then "default". Was: the set asked only
    ``db_for_write``, and the reads after it read "default" then "other"
    (each got the answer stock's read before it got)."""
    for alias in ("default", "other"):
        await Author.objects.using(alias).acreate(pk=1000, name=alias[0])
    stock_router = AskedRouter()
    with override_settings(DATABASE_ROUTERS=[stock_router]):
        async with ThreadSensitiveContext():
            stock = await bulk_create_then_reads()
            await sync_to_async(connections.close_all)()
    await Author.objects.using("default").filter(name="new").adelete()
    router = AskedRouter()
    with override_settings(DATABASE_ROUTERS=[router]):
        async with request_with(parallelism) as dbset:
            dbset.record_stock_calls = True
            library = await asyncio.wait_for(bulk_create_then_reads(), 10)
    assert stock == ["o", "d"]
    assert library == stock

    def reads(answers: list[str]) -> list[str]:
        return [answer for answer in answers if not answer.startswith("write")]

    assert reads(router.answers) == reads(stock_router.answers)
    assert budget.total == 0


class PrimaryInTransactionsRouter:
    """A replica router that keeps reads made inside a transaction on the
    primary, where they see its rows: it looks at the connection of the
    thread it is asked on, as many primary/replica routers do."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        if transaction.get_connection("default").in_atomic_block:
            return "default"
        return "other"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


def stock_reads_in_a_transaction() -> list[Any]:
    seen: list[Any] = []
    with contextlib.suppress(RollbackRequestedError), transaction.atomic():
        Author.objects.create(name="mine")
        seen += [Author.objects.filter(name="mine").exists(), Author.objects.count()]
        raise RollbackRequestedError
    return [*seen, Author.objects.filter(name="mine").exists()]


async def reads_in_a_block() -> list[Any]:
    seen: list[Any] = []
    with contextlib.suppress(RollbackRequestedError):
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name="mine")
            seen += await asyncio.gather(
                Author.objects.filter(name="mine").aexists(), Author.objects.acount()
            )
            raise RollbackRequestedError
    return [*seen, await Author.objects.filter(name="mine").aexists()]


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_a_router_that_looks_at_the_transaction_sees_the_block(
    parallelism: int,
) -> None:
    """Reads inside ``asgi_dbset.atomic()``, with a router that sends reads
    made inside a transaction to the primary: they read the block's own row
    there, as stock Django's inside ``transaction.atomic()``. Was: the set
    asked the router on the event loop's thread, whose connection is in no
    transaction, so at parallelism 3 (and at 1 when the set records its
    calls) the reads went to the replica: the row not found, the replica's
    count."""
    await Author.objects.using("default").acreate(name="d")
    await Author.objects.using("other").acreate(name="o")
    with override_settings(DATABASE_ROUTERS=[PrimaryInTransactionsRouter()]):
        async with ThreadSensitiveContext():
            stock = await sync_to_async(stock_reads_in_a_transaction)()
            await sync_to_async(connections.close_all)()
        async with request_with(parallelism) as dbset:
            dbset.record_stock_calls = True
            library = await asyncio.wait_for(reads_in_a_block(), 10)
    assert stock == [True, 2, False]
    assert library == stock
    assert await Author.objects.using("default").acount() == 1
    assert budget.total == 0


async def gathered_reads(parallelism: int | None) -> list[Any]:
    async with contextlib.AsyncExitStack() as stack:
        if parallelism is not None:
            await stack.enter_async_context(
                connection_set(parallelism=parallelism, lease_timeout=5.0)
            )
        return list(
            await asyncio.gather(
                Author.objects.filter(name="mine").aexists(), Author.objects.acount()
            )
        )


def reads_under_async_to_sync(parallelism: int | None) -> list[Any]:
    """Reads made by async code that sync code runs with ``async_to_sync``
    inside its ``transaction.atomic()`` (as a TestCase's test runs)."""
    with transaction.atomic():
        Author.objects.create(name="mine")
        seen = async_to_sync(gathered_reads)(parallelism)
        transaction.set_rollback(True)
    return seen


@pytest.mark.parametrize("parallelism", [1, 3])
def test_a_router_that_looks_at_the_transaction_sees_the_sync_callers(
    parallelism: int,
) -> None:
    """Under ``async_to_sync`` inside a transaction of the sync caller (a
    TestCase, with a replica configured as its TEST MIRROR), the router sees
    that transaction, as stock Django's, asked on the caller's thread, does:
    the reads stay on the primary and see the caller's row. Was: asked on the
    event loop's thread, it sent them to the replica ([False, 1] where stock
    read [True, 2]) - in a TestCase, the mirror, which does not see the
    test's rows."""
    Author.objects.using("default").create(name="d")
    Author.objects.using("other").create(name="o")
    with override_settings(DATABASE_ROUTERS=[PrimaryInTransactionsRouter()]):
        stock = reads_under_async_to_sync(None)
        library = reads_under_async_to_sync(parallelism)
    assert stock == [True, 2]
    assert library == stock
    assert budget.total == 0


def sync_view_with_an_async_helper() -> list[Any]:
    """A sync view that runs an async helper with ``async_to_sync`` inside its
    ``transaction.atomic()``; the helper's reads use the set around the view
    (the middleware's, opened on the event loop, under no ``async_to_sync``)."""
    with transaction.atomic():
        Author.objects.create(name="mine")
        seen = async_to_sync(gathered_reads)(None)
        transaction.set_rollback(True)
    return seen


@pytest.mark.parametrize("parallelism", [1, 3])
async def test_a_router_that_looks_at_the_transaction_sees_a_sync_views(
    parallelism: int,
) -> None:
    """A set opened on the event loop (the middleware's), then a sync view's
    async helper reading inside the view's transaction: stock's router,
    asked on the view's thread, sees the transaction and reads the primary
    ([True, 2]). Was: the set read the sync caller's connections only when
    it was opened under async_to_sync, so here the router, asked on the
    loop's thread, saw no transaction and sent the reads to the replica
    ([False, 1]) - at parallelism 3, and at 1 when the set records its
    calls. Now the set reads each new sync caller's connections (one hop)."""
    await Author.objects.using("default").acreate(name="d")
    await Author.objects.using("other").acreate(name="o")
    with override_settings(DATABASE_ROUTERS=[PrimaryInTransactionsRouter()]):
        async with ThreadSensitiveContext():
            stock = await sync_to_async(sync_view_with_an_async_helper)()
            await sync_to_async(connections.close_all)()
        async with request_with(parallelism) as dbset:
            dbset.record_stock_calls = True
            library = await asyncio.wait_for(
                sync_to_async(sync_view_with_an_async_helper)(), 10
            )
            callers = len(dbset.outer_connections or ())  # (the view's thread's)
    assert stock == [True, 2]
    assert library == stock
    assert (callers, dbset.outer_connections) == (1, {})  # (none kept once closed)
    assert await Author.objects.filter(name="mine").acount() == 0
    assert budget.total == 0


async def open_a_set_beside_a_waiting_sync_call(open_a_set: bool) -> str:
    """Under ``async_to_sync``: a sync call (on the caller's thread) waits for
    an event that a gathered coroutine sets once it has opened a set - and
    made no ORM call, which would queue on that busy thread as on stock."""
    opened = threading.Event()

    def wait() -> bool:
        return opened.wait(3)  # (bounded: a deadlock shows as "waited in vain")

    async def opener() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if open_a_set:
                await stack.enter_async_context(
                    connection_set(parallelism=2, lease_timeout=5.0)
                )
            opened.set()

    waited, _ = await asyncio.gather(sync_to_async(wait)(), opener())
    return "set" if waited else "waited in vain"


def test_opening_a_set_under_async_to_sync_waits_for_no_sync_call() -> None:
    """With routers configured, opening a set under ``async_to_sync`` while
    the sync caller's thread runs a call that waits for the opener: stock
    (no set) sets the event at once. Was: the set's opening first hopped to
    that thread to read its connections for the routers, queued behind the
    waiting call: a deadlock (here bounded by the wait's 3 s timeout). Now
    the first call that asks the routers reads them, where stock queues that
    call on the same thread."""
    with override_settings(DATABASE_ROUTERS=[PrimaryInTransactionsRouter()]):
        stock = async_to_sync(open_a_set_beside_a_waiting_sync_call)(False)
        library = async_to_sync(open_a_set_beside_a_waiting_sync_call)(True)
    assert stock == "set"
    assert library == stock
    assert budget.total == 0


def stock_prefetch_in_two_blocks(pk: int) -> list[str]:
    with contextlib.suppress(RollbackRequestedError):
        with transaction.atomic(using="default"):
            with transaction.atomic(using="other"):
                Book.objects.create(title="uncommitted", author_id=pk)
                author = Author.objects.get(pk=pk)
                prefetch_related_objects([author], "books")
                seen = sorted(b.title for b in author.books.all())
                raise RollbackRequestedError
    return seen


async def prefetch_in_two_blocks(pk: int) -> tuple[list[str], str]:
    with contextlib.suppress(RollbackRequestedError):
        async with asgi_dbset.atomic(using="default"):
            async with asgi_dbset.atomic(using="other"):
                await Book.objects.acreate(title="uncommitted", author_id=pk)
                author = await Author.objects.aget(pk=pk)
                await aprefetch_related_objects([author], "books")
                seen = sorted(b.title for b in author.books.all())
                # A queryset's own rows ("default") and its books ("other")
                # are in blocks on two lanes: one call cannot be in both.
                with pytest.raises(transaction.TransactionManagementError) as refused:
                    [
                        a
                        async for a in Author.objects.filter(pk=pk).prefetch_related(
                            "books"
                        )
                    ]
                raise RollbackRequestedError
    return seen, str(refused.value)


@override_settings(DATABASE_ROUTERS=[BooksElsewhereRouter()])
async def test_a_prefetch_inside_blocks_of_two_databases_runs_in_its_own() -> None:
    """Blocks of "default" and "other" (two lanes at parallelism 3), the
    author's books on "other": stock's prefetch reads them inside the block of
    "other", uncommitted book included; so does the set's, on that block's
    lane. (Was: since prefetches with routers run on lane 0, refused with
    TransactionManagementError.) A prefetching queryset, whose own rows are
    on "default", stays refused, loudly."""
    (author,) = await sync_to_async(seed_books_elsewhere)(1)
    async with ThreadSensitiveContext():
        stock = await sync_to_async(stock_prefetch_in_two_blocks)(author.pk)
        await sync_to_async(connections.close_all)()
    async with request_with(3):
        library, refused = await asyncio.wait_for(prefetch_in_two_blocks(author.pk), 10)
    assert stock == sorted(["book of author0", "uncommitted"])
    assert library == stock
    assert "several databases" in refused
    assert [b.title async for b in Book.objects.filter(title="uncommitted")] == []
    assert budget.total == 0


def stock_prefetch_seen_in_two_blocks(pk: int) -> list[str]:
    with contextlib.suppress(RollbackRequestedError):
        with transaction.atomic(using="default"):
            with transaction.atomic(using="other"):
                Book.objects.create(title="uncommitted", author_id=pk)
                author = Author.objects.get(pk=pk)
                prefetch_related_objects([author], "books")
                seen = sorted(b.title for b in author.books.all())
                raise RollbackRequestedError
    return seen


async def prefetch_seen_in_two_blocks(pk: int) -> list[str]:
    with contextlib.suppress(RollbackRequestedError):
        async with asgi_dbset.atomic(using="default"):
            async with asgi_dbset.atomic(using="other"):
                await Book.objects.acreate(title="uncommitted", author_id=pk)
                author = await Author.objects.aget(pk=pk)
                await aprefetch_related_objects([author], "books")
                seen = sorted(b.title for b in author.books.all())
                raise RollbackRequestedError
    return seen


async def test_a_prefetch_inside_blocks_of_two_databases_asks_seeing_them() -> None:
    """Blocks of "default" and "other" on two lanes, and a router that keeps
    reads made inside a transaction on the primary: stock's prefetch reads
    the books on "default", inside its block (the uncommitted book). Was: the
    set asked the routers which block the prefetch runs in on the event
    loop's thread without showing them the blocks (the one ask
    seen_from_blocks() did not cover), so they named the replica, and the
    prefetch read "other"'s books, outside the block of "default"."""
    for alias in ("default", "other"):
        await Author.objects.using(alias).acreate(pk=1, name=alias[0])
        await Book.objects.using(alias).acreate(title=alias, author_id=1)
    with override_settings(DATABASE_ROUTERS=[PrimaryInTransactionsRouter()]):
        async with ThreadSensitiveContext():
            stock = await sync_to_async(stock_prefetch_seen_in_two_blocks)(1)
            await sync_to_async(connections.close_all)()
        async with request_with(3):
            library = await asyncio.wait_for(prefetch_seen_in_two_blocks(1), 10)
    assert stock == ["default", "uncommitted"]
    assert library == stock
    assert [b.title async for b in Book.objects.filter(title="uncommitted")] == []
    assert budget.total == 0
