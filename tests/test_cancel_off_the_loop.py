"""Cancelling queries never blocks the event loop, and each job is cancelled once.

A server-side cancel is a network round trip (``cancel_safe``): to the server
and back, up to its timeout when the server is unreachable. It is sent from a
thread; the event loop, which serves every request of the process, must never
wait for it. Here the database sits behind a proxy that delays each direction
by 0.15 s, so one cancel takes about 0.3 s, and a set closes on an error while
the cancels of its abandoned calls are in flight.
"""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

from asgi_dbset import connection_set, get_stats
from bench.delayproxy import DelayProxy
from tests.helpers import active_sleeps, sleeping
from tests.one_database import run_with_one_database, suite_database

pytestmark = pytest.mark.django_db(transaction=True)

BEHIND_A_SLOW_LINK = """
import asyncio, time

import psycopg
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections

from asgi_dbset import connection_set
from tests.helpers import sleeping


database, direct = json.loads(sys.argv[1]), sys.argv[2]


def running_sleeps():
    with psycopg.connect(direct, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE '%%pg_sleep%%' AND pid <> pg_backend_pid() "
            "AND datname = %s",
            [database["NAME"]],
        ).fetchone()[0]


class Failed(Exception):
    pass


async def main():
    lags = []
    ticking = True

    async def ticker():
        last = time.perf_counter()
        while ticking:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            lags.append(now - last - 0.005)
            last = now

    async with ThreadSensitiveContext():
        try:
            async with connection_set(parallelism=3, lease_timeout=10.0):
                tick = asyncio.ensure_future(ticker())
                work = asyncio.ensure_future(
                    asyncio.gather(*(sleeping(30).acount() for _ in range(3)))
                )
                for _ in range(300):
                    await asyncio.sleep(0.05)
                    if await asyncio.to_thread(running_sleeps) == 3:
                        break
                work.cancel()  # the caller gives up: cancels go out...
                try:
                    await work
                except asyncio.CancelledError:
                    pass
                await asyncio.sleep(0.02)  # ...and are on their way now
                lags.clear()
                raise Failed  # the set closes on an error meanwhile
        except Failed:
            pass
        for _ in range(100):
            if await asyncio.to_thread(running_sleeps) == 0:
                break
            await asyncio.sleep(0.05)
        ticking = False
        await tick
        left = await asyncio.to_thread(running_sleeps)
        await sync_to_async(connections.close_all)()
    print(json.dumps({"max_lag": max(lags), "left": left}))


asyncio.run(main())
"""


def test_the_loop_never_waits_for_a_cancel_in_flight() -> None:
    settings_dict = connections["default"].settings_dict
    host = settings_dict["HOST"] or "127.0.0.1"
    if host.startswith("/"):
        host = "127.0.0.1"  # the proxy needs TCP; the suite's server listens there too
    port = int(settings_dict["PORT"] or 5432)
    with DelayProxy((host, port), delay=0.15) as proxy:
        database = suite_database(min_size=1, max_size=8, timeout=30)
        database.update(HOST="127.0.0.1", PORT=str(proxy.port))
        direct = f"host={host} port={port} user={settings_dict['USER']} dbname=postgres"
        figures = run_with_one_database(
            BEHIND_A_SLOW_LINK, database, direct, timeout=180
        )
    assert figures["left"] == 0
    # One cancel takes about 0.3 s here; the loop kept ticking meanwhile.
    print(figures)
    assert figures["max_lag"] < 0.1, figures


async def _abandon_four_then_fail() -> None:
    async with connection_set(parallelism=4, lease_timeout=5.0):
        work = asyncio.gather(*(sleeping(30).acount() for _ in range(4)))
        for _ in range(500):
            if await asyncio.to_thread(active_sleeps) == 4:
                break
            await asyncio.sleep(0.02)
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await work
        raise ZeroDivisionError  # the set closes on an error right after


async def test_a_set_closing_on_an_error_cancels_each_abandoned_query_once() -> None:
    before = get_stats()["cancels"]
    async with ThreadSensitiveContext():
        with pytest.raises(ZeroDivisionError):
            await _abandon_four_then_fail()
        await sync_to_async(connections.close_all)()
    assert await asyncio.to_thread(active_sleeps) == 0
    # Abandoned first, then stopped by the closing set: one cancel loop each,
    # and on loopback its first cancel lands.
    assert get_stats()["cancels"] - before == 4
