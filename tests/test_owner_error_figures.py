"""A set closing on its owner's exception with calls still running on extra
lanes counts the program's ORM calls only: as many as stock Django runs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import psycopg
import pytest
from django.db import connections

from asgi_dbset import active_set, db_parallelism, get_stats
from tests.helpers import sleeping

pytestmark = pytest.mark.django_db(transaction=True)


class RefusedError(Exception):
    pass


async def _running_sleeps() -> int:
    """How many pg_sleep queries the server runs now (asked on a connection
    of this test's own, not through Django: its threads are busy)."""
    params = connections["default"].get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    async with await psycopg.AsyncConnection.connect(**params) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
            " AND datname = current_database()"
            " AND query LIKE '%%pg_sleep%%' AND pid <> pg_backend_pid()"
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def _refuses(running: int) -> None:
    # Once the reads run their queries: both (one on an extra lane) with a
    # set; on stock's one thread, the first.
    for _ in range(500):
        if await _running_sleeps() >= running:
            raise RefusedError
        await asyncio.sleep(0.01)
    raise AssertionError("the reads never ran")


async def _gathered(parallel: bool) -> dict[str, Any]:
    """Two reads gathered with a coroutine that raises while they run: what
    ran, and what the set (if any) counted."""
    reads: list[asyncio.Future[int]] = []
    sets: list[Any] = []
    before = get_stats()

    async def owner() -> None:
        async with db_parallelism(3) if parallel else contextlib.nullcontext():
            sets.append(active_set())
            reads.extend(
                asyncio.ensure_future(sleeping(0.5).acount()) for _ in range(2)
            )
            await asyncio.gather(*reads, _refuses(2 if parallel else 1))

    with pytest.raises(RefusedError):
        await owner()
    await asyncio.wait(reads, timeout=20)
    after = get_stats()
    dbset = sets[0]
    ran = len(reads)  # (the program's ORM calls: each ran once, as stock)
    return {
        "counts": [read.result() for read in reads],
        "calls": ran if dbset is None else dbset.calls,
        "recorded": ran if dbset is None else len(dbset.records),
        "counted": ran if dbset is None else after["calls"] - before["calls"],
    }


async def test_a_close_on_the_owners_exception_counts_the_programs_calls() -> None:
    stock = await _gathered(parallel=False)
    library = await _gathered(parallel=True)
    assert stock == {"counts": [0, 0], "calls": 2, "recorded": 2, "counted": 2}
    # (Before: the set's question to lane 0's thread - is it inside a
    # transaction? - was counted as a call of its own: 3, in the set's
    # figures, its records and the process-wide OpenTelemetry counter.)
    assert library == stock
