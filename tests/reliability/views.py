"""Views (and URLs) of the server process the reliability tests start.

Most queries are raw ``SELECT pg_backend_pid() ... FROM pg_sleep(s)``: they
need no table (so a throwaway PostgreSQL serves them without migrations), they
spend a known time on the server, and each answer names the backend that ran
it. With ``REL_STOCK=1`` the decorators are left out and the views run as
stock Django: the same load, without the library.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from django.db import DatabaseError
from django.db.models import F
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from tests.reliability.server_settings import STOCK
from tests.testapp.models import Author, Tally

if STOCK:

    def parallel(n: int, **_: Any) -> Callable[[Any], Any]:
        return lambda view: view

else:
    from asgi_dbset import active_set, db_parallelism

    parallel = db_parallelism


def _lanes_used() -> int:
    if STOCK:
        return 1
    dbset = active_set()
    return dbset.lanes_used if dbset else 0


async def backend_pid(seconds: float) -> int:
    """One query that sleeps ``seconds`` on the server; returns its backend's pid."""
    rows = Author.objects.raw(
        "SELECT pg_backend_pid() AS id, '' AS name FROM pg_sleep(%s)", [seconds]
    )
    return next(iter([row.id async for row in rows]))


def _sleep(request: HttpRequest, default: float = 0.0) -> float:
    return float(request.GET.get("sleep", default))


@parallel(3)
async def gathered(request: HttpRequest) -> JsonResponse:
    """``n`` independent queries, gathered: parallel with the library."""
    n = int(request.GET.get("n", "3"))
    seconds = _sleep(request)
    pids = await asyncio.gather(*(backend_pid(seconds) for _ in range(n)))
    return JsonResponse({"n": len(pids), "pids": pids, "lanes_used": _lanes_used()})


async def plain(request: HttpRequest) -> JsonResponse:
    """One query; never parallel."""
    return JsonResponse({"n": 1, "pids": [await backend_pid(_sleep(request))]})


@parallel(3)
async def timeout(request: HttpRequest) -> JsonResponse:
    """``asyncio.timeout`` around a gather that outlives it."""
    after = float(request.GET.get("after", "0.1"))
    try:
        async with asyncio.timeout(after):
            await asyncio.gather(*(backend_pid(_sleep(request, 30)) for _ in range(3)))
    except TimeoutError:
        return JsonResponse({"timed_out": True}, status=504)
    return JsonResponse({"timed_out": False})


async def _boom(after: float) -> None:
    await asyncio.sleep(after)
    raise RuntimeError("a sibling failed while queries ran")


@parallel(3)
async def taskgroup(request: HttpRequest) -> HttpResponse:
    """A TaskGroup member fails while two queries run: the group cancels them."""
    async with asyncio.TaskGroup() as group:
        group.create_task(backend_pid(_sleep(request, 30)))
        group.create_task(backend_pid(_sleep(request, 30)))
        group.create_task(_boom(0.05))
    return HttpResponse("unreachable")


@parallel(3)
async def raising(request: HttpRequest) -> HttpResponse:
    """The view raises while its gathered siblings still run."""
    await asyncio.gather(
        backend_pid(_sleep(request, 30)), backend_pid(_sleep(request, 30)), _boom(0.05)
    )
    return HttpResponse("unreachable")


@parallel(3, statement_timeout=0.2)
async def bounded(request: HttpRequest) -> JsonResponse:
    """Three queries under a 0.2 s statement timeout; reports each outcome."""
    sleeps = [float(s) for s in request.GET.get("sleeps", "0.01,0.01,0.01").split(",")]
    results = await asyncio.gather(
        *(backend_pid(s) for s in sleeps), return_exceptions=True
    )
    outcomes: list[str] = []
    for result in results:
        if isinstance(result, DatabaseError):
            outcomes.append(f"error: {(str(result).splitlines() or [''])[0]}")
        elif isinstance(result, BaseException):
            raise result
        else:
            outcomes.append("ok")
    return JsonResponse({"outcomes": outcomes})


async def statement_timeout_now(request: HttpRequest) -> JsonResponse:
    """The statement_timeout of the connection a plain request gets."""
    rows = Author.objects.raw(
        "SELECT pg_backend_pid() AS id, current_setting('statement_timeout') AS name"
    )
    row = next(iter([row async for row in rows]))
    return JsonResponse({"pid": row.id, "statement_timeout": row.name})


async def _save(key: str) -> int:
    tally = await Tally.objects.aget(name=f"upd-{key}")
    tally.value = 5
    await tally.asave(update_fields=["value"])
    return 1


async def _model_delete(key: str) -> int:
    tally = await Tally.objects.aget(name=f"mdel-{key}")
    deleted, _ = await tally.adelete()
    return deleted


@parallel(4)
async def writes(request: HttpRequest) -> JsonResponse:
    """Five gathered writes for one key; the test checks the sums in the database.

    Expects rows ``upd-<key>``, ``del-<key>``, ``mdel-<key>`` and ``counter``.
    """
    key = request.GET["key"]
    created, bumped, saved, deleted, model_deleted = await asyncio.gather(
        Tally.objects.acreate(name=f"new-{key}", value=1),
        Tally.objects.filter(name="counter").aupdate(value=F("value") + 1),
        _save(key),
        Tally.objects.filter(name=f"del-{key}").adelete(),
        _model_delete(key),
    )
    return JsonResponse(
        {
            "created": created.pk is not None,
            "bumped": bumped,
            "saved": saved,
            "deleted": deleted[0],
            "model_deleted": model_deleted,
            "lanes_used": _lanes_used(),
        }
    )


async def body(request: HttpRequest) -> JsonResponse:
    """Reports the size of the request body (Django reads it all first)."""
    return JsonResponse({"size": len(request.body)})


urlpatterns = [
    path("gathered/", gathered),
    path("plain/", plain),
    path("timeout/", timeout),
    path("taskgroup/", taskgroup),
    path("raising/", raising),
    path("bounded/", bounded),
    path("statement-timeout/", statement_timeout_now),
    path("writes/", writes),
    path("body/", body),
]
