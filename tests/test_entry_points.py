"""Every async entry point of the installed Django runs on a lane and returns what
stock Django returns.

The entry points are found by introspection; each needs a recipe below, so a
Django release that adds one fails ``test_every_entry_point_has_a_recipe`` until
it is covered.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db.models import F, Model, QuerySet, Sum
from django.db.models.query import RawQuerySet, aprefetch_related_objects

from asgi_dbset import connection_set
from tests.helpers import sleeping
from tests.testapp.models import Author, Book, Note, Review, Tag

Recipe = Callable[[str], Awaitable[Any]]


def _async_names(cls: type) -> set[str]:
    return {
        name
        for name, member in vars(cls).items()
        if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member)
    }


def discovered() -> set[str]:
    """Every async ORM entry point of the installed Django, as ``owner.name``."""
    from django.contrib.contenttypes.fields import create_generic_related_manager
    from django.db.models.fields.related_descriptors import (
        create_forward_many_to_many_manager,
        create_reverse_many_to_one_manager,
    )
    from django.db.models.manager import Manager

    found = {f"QuerySet.{n}" for n in _async_names(QuerySet)} | {"QuerySet.__aiter__"}
    found |= {f"RawQuerySet.{n}" for n in _async_names(RawQuerySet)} | {
        "RawQuerySet.__aiter__"
    }
    found |= {f"Model.{n}" for n in _async_names(Model)}
    for label, factory, rel in (
        ("ReverseFK", create_reverse_many_to_one_manager, Book.reviews.rel),
        ("ManyToMany", create_forward_many_to_many_manager, Book.tags.rel),
        ("Generic", create_generic_related_manager, Author.notes.rel),
    ):
        if label == "ReverseFK":
            cls = factory(Manager, rel)
        elif label == "ManyToMany":
            cls = factory(Manager, rel, reverse=True)
        else:
            cls = factory(Manager, rel)
        found |= {f"{label}.{n}" for n in _async_names(cls)}
    found.add("aprefetch_related_objects")
    return found


def seeded() -> QuerySet[Book]:
    """The books the fixture made; write recipes add others."""
    return Book.objects.filter(title__in=["b1", "b2", "b3"])


async def _book(title: str = "b1") -> Book:
    return await Book.objects.aget(title=title)


async def _author(name: str = "a1") -> Author:
    return await Author.objects.aget(name=name)


async def _fresh_book(key: str) -> Book:
    author = await _author()
    return await Book.objects.acreate(title=f"fresh-{key}", author=author)


async def _tag_names(book: Book) -> list[str]:
    return sorted([t.name async for t in book.tags.all()])


async def _review_stars(book: Book) -> list[int]:
    return sorted([r.stars async for r in book.reviews.all()])


async def _note_texts(author: Author) -> list[str]:
    return sorted([n.text.split("-")[0] async for n in author.notes.all()])


# --- recipes: each returns a value that must be the same stock and in a set -------


async def qs_bulk_update(key: str) -> Any:
    books = [b async for b in seeded().order_by("title")]
    return await Book.objects.abulk_update(books, ["pages"])


async def qs_delete(key: str) -> Any:
    await Author.objects.acreate(name=f"doomed-{key}")
    return await Author.objects.filter(name=f"doomed-{key}").adelete()


async def model_asave(key: str) -> Any:
    author = Author(name=f"saved-{key}")
    await author.asave()
    return await Author.objects.filter(pk=author.pk).aexists()


async def model_adelete(key: str) -> Any:
    author = await Author.objects.acreate(name=f"gone-{key}")
    return await author.adelete()


async def model_arefresh(key: str) -> Any:
    book = await _book()
    book.pages = -1
    await book.arefresh_from_db()
    return book.pages


async def prefetch(key: str) -> Any:
    authors = [
        a async for a in Author.objects.filter(name__in=["a1", "a2"]).order_by("name")
    ]
    await aprefetch_related_objects(authors, "books")
    return [
        sorted(b.title for b in a.books.all() if not b.title.startswith("fresh"))
        for a in authors
    ]


async def aiterate(key: str) -> Any:
    return [b.title async for b in seeded().order_by("title").aiterator(chunk_size=2)]


async def fk_add(key: str) -> Any:
    book = await _fresh_book(key)
    review = await Review.objects.acreate(stars=1)
    await book.reviews.aadd(review)
    return await _review_stars(book)


async def fk_create(key: str) -> Any:
    book = await _fresh_book(key)
    await book.reviews.acreate(stars=4)
    return await _review_stars(book)


async def fk_get_or_create(key: str) -> Any:
    book = await _fresh_book(key)
    _, created = await book.reviews.aget_or_create(stars=5)
    return created, await _review_stars(book)


async def fk_update_or_create(key: str) -> Any:
    book = await _fresh_book(key)
    _, created = await book.reviews.aupdate_or_create(stars=2, defaults={"stars": 2})
    return created, await _review_stars(book)


async def fk_remove(key: str) -> Any:
    book = await _fresh_book(key)
    review = await book.reviews.acreate(stars=1)
    await book.reviews.aremove(review)
    return await _review_stars(book)


async def fk_clear(key: str) -> Any:
    book = await _fresh_book(key)
    await book.reviews.acreate(stars=1)
    await book.reviews.aclear()
    return await _review_stars(book)


async def fk_set(key: str) -> Any:
    book = await _fresh_book(key)
    review = await Review.objects.acreate(stars=3)
    await book.reviews.aset([review])
    return await _review_stars(book)


async def m2m_add(key: str) -> Any:
    book = await _fresh_book(key)
    await book.tags.aadd(await Tag.objects.aget(name="red"))
    return await _tag_names(book)


async def m2m_remove(key: str) -> Any:
    book = await _fresh_book(key)
    red = await Tag.objects.aget(name="red")
    await book.tags.aadd(red)
    await book.tags.aremove(red)
    return await _tag_names(book)


async def m2m_clear(key: str) -> Any:
    book = await _fresh_book(key)
    await book.tags.aadd(await Tag.objects.aget(name="red"))
    await book.tags.aclear()
    return await _tag_names(book)


async def m2m_set(key: str) -> Any:
    book = await _fresh_book(key)
    await book.tags.aset([await Tag.objects.aget(name="blue")])
    return await _tag_names(book)


async def m2m_create(key: str) -> Any:
    book = await _fresh_book(key)
    await book.tags.acreate(name=f"new-{key}")
    return len(await _tag_names(book))


async def m2m_get_or_create(key: str) -> Any:
    book = await _fresh_book(key)
    _, created = await book.tags.aget_or_create(name=f"goc-{key}")
    return created, len(await _tag_names(book))


async def m2m_update_or_create(key: str) -> Any:
    book = await _fresh_book(key)
    _, created = await book.tags.aupdate_or_create(name=f"uoc-{key}")
    return created, len(await _tag_names(book))


async def _fresh_author(key: str) -> Author:
    return await Author.objects.acreate(name=f"noted-{key}")


async def _loose_note(text: str) -> Note:
    # Not content_object=...: resolving it may query synchronously.
    author_type = await ContentType.objects.aget(app_label="testapp", model="author")
    author = await _author()
    return await Note.objects.acreate(
        text=text, content_type=author_type, object_id=author.pk
    )


async def gen_add(key: str) -> Any:
    author = await _fresh_author(key)
    note = await _loose_note(f"added-{key}")
    await author.notes.aadd(note)
    return await _note_texts(author)


async def gen_remove(key: str) -> Any:
    author = await _fresh_author(key)
    note = await author.notes.acreate(text=f"removed-{key}")
    await author.notes.aremove(note)
    return await _note_texts(author)


async def gen_clear(key: str) -> Any:
    author = await _fresh_author(key)
    await author.notes.acreate(text=f"cleared-{key}")
    await author.notes.aclear()
    return await _note_texts(author)


async def gen_set(key: str) -> Any:
    author = await _fresh_author(key)
    note = await _loose_note(f"set-{key}")
    await author.notes.aset([note])
    return await _note_texts(author)


async def gen_create(key: str) -> Any:
    author = await _fresh_author(key)
    await author.notes.acreate(text=f"created-{key}")
    return await _note_texts(author)


async def gen_get_or_create(key: str) -> Any:
    author = await _fresh_author(key)
    _, created = await author.notes.aget_or_create(text=f"goc-{key}")
    return created, await _note_texts(author)


async def gen_update_or_create(key: str) -> Any:
    author = await _fresh_author(key)
    _, created = await author.notes.aupdate_or_create(text=f"uoc-{key}")
    return created, await _note_texts(author)


RECIPES: dict[str, Recipe] = {
    "QuerySet.aaggregate": lambda k: seeded().aaggregate(total=Sum("pages")),
    "QuerySet.abulk_create": lambda k: _count(
        Author.objects.abulk_create(
            [Author(name=f"bulk-{k}-1"), Author(name=f"bulk-{k}-2")]
        )
    ),
    "QuerySet.abulk_update": qs_bulk_update,
    "QuerySet.acontains": lambda k: _contains(),
    "QuerySet.acount": lambda k: seeded().acount(),
    "QuerySet.acreate": lambda k: _name_prefix(
        Author.objects.acreate(name=f"created-{k}")
    ),
    "QuerySet.adelete": qs_delete,
    "QuerySet.aearliest": lambda k: _title(seeded().aearliest("pages")),
    "QuerySet.aexists": lambda k: Book.objects.filter(pages__gt=100).aexists(),
    "QuerySet.aexplain": lambda k: _explain(),
    "QuerySet.afirst": lambda k: _title(seeded().order_by("title").afirst()),
    "QuerySet.aget": lambda k: _title(Book.objects.aget(title="b2")),
    "QuerySet.aget_or_create": lambda k: _created(
        Tag.objects.aget_or_create(name=f"goc-{k}")
    ),
    "QuerySet.ain_bulk": lambda k: _in_bulk(),
    "QuerySet.aiterator": aiterate,
    "QuerySet.alast": lambda k: _title(seeded().order_by("title").alast()),
    "QuerySet.alatest": lambda k: _title(seeded().alatest("pages")),
    "QuerySet.aupdate": lambda k: Book.objects.filter(title="b1").aupdate(
        pages=F("pages")
    ),
    "QuerySet.aupdate_or_create": lambda k: _created(
        Tag.objects.aupdate_or_create(name=f"uoc-{k}", defaults={})
    ),
    "QuerySet.__aiter__": lambda k: _titles(seeded().order_by("title")),
    "RawQuerySet.__aiter__": lambda k: _titles(
        Book.objects.raw(
            "SELECT * FROM testapp_book WHERE title LIKE 'b_' ORDER BY title"
        )
    ),
    "Model.asave": model_asave,
    "Model.adelete": model_adelete,
    "Model.arefresh_from_db": model_arefresh,
    "aprefetch_related_objects": prefetch,
    "ReverseFK.aadd": fk_add,
    "ReverseFK.acreate": fk_create,
    "ReverseFK.aget_or_create": fk_get_or_create,
    "ReverseFK.aupdate_or_create": fk_update_or_create,
    "ReverseFK.aremove": fk_remove,
    "ReverseFK.aclear": fk_clear,
    "ReverseFK.aset": fk_set,
    "ManyToMany.aadd": m2m_add,
    "ManyToMany.aremove": m2m_remove,
    "ManyToMany.aclear": m2m_clear,
    "ManyToMany.aset": m2m_set,
    "ManyToMany.acreate": m2m_create,
    "ManyToMany.aget_or_create": m2m_get_or_create,
    "ManyToMany.aupdate_or_create": m2m_update_or_create,
    "Generic.aadd": gen_add,
    "Generic.aremove": gen_remove,
    "Generic.aclear": gen_clear,
    "Generic.aset": gen_set,
    "Generic.acreate": gen_create,
    "Generic.aget_or_create": gen_get_or_create,
    "Generic.aupdate_or_create": gen_update_or_create,
}


async def _count(aw: Awaitable[list[Any]]) -> int:
    return len(await aw)


async def _contains() -> bool:
    return await Book.objects.acontains(await _book())


async def _name_prefix(aw: Awaitable[Author]) -> str:
    return (await aw).name.split("-")[0]


async def _title(aw: Awaitable[Book | None]) -> str | None:
    book = await aw
    return book.title if book else None


async def _created(aw: Awaitable[tuple[Any, bool]]) -> bool:
    return (await aw)[1]


async def _in_bulk() -> list[str]:
    found = await Tag.objects.filter(name__in=["red", "blue"]).ain_bulk(
        field_name="name"
    )
    return sorted(found)


async def _explain() -> bool:
    plan = await Book.objects.filter(pages__gt=1).aexplain()
    return "Scan" in plan


async def _titles(qs: Any) -> list[str]:
    return [b.title async for b in qs]


@pytest.fixture
def library(transactional_db: None) -> None:
    a1, a2 = Author.objects.create(name="a1"), Author.objects.create(name="a2")
    books = [
        Book.objects.create(title="b1", author=a1, pages=120),
        Book.objects.create(title="b2", author=a1, pages=80),
        Book.objects.create(title="b3", author=a2, pages=300),
    ]
    red, blue = Tag.objects.create(name="red"), Tag.objects.create(name="blue")
    red.books.add(books[0])
    blue.books.add(books[1], books[2])
    # Generic managers look their content type up synchronously when created;
    # stock Django needs the cache warm for `author.notes` in async code.
    ContentType.objects.get_for_model(Author)


def test_every_entry_point_has_a_recipe() -> None:
    found = discovered()
    assert found - set(RECIPES) == set(), "new async ORM entry points need a recipe"
    assert set(RECIPES) - found == set(), "recipes for entry points this Django lacks"


@pytest.mark.usefixtures("library")
async def test_every_entry_point_runs_on_a_lane_and_matches_stock() -> None:
    names = sorted(discovered())
    stock = {name: await RECIPES[name]("stock") for name in names}

    async with connection_set(parallelism=2) as dbset:
        # Hold lane 0 with a long query, so every call below needs lane 1.
        blocker = asyncio.ensure_future(sleeping(30).acount())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if dbset.lanes[0].busy:
                break
        assert dbset.lanes[0].busy
        in_set = {}
        for name in names:
            before = len(dbset.records)
            in_set[name] = await RECIPES[name]("set")
            records = dbset.records[before:]
            assert records, f"{name} did not go through the set"
            assert {r.lane for r in records} == {1}, f"{name} ran on lanes {records}"
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker

    assert in_set == stock
