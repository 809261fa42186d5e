"""Figures, Server-Timing, request history, counters, fallbacks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from django.core.asgi import get_asgi_application
from django.test import override_settings

from asgi_dbset import (
    DBSetMiddleware,
    connection_set,
    db_parallelism,
    get_pool_stats,
    get_stats,
    recent_requests,
)
from asgi_dbset.stats import COUNTERS
from tests.asgi import request
from tests.helpers import sleeping

pytestmark = pytest.mark.django_db(transaction=True)


async def test_figures_show_the_parallel_gain() -> None:
    async with connection_set(parallelism=3) as dbset:
        await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
    figures = dbset.figures()
    assert figures["lanes_used"] == 3
    assert figures["calls"] == 3
    assert figures["calls_per_lane"] == {0: 1, 1: 1, 2: 1}
    assert figures["query_ms"] >= 3 * 200 * 0.95
    assert figures["wall_ms"] < figures["query_ms"]
    assert figures["gain"] > 2


@override_settings(ASGI_DBSET={"SERVER_TIMING": True, "HISTORY": 5})
async def test_server_timing_header_and_history() -> None:
    app = DBSetMiddleware(get_asgi_application())
    for _ in range(7):
        response = await request(app, "/dashboard/", "sleep=0.01")
        assert response.status == 200
    header = dict(response.headers)[b"server-timing"].decode()
    assert header.startswith("dbset;dur=")
    assert 'desc="lanes=3 calls=3"' in header
    recent = recent_requests()
    assert len(recent) == 5
    assert {summary.path for summary in recent} == {"/dashboard/"}
    assert all(summary.figures["lanes_used"] == 3 for summary in recent)
    assert all(len(summary.records) == 3 for summary in recent)


async def test_no_server_timing_by_default() -> None:
    response = await request(DBSetMiddleware(get_asgi_application()), "/plain/")
    assert b"server-timing" not in dict(response.headers)


async def test_a_task_outliving_its_set_falls_back_to_stock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def late() -> int:
        await release.wait()
        return await sleeping(0.01).acount()

    before = get_stats()["fallbacks"]
    async with connection_set(parallelism=2) as dbset:
        task = asyncio.ensure_future(late())
    with caplog.at_level(logging.WARNING, logger="asgi_dbset"):
        release.set()
        assert await task == 0
    assert dbset.records == []  # it never touched the set's (returned) lanes
    assert get_stats()["fallbacks"] == before + 1
    assert "ran as stock Django" in caplog.text


def test_get_stats_lists_every_counter() -> None:
    stats = get_stats()
    assert set(stats) == set(COUNTERS)
    assert all(isinstance(value, int) for value in stats.values())


@override_settings(ASGI_DBSET={"HISTORY": 3})
async def test_history_records_stock_calls_at_parallelism_one() -> None:
    response = await request(DBSetMiddleware(get_asgi_application()), "/plain/")
    assert response.status == 200
    summary = recent_requests()[-1]
    assert summary.figures["parallelism"] == 1
    assert summary.figures["calls"] == 3
    assert {record.lane for record in summary.records} == {0}
    assert {record.alias for record in summary.records} == {"default"}


async def test_figures_report_the_peak_parallelism_of_a_block() -> None:
    async with connection_set(parallelism=1) as dbset:
        async with db_parallelism(3):
            await asyncio.gather(*(sleeping(0.05).acount() for _ in range(3)))
        assert dbset.parallelism == 1
    assert dbset.figures()["parallelism"] == 3
    assert dbset.figures()["lanes_used"] == 3


async def test_pool_stats_are_readable_from_code() -> None:
    await sleeping(0).acount()
    pools = get_pool_stats()
    assert "default" in pools
    assert pools["default"]["pool_max"] == 8


class AppFailedError(Exception):
    pass


async def _failing_app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app (as Starlette's error middleware does) that answers 500 and
    re-raises its view's error, after one query."""
    await sleeping(0).acount()
    await send({"type": "http.response.start", "status": 500, "headers": []})
    await send({"type": "http.response.body", "body": b"failed"})
    raise AppFailedError


@override_settings(ASGI_DBSET={"HISTORY": 3})
async def test_history_keeps_a_request_whose_app_raised() -> None:
    path = "/failed/"
    with pytest.raises(AppFailedError):
        await request(DBSetMiddleware(_failing_app), path)
    summary = recent_requests()[-1]
    assert summary.path == path
    assert summary.figures["calls"] == 1
