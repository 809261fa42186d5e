"""Django's request path inside a set: what its sync hops see is stock's.

Inside a connection set, the hops of Django's request path (signal dispatch,
``MiddlewareMixin`` middleware, sync views, the response's close) run through
the lanes' leaner hop instead of ``SyncToAsync`` (asgi_dbset.routing). Each
test serves the same requests with and without ``DBSetMiddleware`` and
compares what the middleware, the views and the signal receivers saw.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.core.asgi import get_asgi_application
from django.core.signals import request_finished, request_started
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import override_settings
from django.urls import path
from django.utils import timezone
from django.utils.deprecation import MiddlewareMixin

from asgi_dbset import DBSetMiddleware, connection_set, db_parallelism
from asgi_dbset.hop import run_as_stock
from asgi_dbset.routing import REQUEST_PATH_MODULES, request_path_sync_to_async
from tests.asgi import request
from tests.helpers import checked_out
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)

#: Set by the middleware's process_request, read by the views.
SEEN_BY_VIEW: contextvars.ContextVar[str] = contextvars.ContextVar("seen_by_view")


class RecordingMiddleware(MiddlewareMixin):
    """A sync middleware as most of Django's are: under ASGI each of its
    methods is a hop to the request's thread."""

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        request.middleware_thread = threading.get_ident()  # type: ignore[attr-defined]
        SEEN_BY_VIEW.set("set in process_request")
        timezone.activate("Asia/Tokyo")  # (asgiref Local storage)
        if request.GET.get("fail") == "request":
            raise ValueError("process_request failed")
        return None

    def process_response(
        self, request: HttpRequest, response: HttpResponse
    ) -> HttpResponse:
        response["x-response-thread"] = str(threading.get_ident())
        response["x-authors"] = str(Author.objects.count())  # sync ORM, its thread
        return response


async def _seen(request: HttpRequest) -> dict[str, Any]:
    # (User code's own sync_to_async: asgiref's, on the request's thread.)
    thread = await sync_to_async(threading.get_ident)()
    return {
        "authors": await Author.objects.acount(),
        "middleware_on_request_thread": request.middleware_thread == thread,  # type: ignore[attr-defined]
        "var": SEEN_BY_VIEW.get("unset"),
        "tz": timezone.get_current_timezone_name(),
        "thread": thread,
    }


async def async_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse(await _seen(request))


@db_parallelism(3)
async def parallel_view(request: HttpRequest) -> JsonResponse:
    data = await _seen(request)
    data["gathered"] = await asyncio.gather(
        Author.objects.acount(),
        Author.objects.filter(name="a").acount(),
        Author.objects.exclude(name="a").acount(),
    )
    return JsonResponse(data)


def sync_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "authors": Author.objects.count(),
            "middleware_on_request_thread": request.middleware_thread  # type: ignore[attr-defined]
            == threading.get_ident(),
            "var": SEEN_BY_VIEW.get("unset"),
            "tz": timezone.get_current_timezone_name(),
            "thread": threading.get_ident(),
        }
    )


urlpatterns = [
    path("async/", async_view),
    path("parallel/", parallel_view),
    path("sync/", sync_view),
]


@pytest.fixture
def signal_threads() -> Iterator[dict[str, list[int]]]:
    seen: dict[str, list[int]] = {"started": [], "finished": []}

    def started(**kwargs: Any) -> None:
        seen["started"].append(threading.get_ident())

    def finished(**kwargs: Any) -> None:
        seen["finished"].append(threading.get_ident())

    request_started.connect(started)
    request_finished.connect(finished)
    yield seen
    request_started.disconnect(started)
    request_finished.disconnect(finished)


@pytest.fixture
def apps() -> Iterator[dict[str, Any]]:
    with override_settings(
        ROOT_URLCONF=__name__, MIDDLEWARE=[f"{__name__}.RecordingMiddleware"]
    ):
        django = get_asgi_application()
        yield {"stock": django, "asgi_dbset": DBSetMiddleware(get_asgi_application())}


@pytest.fixture
def authors(transactional_db: None) -> None:
    Author.objects.create(name="a")
    Author.objects.create(name="b")


