"""Views the tests serve through Django's handler, the test clients and Starlette."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from asgiref.sync import markcoroutinefunction
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils.decorators import method_decorator
from django.views import View

import asgi_dbset
from asgi_dbset import active_set, db_parallelism
from asgi_dbset.budget import budget
from tests.helpers import sleeping
from tests.testapp.models import Author, Book, Review, Tag


async def dashboard_data(sleep: float = 0.0) -> dict[str, Any]:
    """Three independent queries, gathered; shared by the Django and Starlette views."""
    authors, books, tags = await asyncio.gather(
        sleeping(sleep).acount() if sleep else Author.objects.acount(),
        sleeping(sleep, Book).acount() if sleep else Book.objects.acount(),
        sleeping(sleep, Tag).acount() if sleep else Tag.objects.acount(),
    )
    dbset = active_set()
    return {
        "authors": authors,
        "books": books,
        "tags": tags,
        "lanes_used": dbset.lanes_used if dbset else 0,
        "parallelism": dbset.parallelism if dbset else 0,
    }


def _sleep(request: HttpRequest) -> float:
    return float(request.GET.get("sleep", "0"))


@db_parallelism(3)
async def dashboard(request: HttpRequest) -> JsonResponse:
    return JsonResponse(await dashboard_data(_sleep(request)))


async def plain(request: HttpRequest) -> JsonResponse:
    return JsonResponse(await dashboard_data(_sleep(request)))


class DashboardView(View):
    @method_decorator(db_parallelism(3))
    async def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse(await dashboard_data(_sleep(request)))


class PlainView(View):
    async def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse(await dashboard_data(_sleep(request)))


@method_decorator(db_parallelism(3), name="dispatch")
class DispatchView(View):
    """Django's idiom for decorating every handler: the sync ``dispatch`` of an
    async view returns the handler's coroutine."""

    async def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse(await dashboard_data(_sleep(request)))


async def _stream_rows(chunks: int) -> AsyncIterator[str]:
    for i in range(chunks):
        data = await dashboard_data(0.02)
        dbset = active_set()
        # What the set holds while the body is still being sent.
        yield f"{i} lanes={len(dbset.lanes) if dbset else 0} budget={budget.total} {data['authors']}\n"


@db_parallelism(3)
async def stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(_stream_rows(int(request.GET.get("chunks", "3"))))


async def fail(request: HttpRequest) -> HttpResponse:
    async def boom() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("view failed while its siblings ran")

    async with db_parallelism(3):
        await asyncio.gather(
            sleeping(0.2).acount(), sleeping(0.2, Book).acount(), boom()
        )
    return HttpResponse("unreachable")


async def _names(queryset: Any) -> list[str]:
    return sorted([author.name async for author in queryset])


@db_parallelism(4)
async def replica_reads(request: HttpRequest) -> JsonResponse:
    """Reads the router sends to the replica, reads pinned to the primary with
    ``.using()``, and a write, gathered (tests/test_replicas.py)."""
    replica, primary, count, review = await asyncio.gather(
        _names(Author.objects.all()),
        _names(Author.objects.using("default")),
        Author.objects.acount(),
        Review.objects.acreate(stars=4),
    )
    return JsonResponse(
        {"replica": replica, "primary": primary, "count": count, "review": review.pk}
    )


async def _gathered_counts(sleep: float) -> list[int]:
    """Four independent counts, gathered: up to four lanes at once."""
    return list(
        await asyncio.gather(
            sleeping(sleep).acount(),
            sleeping(sleep, Book).acount(),
            sleeping(sleep, Tag).acount(),
            sleeping(sleep, Review).acount(),
        )
    )


async def _stream_gathered(chunks: int, sleep: float) -> AsyncIterator[str]:
    for _ in range(chunks):
        dbset = active_set()
        before = len(dbset.records) if dbset else 0
        counts = await _gathered_counts(sleep)
        # The parallelism the body's calls ran at, and the lanes they used.
        parallelism = dbset.parallelism if dbset else 0
        lanes = len({r.lane for r in dbset.records[before:]}) if dbset else 0
        line = {"counts": counts, "parallelism": parallelism, "lanes": lanes}
        yield json.dumps(line) + "\n"


@db_parallelism(4)
async def stream_wide(request: HttpRequest) -> StreamingHttpResponse:
    """A body of gathered ORM calls, under the decorator's parallelism."""
    return StreamingHttpResponse(
        _stream_gathered(int(request.GET.get("chunks", "2")), _sleep(request))
    )


class NarrowBlockMiddleware:
    """An async middleware that runs the rest of the chain in a block of
    parallelism 2 (Django calls it with the request, before the view)."""

    sync_capable = False
    async_capable = True

    def __init__(
        self, get_response: Callable[[HttpRequest], Awaitable[HttpResponse]]
    ) -> None:
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        async with db_parallelism(2):
            return await self.get_response(request)


