"""Read replicas: a router that sends reads to a replica alias, and ``.using()``.

The suite's "other" alias plays the replica: a database of its own whose rows
lag behind the primary's ("default"), as a replica's may, so every row a
query returns says which alias served it. Each alias has its own pool, and
the budget of extra lanes is counted per alias: a lane holds one alias's
connection, leased from that alias's pool.

The same requests run on stock Django and with a set, side by side: the same
rows from the same aliases, the writes on the primary only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.asgi import get_asgi_application
from django.db import connections
from django.test import override_settings

from asgi_dbset import DBSetMiddleware, connection_set
from asgi_dbset.budget import budget
from tests.asgi import request
from tests.helpers import checked_out, pool_stats, sleeping
from tests.testapp.models import Author, Review

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


class PrimaryReplicaRouter:
    """Django's documented primary/replica router: reads to the replica,
    writes to the primary."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "other"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"

    def allow_relation(self, *args: Any, **kwargs: Any) -> bool:
        return True


@pytest.fixture
def replica_lags(transactional_db: None) -> None:
    """The primary has a row ("new") that the replica has not received yet."""
    Author.objects.using("default").create(name="old")
    Author.objects.using("default").create(name="new")
    Author.objects.using("other").create(name="old")


@pytest.fixture
def routed() -> Any:
    with override_settings(DATABASE_ROUTERS=[PrimaryReplicaRouter()]):
        yield


async def _names(queryset: Any) -> list[str]:
    return sorted([author.name async for author in queryset])


async def reads_and_a_write() -> dict[str, Any]:
    replica, primary, count, primary_count, review = await asyncio.gather(
        _names(Author.objects.all()),
        _names(Author.objects.using("default")),
        Author.objects.acount(),
        Author.objects.using("default").acount(),
        Review.objects.acreate(stars=5),
    )
    return {
        "replica": replica,
        "primary": primary,
        "count": count,
        "primary_count": primary_count,
        "review_on_primary": await Review.objects.using("default")
        .filter(pk=review.pk)
        .aexists(),
        "review_on_replica": await Review.objects.using("other")
        .filter(pk=review.pk)
        .aexists(),
    }


async def one_request(parallelism: int | None) -> tuple[dict[str, Any], list[Any]]:
    """What a request computes, without a set (stock) or in one; and the
    set's call records."""
    records: list[Any] = []
    async with ThreadSensitiveContext():
        if parallelism is None:
            result = await reads_and_a_write()
        else:
            async with connection_set(parallelism=parallelism) as dbset:
                result = await reads_and_a_write()
                records = list(dbset.records)
        await sync_to_async(connections.close_all)()
    return result, records


@pytest.mark.usefixtures("replica_lags", "routed")
async def test_reads_follow_the_router_and_using_as_on_stock_django() -> None:
    stock, _ = await one_request(None)
    assert stock == {
        "replica": ["old"],
        "primary": ["new", "old"],
        "count": 1,
        "primary_count": 2,
        "review_on_primary": True,
        "review_on_replica": False,
    }
    parallel, records = await one_request(4)
    assert parallel == stock
    # The calls ran on several lanes, each on the alias Django chose for it.
    aliases: dict[str, set[str]] = {}
    for record in records:
        aliases.setdefault(record.name, set()).add(record.alias)
    assert len({record.lane for record in records}) > 1, records
    assert aliases["count"] == {"default", "other"}, aliases
    assert aliases["create"] == {"default"}, aliases


@pytest.mark.usefixtures("replica_lags", "routed")
async def test_each_alias_leases_from_its_own_pool_within_its_own_budget() -> None:
    """Six slow reads routed to the replica and two pinned to the primary,
    gathered at parallelism 8: the replica's extra lanes stop at its budget,
    and each alias's connections come from its own pool."""
    # (The fixture's own connections, on the test's thread, stay out meanwhile.)
    before = {alias: checked_out(alias) for alias in ("default", "other")}
    peak: dict[str, int] = {"held_other": 0, "held_default": 0, "out_other": 0}
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            peak["held_other"] = max(peak["held_other"], budget.held("other"))
            peak["held_default"] = max(peak["held_default"], budget.held("default"))
            lent = checked_out("other") - before["other"]
            peak["out_other"] = max(peak["out_other"], lent)
            await asyncio.sleep(0.01)

    async with ThreadSensitiveContext():
        async with connection_set(parallelism=8) as dbset:
            watcher = asyncio.create_task(watch())
            try:
                counts = await asyncio.gather(
                    *[sleeping(0.3).acount() for _ in range(6)],
                    *[sleeping(0.3).using("default").acount() for _ in range(2)],
                )
            finally:
                done.set()
                await watcher
            lanes = {lane.index: lane.alias for lane in dbset.lanes}
        await sync_to_async(connections.close_all)()
    # The replica has one author, the primary two.
    assert counts == [1] * 6 + [2] * 2
    limit = budget.limit("other")
    assert limit == pool_stats("other")["pool_max"] // 2
    assert peak["held_other"] == limit, (peak, lanes)
    assert peak["held_default"] >= 1, (peak, lanes)
    # The replica's pool lent the extra lanes (and lane 0's own connection
    # when lane 0 ran a replica read), nothing more.
    assert limit <= peak["out_other"] <= limit + 1, peak
    assert budget.total == 0
    assert {alias: checked_out(alias) for alias in before} == before


@pytest.mark.usefixtures("replica_lags", "routed")
async def test_three_hundred_requests_leave_nothing_out_of_either_pool() -> None:
    app = DBSetMiddleware(get_asgi_application())
    # (The fixture's own connections, on the test's thread, stay out meanwhile.)
    before = {alias: checked_out(alias) for alias in ("default", "other")}
    responses = []
    for _ in range(30):
        responses += await asyncio.gather(
            *[request(app, "/replica/") for _ in range(10)]
        )
    assert {response.status for response in responses} == {200}
    bodies = [response.json() for response in responses]
    assert {(tuple(b["replica"]), tuple(b["primary"]), b["count"]) for b in bodies} == {
        (("old",), ("new", "old"), 1)
    }
    for alias in ("default", "other"):
        stats = pool_stats(alias)
        assert stats.get("requests_waiting", 0) == 0, (alias, stats)
        assert checked_out(alias) == before[alias], (alias, stats)
    assert budget.total == 0
    # Every write reached the primary, none the replica.
    assert await Review.objects.using("default").acount() == 300
    assert await Review.objects.using("other").acount() == 0