def test_inside_a_set_the_request_path_hops_through_the_lean_hop() -> None:
    import importlib

    for name in REQUEST_PATH_MODULES:
        module = importlib.import_module(name)
        assert module.sync_to_async is request_path_sync_to_async, name


async def test_which_hop_each_form_takes() -> None:
    def f() -> int:
        return threading.get_ident()

    # Without a set: asgiref's own.
    assert isinstance(request_path_sync_to_async(f), SyncToAsync)
    async with connection_set(parallelism=4):
        routed = request_path_sync_to_async(f)
        # The request's thread, through the lean hop; never a lane.
        assert isinstance(routed, functools.partial)
        assert routed.func is run_as_stock
        assert await routed() == await sync_to_async(f)()
        # Any other form stays asgiref's.
        assert isinstance(
            request_path_sync_to_async(f, thread_sensitive=False), SyncToAsync
        )


async def test_an_async_function_is_refused_inside_a_set_as_on_stock() -> None:
    # An ``async def process_request`` on a MiddlewareMixin, say: stock's
    # sync_to_async refuses it at once; inside a set the request path's hop
    # must too, not run it and hand back an unawaited coroutine.
    async def process_request(request: HttpRequest) -> None:
        return None

    class AsyncCallable:
        async def __call__(self) -> None:
            return None

    for func in (process_request, AsyncCallable()):
        with pytest.raises(TypeError) as stock:
            sync_to_async(func)
        async with connection_set(parallelism=4):
            with pytest.raises(TypeError) as in_set:
                request_path_sync_to_async(func)
        assert str(in_set.value) == str(stock.value)


@pytest.mark.usefixtures("authors")
@pytest.mark.parametrize("path", ["/async/", "/sync/", "/parallel/"])
async def test_middleware_views_and_signals_see_what_they_see_on_stock(
    apps: dict[str, Any], signal_threads: dict[str, list[int]], path: str
) -> None:
    before = checked_out()
    seen = {}
    for name in ("stock", "asgi_dbset"):
        signal_threads["started"].clear()
        signal_threads["finished"].clear()
        response = await request(apps[name], path)
        assert response.status == 200, response.body
        data = response.json()
        headers = dict(response.headers)
        request_thread = data.pop("thread")
        # The middleware, the view's sync code, the signal receivers and the
        # response's process_response all ran on the request's thread.
        assert signal_threads == {
            "started": [request_thread],
            "finished": [request_thread],
        }
        assert headers[b"x-response-thread"] == str(request_thread).encode()
        seen[name] = (data, headers[b"x-authors"])
    assert seen["asgi_dbset"] == seen["stock"]
    expected_gather = {"gathered": [2, 1, 1]} if path == "/parallel/" else {}
    assert seen["stock"] == (
        {
            **expected_gather,
            "authors": 2,
            "middleware_on_request_thread": True,
            "var": "set in process_request",
            "tz": "Asia/Tokyo",
        },
        b"2",
    )
    # request_finished returned the request thread's connection, as on stock.
    assert checked_out() == before


@pytest.mark.usefixtures("authors")
async def test_an_exception_in_process_request_is_stocks_500(
    apps: dict[str, Any],
) -> None:
    before = checked_out()
    statuses = {}
    for name in ("stock", "asgi_dbset"):
        response = await request(apps[name], "/async/", "fail=request")
        statuses[name] = response.status
    assert statuses == {"stock": 500, "asgi_dbset": 500}
    assert checked_out() == before
    assert not connection.in_atomic_block


@pytest.mark.usefixtures("authors")
async def test_the_request_thread_is_made_and_ended_as_asgiref_does(
    apps: dict[str, Any], signal_threads: dict[str, list[int]]
) -> None:
    # The request's first hop (request_started) makes the request's thread;
    # asgiref's context exit takes it out of its map and shuts it down.
    executors = SyncToAsync.context_to_thread_executor
    before = len(executors)
    threads = set()
    for _ in range(3):
        response = await request(apps["asgi_dbset"], "/async/")
        assert response.status == 200
        threads.add(response.json()["thread"])
        assert len(executors) == before
    assert signal_threads["started"] == signal_threads["finished"]
    assert set(signal_threads["started"]) == threads