def _prefix(request: HttpRequest) -> str:
    return request.GET.get("prefix", "s")


async def _written_then_slow(prefix: str, sleep: float) -> AsyncIterator[str]:
    """Writes a row and sends it, then gathers slow reads before the next."""
    await Author.objects.acreate(name=f"{prefix}0")
    yield "0\n"
    await _gathered_counts(sleep)
    await Author.objects.acreate(name=f"{prefix}1")
    yield "1\n"


@db_parallelism(4)
async def stream_slow(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(_written_then_slow(_prefix(request), _sleep(request)))


class StreamFailedError(Exception):
    pass


async def _written_then_failing(prefix: str) -> AsyncIterator[str]:
    async def boom() -> None:
        await asyncio.sleep(0.05)
        raise StreamFailedError("the body failed while its siblings ran")

    await Author.objects.acreate(name=f"{prefix}0")
    yield "0\n"
    await asyncio.gather(_gathered_counts(1.0), boom())
    await Author.objects.acreate(name=f"{prefix}1")
    yield "1\n"


@db_parallelism(4)
async def stream_failing(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(_written_then_failing(_prefix(request)))


async def _atomic_across_yields(
    prefix: str, sleep: float, fail: bool
) -> AsyncIterator[str]:
    """One asgi_dbset.atomic() block open across the body's yields; each line
    is what the block reads of its own writes."""
    mine = Author.objects.filter(name__startswith=prefix)
    async with asgi_dbset.atomic():
        await Author.objects.acreate(name=f"{prefix}0")
        yield f"{await mine.acount()}\n"
        await asyncio.gather(
            Author.objects.acreate(name=f"{prefix}1"),
            Author.objects.acreate(name=f"{prefix}2"),
        )
        if sleep:
            await sleeping(sleep).acount()
        yield f"{await mine.acount()}\n"
        if fail:
            raise StreamFailedError("the body failed inside its block")
        await Author.objects.acreate(name=f"{prefix}3")
    yield f"{await mine.acount()}\n"


@db_parallelism(4)
async def stream_atomic(request: HttpRequest) -> StreamingHttpResponse:
    await _gathered_counts(0.05)  # (extra lanes leased before the body)
    return StreamingHttpResponse(
        _atomic_across_yields(
            _prefix(request), _sleep(request), request.GET.get("fail") == "1"
        )
    )


def _sync_rows(prefix: str, fail: bool) -> Iterator[str]:
    """_atomic_across_yields as a sync iterator (Django consumes it in one
    sync_to_async call): the stock way to write it."""
    mine = Author.objects.filter(name__startswith=prefix)
    with transaction.atomic():
        Author.objects.create(name=f"{prefix}0")
        yield f"{mine.count()}\n"
        Author.objects.create(name=f"{prefix}1")
        Author.objects.create(name=f"{prefix}2")
        yield f"{mine.count()}\n"
        if fail:
            raise StreamFailedError("the body failed inside its block")
        Author.objects.create(name=f"{prefix}3")
    yield f"{mine.count()}\n"


@db_parallelism(4)
async def stream_sync(request: HttpRequest) -> StreamingHttpResponse:
    await _gathered_counts(0.05)  # (extra lanes leased before the body)
    return StreamingHttpResponse(
        _sync_rows(_prefix(request), request.GET.get("fail") == "1")
    )


# Tasks a view started and did not await, which go on after the response once
# the test sets TASKS_GO_ON (see tests/test_middleware.py).
LEFT_RUNNING: list[asyncio.Task[None]] = []
TASKS_GO_ON: list[asyncio.Event] = []


async def _write_then_roll_back(name: str, go_on: asyncio.Event) -> None:
    from asgiref.sync import sync_to_async
    from django.db import connections

    await go_on.wait()
    # Sync code the task runs itself (asgiref's sync_to_async), around an
    # async ORM call: on stock Django both run on one thread, the one asgiref
    # makes for the request's exited context, so the write is rolled back.
    await sync_to_async(transaction.set_autocommit)(False)
    try:
        await Author.objects.acreate(name=name)
    finally:
        await sync_to_async(transaction.rollback)()
        await sync_to_async(transaction.set_autocommit)(True)
        # (That thread's connection goes back: stock Django keeps it for good.)
        await sync_to_async(connections.close_all)()


async def transaction_after_the_response(request: HttpRequest) -> JsonResponse:
    task = _write_then_roll_back(request.GET["name"], TASKS_GO_ON[-1])
    LEFT_RUNNING.append(asyncio.create_task(task))
    return JsonResponse({"started": True})
