"""Django's async APIs beyond the QuerySet's (tests/test_entry_points.py covers
those): django.contrib.auth, database sessions, the shortcuts, async signals,
and on Django 6.0+ the async paginator and the tasks framework.

Each recipe runs three times: on stock Django (no set), in a set of
parallelism 1 and in one of parallelism 4 with its extra lanes leased. Its
outcome - the value it returns, or its exception's type and message - and the
rows it leaves must be the same all three times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, async_to_sync, sync_to_async
from django.contrib.auth import aauthenticate, aget_user, alogin, alogout
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.auth.models import Group, Permission, User
from django.contrib.sessions.models import Session
from django.core import paginator
from django.core.asgi import get_asgi_application
from django.db import connections, transaction
from django.db.models import Prefetch
from django.db.models.query import aprefetch_related_objects
from django.db.models.signals import m2m_changed, post_save
from django.dispatch import Signal
from django.http import HttpRequest, JsonResponse
from django.shortcuts import aget_list_or_404, aget_object_or_404
from django.test import override_settings
from django.urls import path

import asgi_dbset
from asgi_dbset import DBSetMiddleware, connection_set
from tests.asgi import request as asgi_request
from tests.helpers import sleeping
from tests.testapp.models import Author, Book, Tag

try:  # Django 6.0+
    from django.tasks import task
except ImportError:  # pragma: no cover - Django 5.2
    task = None

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

Recipe = Callable[[str], Awaitable[Any]]


class RollbackRequestedError(Exception):
    pass


def old_hash() -> str:
    """A password hash Django upgrades when it checks it (too few iterations)."""
    return PBKDF2PasswordHasher().encode("pw", "salt12345678", iterations=1000)


def seed() -> None:
    author = Author.objects.create(name="a1")
    Book.objects.create(title="b1", author=author, pages=10)
    Book.objects.create(title="b2", author=author, pages=20)
    Tag.objects.create(name="red")
    alice = User.objects.create_user("alice", password="pw")
    group = Group.objects.create(name="g")
    group.permissions.add(Permission.objects.get(codename="add_author"))
    alice.groups.add(group)
    alice.user_permissions.add(Permission.objects.get(codename="view_book"))
    User.objects.create(username="old", password=old_hash())


async def authors(prefix: str) -> list[str]:
    """The rows a recipe left (its key is the prefix's tail)."""
    return sorted(
        [
            name
            async for name in Author.objects.filter(
                name__startswith=prefix
            ).values_list("name", flat=True)
        ]
    )


# -- django.contrib.auth ---------------------------------------------------------


async def create_user(key: str) -> Any:
    user = await User.objects.acreate_user(f"u-{key}", password="pw")
    superuser = await User.objects.acreate_superuser(f"s-{key}", password="pw")
    return (
        await user.acheck_password("pw"),
        superuser.is_superuser,
        await User.objects.filter(username__endswith=f"-{key}").acount(),
    )


async def create_user_twice(key: str) -> Any:
    await User.objects.acreate_user("alice")


async def create_user_elsewhere(key: str) -> Any:
    user = await User.objects.db_manager("other").acreate_user(f"o-{key}")
    return (
        user._state.db,
        await User.objects.using("other").filter(username=f"o-{key}").aexists(),
        await User.objects.filter(username=f"o-{key}").aexists(),
    )


async def authenticate(key: str) -> Any:
    found = await asyncio.gather(
        aauthenticate(username="alice", password="pw"),
        aauthenticate(username="alice", password="wrong"),
        aauthenticate(username="nobody", password="pw"),
    )
    return [user.username if user else None for user in found]


async def authenticate_upgrades_the_hash(key: str) -> Any:
    user = await aauthenticate(username="old", password="pw")
    stored = await User.objects.values_list("password", flat=True).aget(username="old")
    await User.objects.filter(username="old").aupdate(password=old_hash())
    return user.username if user else None, stored == old_hash()


async def permissions(key: str) -> Any:
    alice = await User.objects.aget(username="alice")
    has_add, has_delete, every = await asyncio.gather(
        alice.ahas_perm("testapp.add_author"),
        alice.ahas_perm("testapp.delete_author"),
        alice.aget_all_permissions(),
    )
    return (
        has_add,
        has_delete,
        sorted(every),
        sorted(await alice.aget_user_permissions()),
        sorted(await alice.aget_group_permissions()),
        await alice.ahas_module_perms("testapp"),
    )


async def groups(key: str) -> Any:
    user = await User.objects.acreate_user(f"m-{key}")
    first = await Group.objects.acreate(name=f"g1-{key}")
    second = await Group.objects.acreate(name=f"g2-{key}")
    await user.groups.aadd(first, second)
    both = await user.groups.acount()
    await first.user_set.aremove(user)
    await user.groups.aset([first])
    await first.user_set.aclear()
    await user.groups.acreate(name=f"g3-{key}")
    users = [u async for u in User.objects.filter(username="alice")]
    await aprefetch_related_objects(
        users, Prefetch("groups", to_attr="named"), "user_permissions"
    )
    return (
        both,
        [g.name.split("-")[0] async for g in user.groups.all()],
        [g.name for g in users[0].named],
        [p.codename for p in users[0].user_permissions.all()],
    )


# -- the shortcuts, refresh_from_db, get_or_create races ---------------------------


async def shortcuts(key: str) -> Any:
    found = await asyncio.gather(
        aget_object_or_404(Book, title="b1"),
        aget_object_or_404(Book, title="none"),
        aget_object_or_404(Book, author__name="a1"),
        aget_list_or_404(Book.objects.order_by("title"), author__name="a1"),
        aget_list_or_404(Book, title="none"),
        aget_object_or_404(Book.objects.select_for_update(), title="b1"),
        return_exceptions=True,
    )
    return [
        [b.title for b in f]
        if isinstance(f, list)
        else (f.title if isinstance(f, Book) else f"{type(f).__name__}: {f}")
        for f in found
    ]


async def locked_in_a_block(key: str) -> Any:
    async with asgi_dbset.atomic():
        book = await aget_object_or_404(Book.objects.select_for_update(), title="b1")
        book.pages = -1
        await book.arefresh_from_db(from_queryset=Book.objects.select_for_update())
        return book.pages


async def refresh_from_db(key: str) -> Any:
    book = await Book.objects.aget(title="b1")
    book.pages, book.title = -1, "changed"
    await book.arefresh_from_db(fields=["pages"])
    refreshed = (book.pages, book.title)
    await book.arefresh_from_db(from_queryset=Book.objects.filter(pages__gt=5))
    from_queryset = book.pages
    await book.arefresh_from_db(from_queryset=Book.objects.filter(pages__gt=100))
    return refreshed, from_queryset


async def get_or_create_race(key: str) -> Any:
    gathered = await asyncio.gather(
        *(Tag.objects.aget_or_create(name=f"race-{key}") for _ in range(4)),
        *(
            Tag.objects.aupdate_or_create(name=f"urace-{key}", defaults={})
            for _ in range(4)
        ),
    )
    created = sorted(c for _, c in gathered)
    return created, await Tag.objects.filter(name__endswith=f"race-{key}").acount()


# -- async signals, and signals of async saves -------------------------------------

ping = Signal()


def sync_receiver(sender: Any, key: str, **kwargs: Any) -> str:
    Author.objects.create(name=f"sig-{key}-sync")
    return "sync"


async def async_receiver(sender: Any, key: str, **kwargs: Any) -> str:
    await Author.objects.acreate(name=f"sig-{key}-async")
    return "async"


def failing_receiver(sender: Any, key: str, **kwargs: Any) -> None:
    Tag.objects.create(name="red")


@contextlib.contextmanager
def connected(signal: Signal, *receivers: Any, **kwargs: Any) -> Any:
    for receiver in receivers:
        signal.connect(receiver, dispatch_uid=receiver.__name__, **kwargs)
    try:
        yield
    finally:
        for receiver in receivers:
            signal.disconnect(dispatch_uid=receiver.__name__, **kwargs)


async def send_signals(key: str) -> Any:
    with connected(ping, sync_receiver, async_receiver):
        plain = await ping.asend(sender=None, key=f"{key}-plain")
        try:
            async with asgi_dbset.atomic():
                await ping.asend(sender=None, key=f"{key}-undone")
                raise RollbackRequestedError
        except RollbackRequestedError:
            pass
        async with asgi_dbset.atomic():
            robust = await ping.asend_robust(sender=None, key=f"{key}-kept")
    return (
        sorted(str(r) for _, r in plain),
        sorted(str(r) for _, r in robust),
        await authors(f"sig-{key}-"),
    )


async def failing_receiver_in_a_block(key: str) -> Any:
    with connected(ping, failing_receiver):
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name=f"sig-{key}-block")
            errors = await ping.asend_robust(sender=None, key=key)
            try:
                await Author.objects.acount()
            except transaction.TransactionManagementError as exc:
                after = str(exc)
    return [type(e).__name__ for _, e in errors], after


