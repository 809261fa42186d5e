"""A Starlette app that uses the Django ORM, for the middleware tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from asgi_dbset import active_set, db_parallelism
from tests.helpers import sleeping
from tests.testapp.models import Author, Book, Tag
from tests.views import dashboard_data

# How many lanes the request's set had run calls on when a body or a
# background task ended, by the prefix of the rows it wrote.
LANES_SEEN: dict[str, int] = {}
# What a background task read, by the same prefix.
COUNTS_SEEN: dict[str, list[int]] = {}


def _sleep(request: Request) -> float:
    return float(request.query_params.get("sleep", "0"))


def _parallel(request: Request) -> contextlib.AbstractAsyncContextManager[Any]:
    """db_parallelism(3), or nothing with ?plain=1 (the stock way)."""
    if request.query_params.get("plain") == "1":
        return contextlib.nullcontext()
    return db_parallelism(3)


async def dashboard(request: Request) -> JSONResponse:
    async with db_parallelism(3):
        return JSONResponse(await dashboard_data(_sleep(request)))


async def plain(request: Request) -> JSONResponse:
    return JSONResponse(await dashboard_data(_sleep(request)))


async def _counts(prefix: str, sleep: float) -> list[int]:
    """The rows written under *prefix*, and two other counts, gathered."""
    return list(
        await asyncio.gather(
            sleeping(sleep).filter(name__startswith=prefix).acount(),
            sleeping(sleep, Book).acount(),
            sleeping(sleep, Tag).acount(),
        )
    )


def _seen(prefix: str) -> None:
    dbset = active_set()
    LANES_SEEN[prefix] = dbset.lanes_used if dbset else 0


async def _chunks(request: Request, prefix: str) -> AsyncIterator[str]:
    """Gathered reads and a write per chunk, in a block across the yields."""
    async with _parallel(request):
        for i in range(2):
            await Author.objects.acreate(name=f"{prefix}{i}")
            yield json.dumps(await _counts(prefix, _sleep(request))) + "\n"
        _seen(prefix)


async def stream(request: Request) -> StreamingResponse:
    return StreamingResponse(_chunks(request, request.query_params["prefix"]))


async def _after_the_response(request: Request, prefix: str) -> None:
    async with _parallel(request):
        await asyncio.gather(
            *(Author.objects.acreate(name=f"{prefix}{i}") for i in range(3))
        )
        COUNTS_SEEN[prefix] = await _counts(prefix, _sleep(request))
        _seen(prefix)


async def background(request: Request) -> JSONResponse:
    tasks = BackgroundTasks()
    tasks.add_task(_after_the_response, request, request.query_params["prefix"])
    return JSONResponse({"sent": True}, background=tasks)


# Tasks a view started and did not await (they outlive their request); they
# go on when the test sets the app's ``state.go_on`` event.
LEFT_RUNNING: list[asyncio.Task[None]] = []


async def _later(prefix: str, go_on: asyncio.Event) -> None:
    await go_on.wait()
    await Author.objects.acreate(name=f"{prefix}later")


async def fire_and_forget(request: Request) -> JSONResponse:
    """Starts a task that writes once the response is long gone."""
    LEFT_RUNNING.append(
        asyncio.create_task(
            _later(request.query_params["prefix"], request.app.state.go_on)
        )
    )
    return JSONResponse({"started": True})


class GatherFailedError(Exception):
    """Raised by one coroutine of a gather while its sibling runs."""


# The siblings of the coroutine that raised, which asyncio.gather leaves
# running: the test awaits them.
SIBLINGS: list[asyncio.Task[Any]] = []


async def _read_then_write(prefix: str, sleep: float) -> None:
    task = asyncio.current_task()
    assert task is not None
    SIBLINGS.append(task)
    await sleeping(sleep).acount()
    await Author.objects.acreate(name=f"{prefix}sibling")


async def _fails_meanwhile() -> None:
    await asyncio.sleep(0.05)
    raise GatherFailedError


async def gather_failing(request: Request) -> JSONResponse:
    """A plain gather whose second coroutine raises while the first reads,
    then would write: Starlette answers 500 and raises to the server."""
    async with _parallel(request):
        await asyncio.gather(
            _read_then_write(request.query_params["prefix"], _sleep(request)),
            _fails_meanwhile(),
        )
    return JSONResponse({})


starlette_app = Starlette(
    routes=[
        Route("/dashboard", dashboard),
        Route("/plain", plain),
        Route("/stream", stream),
        Route("/background", background),
        Route("/fire-and-forget", fire_and_forget),
        Route("/gather-failing", gather_failing),
    ]
)
