"""db_parallelism and connection_set reject bad arguments when applied; the
decorator on class-based views through method_decorator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import AsyncClient, RequestFactory, override_settings
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from asgi_dbset import (
    ConnectionSet,
    DBSetMiddleware,
    active_set,
    connection_set,
    db_parallelism,
)
from tests.asgi import request
from tests.testapp.models import Author, Book


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        db_parallelism(bad)


@pytest.mark.parametrize("bad", [True, False, 2.0, "3", None, [3]])
def test_non_integers_are_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="whole number"):
        db_parallelism(bad)


def test_a_sync_view_is_refused_with_what_to_write() -> None:
    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    with pytest.raises(TypeError, match="async def"):
        db_parallelism(3)(view)


def test_a_non_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="directly above"):
        db_parallelism(3)(42)  # type: ignore[type-var]


def test_decorated_view_keeps_its_name_and_is_async() -> None:
    async def dashboard(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    decorated = db_parallelism(3)(dashboard)
    assert decorated.__name__ == "dashboard"
    assert decorated.db_parallelism == 3  # type: ignore[attr-defined]
    from asgiref.sync import iscoroutinefunction

    assert iscoroutinefunction(decorated)


@pytest.mark.parametrize("bad", [0, True, "2"])
def test_connection_set_validates(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        connection_set(parallelism=bad)


def test_connection_set_caps_at_max_parallelism() -> None:
    with override_settings(ASGI_DBSET={"MAX_PARALLELISM": 2}):
        assert connection_set(parallelism=16).parallelism == 2


def test_connection_set_validates_lease_timeout() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        ConnectionSet(parallelism=2, lease_timeout=-1)
    with pytest.raises(TypeError, match="seconds"):
        ConnectionSet(parallelism=2, lease_timeout="soon")  # type: ignore[arg-type]


def test_repr_shows_live_state() -> None:
    assert repr(ConnectionSet(parallelism=3)) == (
        "<ConnectionSet new parallelism=3 | lanes: 0 busy, 1 idle, 0 leasing | "
        "calls: 0 queued, 0 run>"
    )


# Class-based views: method_decorator applies the decorator once to a dummy when
# the class is defined, then, on each request, to a partial of the bound method.


@pytest.mark.django_db(transaction=True)
async def test_method_decorator_on_dispatch_of_an_async_view() -> None:
    """Django's idiom for decorating every handler of a class-based view, which
    works on stock Django with its own decorators (login_not_required, ...):
    ``dispatch`` is sync and returns the handler's coroutine."""
    author = await Author.objects.acreate(name="a")
    await Book.objects.acreate(title="b", author=author)
    app = DBSetMiddleware(get_asgi_application())
    response = await request(app, "/cbv-dispatch/")
    assert response.status == 200, response.body[:300]
    data = response.json()
    assert (data["authors"], data["books"], data["parallelism"]) == (1, 1, 3)
    # Without the middleware (Django's test client) it opens a set of its own.
    client = AsyncClient()
    response = await client.get("/cbv-dispatch/")
    assert response.status_code == 200, response.content[:300]
    assert response.json()["parallelism"] == 3
    # A method the view does not have: Django's 405, the same as undecorated.
    refused = await client.post("/cbv-dispatch/")
    stock = await client.post("/cbv/")  # (only its get is decorated)
    assert (refused.status_code, refused["Allow"]) == (405, stock["Allow"])


def test_method_decorator_on_dispatch_of_a_sync_view_is_refused_at_once() -> None:
    with pytest.raises(TypeError, match=r"Report is synchronous.*async def"):

        @method_decorator(db_parallelism(3), name="dispatch")
        class Report(View):
            def get(self, request: HttpRequest) -> HttpResponse:
                return HttpResponse()


def test_method_decorator_on_a_sync_handler_is_refused_at_once() -> None:
    with pytest.raises(TypeError, match="async def"):

        class Report(View):
            @method_decorator(db_parallelism(3))
            def get(self, request: HttpRequest) -> HttpResponse:
                return HttpResponse()


@pytest.mark.django_db(transaction=True)
async def test_method_decorator_on_a_sync_dispatch_of_its_own() -> None:
    """A ``dispatch`` written in the class body is decorated before its class
    exists: on an async view it works; on a sync view each request is refused
    with a TypeError (and nothing of the view runs)."""
    ran: list[str] = []

    class Async(View):
        @method_decorator(db_parallelism(2))
        def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            return super().dispatch(request, *args, **kwargs)

        async def get(self, request: HttpRequest) -> JsonResponse:
            dbset = active_set()
            return JsonResponse({"parallelism": dbset.parallelism if dbset else 0})

    class Sync(View):
        @method_decorator(db_parallelism(2))
        def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            return super().dispatch(request, *args, **kwargs)

        def get(self, request: HttpRequest) -> HttpResponse:
            ran.append("get")
            return HttpResponse()

    response = await Async.as_view()(RequestFactory().get("/"))
    assert json.loads(response.content) == {"parallelism": 2}
    with pytest.raises(TypeError, match=r"Sync is synchronous.*async def"):
        Sync.as_view()(RequestFactory().get("/"))
    assert ran == []


@pytest.mark.django_db(transaction=True)
async def test_method_decorator_on_dispatch_under_another_decorator() -> None:
    """method_decorator([db_parallelism(n), csrf_exempt], ...) hands the
    decorator csrf_exempt's wrapper of the bound dispatch."""

    @method_decorator([db_parallelism(2), csrf_exempt], name="dispatch")
    class Form(View):
        async def post(self, request: HttpRequest) -> JsonResponse:
            dbset = active_set()
            return JsonResponse(
                {
                    "authors": await Author.objects.acount(),
                    "parallelism": dbset.parallelism if dbset else 0,
                }
            )

    view = Form.as_view()
    assert view.csrf_exempt is True  # type: ignore[attr-defined]
    response = await view(RequestFactory().post("/"))
    assert json.loads(response.content) == {"authors": 0, "parallelism": 2}


def test_a_bare_decorator_says_what_to_write() -> None:
    async def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    with pytest.raises(TypeError, match=r"write @db_parallelism\(3\) above"):
        db_parallelism(view)  # type: ignore[arg-type]