def sync_block(key: str, fail: bool) -> None:
    # Async receivers run by sync code inside transaction.atomic().
    with transaction.atomic():
        Author.objects.create(name=f"sig-{key}-outer")
        async_to_sync(ping.asend)(sender=None, key=f"{key}-a")
        ping.send(sender=None, key=f"{key}-s")
        if fail:
            raise RollbackRequestedError


async def signals_in_a_sync_block(key: str) -> Any:
    with connected(ping, sync_receiver, async_receiver):
        await sync_to_async(sync_block)(f"{key}-kept", False)
        try:
            await sync_to_async(sync_block)(f"{key}-undone", True)
        except RollbackRequestedError:
            pass
    return await authors(f"sig-{key}-")


async def tag_saved(sender: Any, instance: Tag, **kwargs: Any) -> None:
    if instance.name.startswith("saved-"):
        await Author.objects.acreate(name=f"sig-{instance.name}")


async def tags_linked(sender: Any, action: str, pk_set: Any, **kwargs: Any) -> None:
    if action == "post_add":
        await Author.objects.acreate(name=f"sig-linked-{sorted(pk_set)[0]}")


async def model_signals(key: str) -> Any:
    with connected(post_save, tag_saved, sender=Tag):
        with connected(m2m_changed, tags_linked, sender=Tag.books.through):
            try:
                async with asgi_dbset.atomic():
                    await asyncio.gather(
                        *(
                            Tag.objects.acreate(name=f"saved-{key}-{i}")
                            for i in range(3)
                        )
                    )
                    book = await Book.objects.aget(title="b1")
                    await book.tags.aadd(await Tag.objects.aget(name="red"))
                    inside = await (
                        Author.objects.filter(name__startswith="sig-")
                        .exclude(name__endswith="-kept")
                        .acount()
                    )
                    raise RollbackRequestedError
            except RollbackRequestedError:
                pass
            await Tag.objects.acreate(name=f"saved-{key}-kept")
    return inside, await authors(f"sig-saved-{key}"), await book.tags.acount()


