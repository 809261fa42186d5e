"""The ceiling: the views' SQL through psycopg's AsyncConnectionPool, no ORM.

``uvicorn bench.ceiling:app``. Each query takes its own pooled connection, so
a request's queries run at once; rows come back as tuples, no models are
built. Same URLs, pool size and response shape as the Django site.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.config import (
    AGGREGATE_SQL,
    LOOKUP_SQL,
    POOL,
    ROWS,
    SLEEP,
    SLEEP_SQL,
    db_dsn,
    pk_for,
    qty_for,
)

pool = AsyncConnectionPool(
    db_dsn(os.environ.get("BENCH_APP_NAME", "bench_ceiling")),
    # Django's connections run in autocommit too: no COMMIT round trip.
    kwargs={"autocommit": True},
    open=False,
    **POOL,
)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await pool.open()
    try:
        yield
    finally:
        await pool.close()


async def fetch(sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchall()


def _k(request: Request) -> int:
    return max(1, min(int(request.query_params.get("k", "1")), 16))


async def w1(request: Request) -> JSONResponse:
    base = random.randrange(ROWS)
    rows = await asyncio.gather(
        *(fetch(SLEEP_SQL, (SLEEP, pk_for(base, i))) for i in range(_k(request)))
    )
    return JSONResponse({"ids": [r[0][0] for r in rows]})


async def w2(request: Request) -> JSONResponse:
    rows = await asyncio.gather(
        *(fetch(AGGREGATE_SQL, (qty_for(i),)) for i in range(_k(request)))
    )
    return JSONResponse({"n": [r[0][2] for r in rows]})


async def w3(request: Request) -> JSONResponse:
    rows = await fetch(LOOKUP_SQL, (pk_for(random.randrange(ROWS), 0),))
    return JSONResponse({"id": rows[0][0]})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"variant": "ceiling", "pool": pool.get_stats()})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/health/", health),
        Route("/stats/", stats),
        Route("/p1/w1/", w1),
        Route("/p1/w2/", w2),
        Route("/p1/w3/", w3),
    ],
    lifespan=lifespan,
)
