"""One view per workload; the same code for every variant.

Each view gathers its queries with ``asyncio.gather``. Stock Django runs them
one after another on the request's connection; behind ``DBSetMiddleware`` with
``@db_parallelism(p)`` (see urls.py) up to p of them run at once; with
django-async-backend each call runs in its own ``async_new_connection``.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable
from typing import Any

from django.conf import settings
from django.db.models import Avg, BooleanField, Count, Sum
from django.db.models.expressions import RawSQL
from django.http import HttpRequest, JsonResponse

from bench.config import ROWS, SLEEP, pk_for, qty_for
from bench.djsite.models import Item

DAB = settings.VARIANT == "dab"

if DAB:
    from django_async_backend.db import async_new_connection


def _objects() -> Any:
    return Item.async_objects if DAB else Item.objects  # type: ignore[attr-defined]


def _call(coro: Awaitable[Any]) -> Awaitable[Any]:
    return async_new_connection(coro) if DAB else coro


def _k(request: HttpRequest) -> int:
    return max(1, min(int(request.GET.get("k", "1")), 16))


def _reply(request: HttpRequest, data: dict[str, Any]) -> JsonResponse:
    if request.GET.get("check") and settings.VARIANT == "dbset":
        from asgi_dbset import active_set

        dbset = active_set()
        data["parallelism"] = dbset.parallelism if dbset else 0
        data["lanes_used"] = dbset.lanes_used if dbset else 0
    return JsonResponse(data)


# The querysets, apart from their terminal call, so that bench.sqlcheck can
# compile exactly these.
def sleep_queryset() -> Any:
    return _objects().annotate(
        slept=RawSQL("bench_sleep(%s)", (SLEEP,), output_field=BooleanField())
    )


AGGREGATES = {"total": Sum("price"), "mean": Avg("qty"), "n": Count("id")}


def aggregate_queryset(i: int) -> Any:
    return _objects().filter(qty__gte=qty_for(i))


def sleep_lookup(pk: int) -> Awaitable[Any]:
    return sleep_queryset().aget(pk=pk)  # type: ignore[no-any-return]


def aggregate(i: int) -> Awaitable[Any]:
    return aggregate_queryset(i).aaggregate(**AGGREGATES)  # type: ignore[no-any-return]


async def w1(request: HttpRequest) -> JsonResponse:
    """k lookups, each spending SLEEP seconds on the server (W1, W4).

    On the dbset variant, ``?feature=snapshot`` gathers them inside
    ``db_parallelism(p, snapshot=True)`` (one snapshot for every lane) and
    ``?feature=atomic`` inside ``asgi_dbset.atomic()`` (one transaction, on
    one lane): what each feature costs a request (bench.diagnose features).
    """
    base = random.randrange(ROWS)
    lookups = [_call(sleep_lookup(pk_for(base, i))) for i in range(_k(request))]
    feature = request.GET.get("feature") if settings.VARIANT == "dbset" else None
    if feature:
        import asgi_dbset

        dbset = asgi_dbset.active_set()
        p = dbset.parallelism if dbset else 1
        block = (
            asgi_dbset.db_parallelism(p, snapshot=True)
            if feature == "snapshot"
            else asgi_dbset.atomic()
        )
        async with block:
            items = await asyncio.gather(*lookups)
    else:
        items = await asyncio.gather(*lookups)
    return _reply(request, {"ids": [item.pk for item in items]})


def _sync_lookup(pk: int) -> Any:
    """W1's lookup as sync ORM code (a service function, say)."""
    return sleep_queryset().get(pk=pk)


async def w1sync(request: HttpRequest) -> JsonResponse:
    """W1 written as k sync functions of one lookup each, gathered: through
    ``sync_to_lane`` on the dbset variant, asgiref's ``sync_to_async`` on
    stock Django (what code does today)."""
    if settings.VARIANT == "dbset":
        from asgi_dbset import sync_to_lane as wrap
    else:
        from asgiref.sync import sync_to_async as wrap
    base = random.randrange(ROWS)
    items = await asyncio.gather(
        *(wrap(_sync_lookup)(pk_for(base, i)) for i in range(_k(request)))
    )
    return _reply(request, {"ids": [item.pk for item in items]})


async def w2(request: HttpRequest) -> JsonResponse:
    """k aggregates, each scanning the whole table (W2)."""
    results = await asyncio.gather(*(_call(aggregate(i)) for i in range(_k(request))))
    return _reply(request, {"n": [r["n"] for r in results]})


async def w3(request: HttpRequest) -> JsonResponse:
    """One primary-key lookup (W3)."""
    item = await _call(_objects().aget(pk=pk_for(random.randrange(ROWS), 0)))
    return _reply(request, {"id": item.pk})


async def stats(request: HttpRequest) -> JsonResponse:
    """The library's counters and the pool's, for the results file."""
    data: dict[str, Any] = {"variant": settings.VARIANT}
    if settings.VARIANT == "dbset":
        from asgi_dbset import get_stats

        data["asgi_dbset"] = get_stats()
        if os.environ.get("BENCH_TRACE"):
            from bench.djsite.trace import snapshot

            data["trace"] = snapshot()
    if DAB:
        from django_async_backend.db import async_connections

        pool = async_connections["default"].pool
    else:
        from django.db import connections

        pool = connections["default"].pool
    data["pool"] = pool.get_stats() if pool is not None else {}
    return JsonResponse(data)


async def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})