RECIPES: dict[str, Recipe] = {
    "acreate_user": create_user,
    "acreate_user twice": create_user_twice,
    "acreate_user elsewhere": create_user_elsewhere,
    "aauthenticate": authenticate,
    "aauthenticate upgrades the hash": authenticate_upgrades_the_hash,
    "permissions": permissions,
    "groups": groups,
    "shortcuts": shortcuts,
    "select_for_update in a block": locked_in_a_block,
    "arefresh_from_db": refresh_from_db,
    "get_or_create race": get_or_create_race,
    "asend": send_signals,
    "asend_robust failing in a block": failing_receiver_in_a_block,
    "signals in a sync block": signals_in_a_sync_block,
    "model signals": model_signals,
}


# -- Django 6.0+: the async paginator and the tasks framework -----------------------


async def paginate(key: str) -> Any:
    pages = paginator.AsyncPaginator(Book.objects.order_by("title"), 1)  # type: ignore[attr-defined]
    first, second = await asyncio.gather(pages.apage(1), pages.apage(2))
    lists = await asyncio.gather(first.aget_object_list(), second.aget_object_list())
    try:
        await pages.apage(3)
    except paginator.EmptyPage as exc:
        empty = str(exc)
    try:
        async with asgi_dbset.atomic():
            await Author.objects.acreate(name=f"page-{key}")
            named = paginator.AsyncPaginator(  # type: ignore[attr-defined]
                Author.objects.filter(name__startswith="page-").order_by("name"), 5
            )
            inside = await (await named.apage(1)).aget_object_list()
            raise RollbackRequestedError
    except RollbackRequestedError:
        pass
    return (
        await pages.acount(),
        await pages.anum_pages(),
        [[b.title for b in found] for found in lists],
        await second.ahas_next(),
        empty,
        [a.name.removesuffix(key) for a in inside],
        await authors("page-"),
    )


