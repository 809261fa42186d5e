"""``ATOMIC_REQUESTS = True``: the library's views and middleware behave as
stock Django's.

Django refuses an async view under ``ATOMIC_REQUESTS`` (``RuntimeError``,
answered with a 500) unless ``@transaction.non_atomic_requests`` exempts it;
``@db_parallelism(3)`` over or under that decorator changes neither. A sync
view runs in the request's transaction: gathered calls of an
``async_to_sync`` inside it see its writes and roll back with it, behind
``DBSetMiddleware`` as on stock.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.asgi import get_asgi_application
from django.core.signals import got_request_exception
from django.db import connection, connections, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import override_settings
from django.urls import path

from asgi_dbset import DBSetMiddleware, active_set, db_parallelism
from tests.asgi import request
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


def lanes() -> list[int]:
    dbset = active_set()
    return [] if dbset is None else sorted({r.lane for r in dbset.records})


def async_view() -> Callable[..., Any]:
    # (A fresh function each time: non_atomic_requests marks the view it is given.)
    async def view(request: HttpRequest) -> HttpResponse:
        counts = await asyncio.gather(*(Author.objects.acount() for _ in range(3)))
        return JsonResponse({"counts": counts, "lanes": lanes()})

    return view


def sync_view(request: HttpRequest) -> HttpResponse:
    Author.objects.create(name="in the request's transaction")

    async def gathered() -> list[int]:
        return list(
            await asyncio.gather(
                *(
                    Author.objects.filter(name__startswith="in the").acount()
                    for _ in range(3)
                )
            )
        )

    seen = async_to_sync(gathered)()
    if request.GET.get("fail"):
        raise RuntimeError("the view failed")
    return JsonResponse({"in_atomic": connection.in_atomic_block, "seen": seen})


urlpatterns = [
    path("plain/", async_view()),
    path("parallel/", db_parallelism(3)(async_view())),
    path(
        "parallel-exempt/",
        db_parallelism(3)(transaction.non_atomic_requests(async_view())),
    ),
    path(
        "exempt-parallel/",
        transaction.non_atomic_requests(db_parallelism(3)(async_view())),
    ),
    path("exempt/", transaction.non_atomic_requests(async_view())),
    path("sync/", sync_view),
]


@pytest.fixture
def atomic_requests() -> Iterator[list[str]]:
    """ATOMIC_REQUESTS on 'default' (Django reads it from connections.settings,
    one dict every thread's wrapper shares); the errors the handler raised."""
    settings_dict = connections.settings["default"]
    errors: list[str] = []

    def record(sender: Any, **kwargs: Any) -> None:
        errors.append(repr(sys.exc_info()[1]))

    got_request_exception.connect(record)
    settings_dict["ATOMIC_REQUESTS"] = True
    try:
        with override_settings(ROOT_URLCONF=__name__):
            yield errors
    finally:
        settings_dict["ATOMIC_REQUESTS"] = False
        got_request_exception.disconnect(record)


async def test_async_views_under_atomic_requests(atomic_requests: list[str]) -> None:
    stock = get_asgi_application()
    library = DBSetMiddleware(get_asgi_application())
    refused = "RuntimeError('You cannot use ATOMIC_REQUESTS with async views.')"

    # Stock Django refuses the undecorated async view...
    response = await asyncio.wait_for(request(stock, "/plain/"), 30)
    assert (response.status, atomic_requests) == (500, [refused])
    # ...and so it refuses it, decorated or not, behind the middleware.
    for path_ in ("/plain/", "/parallel/"):
        atomic_requests.clear()
        response = await asyncio.wait_for(request(library, path_), 30)
        assert (response.status, atomic_requests) == (500, [refused]), path_

    # Exempt, stock runs it; the library too, on three lanes, whichever
    # decorator is outermost.
    atomic_requests.clear()
    response = await asyncio.wait_for(request(stock, "/exempt/"), 30)
    assert response.status == 200
    assert response.json() == {"counts": [0, 0, 0], "lanes": []}
    for path_ in ("/parallel-exempt/", "/exempt-parallel/"):
        response = await asyncio.wait_for(request(library, path_), 30)
        assert response.status == 200, path_
        assert response.json() == {"counts": [0, 0, 0], "lanes": [0, 1, 2]}, path_
    assert atomic_requests == []


async def test_a_sync_view_under_atomic_requests(atomic_requests: list[str]) -> None:
    for app in (get_asgi_application(), DBSetMiddleware(get_asgi_application())):
        # The view's gathered calls see its uncommitted row (they run in its
        # transaction), and the request commits it.
        response = await asyncio.wait_for(request(app, "/sync/"), 30)
        assert response.json() == {"in_atomic": True, "seen": [1, 1, 1]}
        assert await Author.objects.acount() == 1
        await Author.objects.all().adelete()
        # A view that fails rolls them back with its transaction.
        response = await asyncio.wait_for(request(app, "/sync/", "fail=1"), 30)
        assert response.status == 500
        assert await Author.objects.acount() == 0
