"""STATEMENT_TIMEOUT and db_parallelism(statement_timeout=...) bound each query."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from django.db import OperationalError, connections
from django.test import override_settings

from asgi_dbset import connection_set, db_parallelism
from asgi_dbset.checks import check_settings
from tests.helpers import sleeping, timed

pytestmark = pytest.mark.django_db(transaction=True)


def _pooled_timeouts() -> set[str]:
    """statement_timeout of every idle connection in the default pool."""
    pool = connections["default"].pool
    seen = set()
    conns = [pool.getconn(5) for _ in range(pool.get_stats()["pool_available"])]
    try:
        for conn in conns:
            seen.add(str(conn.execute("SHOW statement_timeout").fetchone()[0]))  # type: ignore[index]
    finally:
        for conn in conns:
            pool.putconn(conn)
    return seen


async def test_a_query_past_the_timeout_fails_and_the_lane_stays_usable() -> None:
    async with connection_set(parallelism=3, statement_timeout=0.2) as dbset:
        results, elapsed = await timed(
            asyncio.gather(
                sleeping(5).acount(),
                sleeping(5).acount(),
                sleeping(0.05).acount(),
                return_exceptions=True,
            )
        )
        assert elapsed < 1.5
        assert results[2] == 0
        for error in results[:2]:
            assert isinstance(error, OperationalError)
            assert isinstance(error.__cause__, psycopg.errors.QueryCanceled)
            assert "statement timeout" in str(error)
        # The same lanes keep serving queries under the limit.
        assert (
            await asyncio.gather(*(sleeping(0.05).acount() for _ in range(3)))
            == [0] * 3
        )
        assert dbset.lanes_used == 3
    # No connection goes back to the pool with the set's timeout on it.
    await asyncio.to_thread(connections.close_all)
    assert await asyncio.to_thread(_pooled_timeouts) <= {"0"}


async def test_the_setting_applies_even_at_parallelism_one() -> None:
    with override_settings(ASGI_DBSET={"STATEMENT_TIMEOUT": 0.2}):
        async with connection_set() as dbset:
            assert dbset.parallelism == 1
            with pytest.raises(OperationalError, match="statement timeout"):
                await sleeping(5).acount()
            assert await sleeping(0.01).acount() == 0


async def test_the_decorator_argument() -> None:
    @db_parallelism(2, statement_timeout=0.2)
    async def view() -> list[object]:
        return await asyncio.gather(
            sleeping(5).acount(), sleeping(0.01).acount(), return_exceptions=True
        )

    slow, fast = await view()
    assert isinstance(slow, OperationalError)
    assert fast == 0


@pytest.mark.parametrize("bad", [0, -1, "5", True])
def test_bad_values_are_refused(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        db_parallelism(2, statement_timeout=bad)  # type: ignore[arg-type]
    with override_settings(ASGI_DBSET={"STATEMENT_TIMEOUT": bad}):
        assert [m.id for m in check_settings()] == ["asgi_dbset.E011"]