if task is not None:

    @task
    async def async_writer(name: str) -> int:
        await Author.objects.acreate(name=name)
        return await Author.objects.filter(
            name__startswith=name.rsplit("-", 1)[0]
        ).acount()

    @task
    def sync_writer(name: str) -> int:
        Author.objects.create(name=name)
        return Author.objects.filter(name__startswith=name.rsplit("-", 1)[0]).count()

    @task
    async def failing_writer(name: str) -> int:
        await Author.objects.acreate(name=name)
        await Author.objects.aget(name="nobody")
        return 0

    async def enqueue(key: str) -> Any:
        def outcome(result: Any) -> Any:
            if result.status == "SUCCESSFUL":
                return result.return_value
            return [e.exception_class_path for e in result.errors]

        gathered = await asyncio.gather(
            *(async_writer.aenqueue(f"task-{key}-{i}") for i in range(2)),
            sync_writer.aenqueue(f"task-{key}-s"),
            failing_writer.aenqueue(f"task-{key}-f"),
        )
        try:
            async with asgi_dbset.atomic():
                undone = await async_writer.aenqueue(f"task-{key}-undone")
                raise RollbackRequestedError
        except RollbackRequestedError:
            pass
        try:
            await async_writer.aget_result(undone.id)
        except NotImplementedError as exc:
            no_result = str(exc)
        return (
            sorted(str(outcome(r)) for r in gathered),
            outcome(undone),
            no_result,
            await async_writer.acall(f"task-{key}-call"),
            await authors(f"task-{key}-"),
        )

    RECIPES["AsyncPaginator"] = paginate
    RECIPES["tasks"] = enqueue


@contextlib.asynccontextmanager
async def ran_by(parallelism: int | None) -> AsyncIterator[None]:
    """A request's thread, with a set of *parallelism* whose extra lanes are
    leased (None: stock Django, no set)."""
    async with ThreadSensitiveContext():
        if parallelism is None:
            yield
        else:
            async with connection_set(parallelism=parallelism, lease_timeout=5.0):
                if parallelism > 1:
                    await asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
                yield
        await sync_to_async(connections.close_all)()


async def outcome(recipe: Recipe, key: str) -> Any:
    try:
        result = ("returned", await asyncio.wait_for(recipe(key), 30))
    except Exception as exc:
        result = ("raised", type(exc).__name__, str(exc))
    # The key is in the rows: compare them without it.
    return json.loads(json.dumps(result, default=str).replace(key, "KEY"))


def test_the_django_6_recipes_are_here_when_django_has_those_apis() -> None:
    expected = {"AsyncPaginator", "tasks"} if task is not None else set()
    assert expected <= set(RECIPES)
    assert hasattr(paginator, "AsyncPaginator") == (task is not None)


@pytest.mark.parametrize("name", sorted(RECIPES))
async def test_contrib_api_matches_stock(name: str) -> None:
    await sync_to_async(seed)()
    outcomes = {}
    for parallelism in (None, 1, 4):
        async with ran_by(parallelism):
            outcomes[parallelism] = await outcome(RECIPES[name], f"key{parallelism}x")
    assert outcomes[1] == outcomes[None]
    assert outcomes[4] == outcomes[None]


# -- sessions and auth through the ASGI stack -------------------------------------


async def login_view(request: HttpRequest) -> JsonResponse:
    user = await aauthenticate(request, username="alice", password="pw")
    assert user is not None
    await alogin(request, user)
    await request.session.aset("cart", [1, 2])
    who, count, cart = await asyncio.gather(
        request.auser(), Author.objects.acount(), request.session.aget("cart")
    )
    return JsonResponse({"user": who.get_username(), "count": count, "cart": cart})


async def whoami_view(request: HttpRequest) -> JsonResponse:
    who, cart, count = await asyncio.gather(
        request.auser(), request.session.aget("cart"), Book.objects.acount()
    )
    again = await aget_user(request)
    perms = sorted(await who.aget_all_permissions()) if who.is_authenticated else []
    return JsonResponse(
        {
            "user": who.get_username(),
            "again": again.get_username(),
            "cart": cart,
            "count": count,
            "perms": perms,
        }
    )


async def cycle_view(request: HttpRequest) -> JsonResponse:
    await request.session.acycle_key()
    await request.session.aset("k", "v")
    await request.session.asave()
    return JsonResponse({"sessions": await Session.objects.acount()})


async def logout_view(request: HttpRequest) -> JsonResponse:
    await alogout(request)
    return JsonResponse({"sessions": await Session.objects.acount()})


async def login_rolled_back_view(request: HttpRequest) -> JsonResponse:
    try:
        async with asgi_dbset.atomic():
            user = await aauthenticate(request, username="alice", password="pw")
            await alogin(request, user)
            await request.session.asave()
            inside = await Session.objects.acount()
            raise RollbackRequestedError
    except RollbackRequestedError:
        pass
    await request.session.aflush()
    alice = await User.objects.aget(username="alice")
    return JsonResponse(
        {
            "inside": inside,
            "after": await Session.objects.acount(),
            "last_login": alice.last_login is not None,
        }
    )


urlpatterns = [
    path("login/", login_view),
    path("who/", whoami_view),
    path("cycle/", cycle_view),
    path("logout/", logout_view),
    path("login-rolled-back/", login_rolled_back_view),
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]


async def get(app: Any, url: str, cookies: dict[str, str]) -> Any:
    """One GET with the client's cookies; keeps the ones the response sets."""
    jar = "; ".join(f"{k}={v}" for k, v in cookies.items())
    headers = [(b"cookie", jar.encode())] if cookies else []
    response = await asyncio.wait_for(asgi_request(app, url, headers=headers), 15)
    for name, value in response.headers:
        if name.lower() == b"set-cookie":
            key, _, rest = value.decode().partition("=")
            cookie = rest.split(";")[0]
            if cookie in ('""', ""):
                cookies.pop(key, None)
            else:
                cookies[key] = cookie
    return response.status, (response.json() if response.status == 200 else "")


async def session_flow(app: Any) -> list[Any]:
    cookies: dict[str, str] = {}
    pages = ["/who/", "/login/", "/who/", "/cycle/", "/who/", "/logout/", "/who/"]
    seen: list[Any] = [await get(app, page, cookies) for page in pages]
    seen.append(await get(app, "/login-rolled-back/", {}))
    seen.append(await Session.objects.acount())
    await Session.objects.all().adelete()
    await User.objects.filter(username="alice").aupdate(last_login=None)
    return seen


@pytest.mark.parametrize("parallelism", [1, 4])
async def test_sessions_and_auth_through_the_middleware_match_stock(
    parallelism: int,
) -> None:
    await sync_to_async(seed)()
    with override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=MIDDLEWARE):
        stock = await session_flow(get_asgi_application())
    with override_settings(
        ROOT_URLCONF=__name__,
        MIDDLEWARE=MIDDLEWARE,
        ASGI_DBSET={"DEFAULT_PARALLELISM": parallelism},
    ):
        library = await session_flow(DBSetMiddleware(get_asgi_application()))

    assert stock[2] == (
        200,
        {
            "user": "alice",
            "again": "alice",
            "cart": [1, 2],
            "count": 2,
            "perms": ["testapp.add_author", "testapp.view_book"],
        },
    )
    assert library == stock
