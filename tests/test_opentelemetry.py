"""asgi_dbset.opentelemetry, read with the OpenTelemetry SDK's in-memory reader."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import connections
from django.db.models import QuerySet
from opentelemetry.sdk.metrics import ExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from asgi_dbset import connection_set, get_pool_stats, get_stats
from asgi_dbset.budget import budget
from asgi_dbset.opentelemetry import _LIBRARY, instrument, instrumented, uninstrument
from tests.helpers import sleeping, take_every_pooled_connection

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

POOL_METRICS = {
    "db.client.connection.count": "{connection}",
    "db.client.connection.idle.max": "{connection}",
    "db.client.connection.idle.min": "{connection}",
    "db.client.connection.max": "{connection}",
    "db.client.connection.pending_requests": "{request}",
    "db.client.connection.timeouts": "{timeout}",
    "db.client.connection.wait_time": "s",
    "db.client.connection.use_time": "s",
}


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    found = InMemoryMetricReader()
    instrument(meter_provider=MeterProvider(metric_readers=[found]))
    try:
        yield found
    finally:
        uninstrument()


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """name -> the metric (unit, data points) of one collection."""
    data = reader.get_metrics_data()
    if data is None:  # (nothing observed at all)
        return {}
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == "asgi_dbset"
        for metric in scope.metrics
    }


def points(metric: Any) -> dict[tuple[tuple[str, Any], ...], Any]:
    """attributes -> the data point."""
    return {
        tuple(sorted(point.attributes.items())): point
        for point in metric.data.data_points
    }


async def test_the_pools_metrics_follow_the_semantic_conventions(
    reader: InMemoryMetricReader,
) -> None:
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3, lease_timeout=5.0):
            await asyncio.gather(*(sleeping(0.1).acount() for _ in range(3)))
        await sync_to_async(connections.close_all)()
    metrics = collect(reader)
    for name, unit in POOL_METRICS.items():
        assert metrics[name].unit == unit, name
        for attributes in points(metrics[name]):
            assert ("db.client.connection.pool.name", "default") in attributes or (
                "db.client.connection.pool.name",
                "other",
            ) in attributes
    pool = get_pool_stats()["default"]
    count = points(metrics["db.client.connection.count"])
    idle = count[
        (
            ("db.client.connection.pool.name", "default"),
            ("db.client.connection.state", "idle"),
        )
    ]
    used = count[
        (
            ("db.client.connection.pool.name", "default"),
            ("db.client.connection.state", "used"),
        )
    ]
    assert idle.value == pool["pool_available"]
    assert used.value == pool["pool_size"] - pool["pool_available"]
    default = (("db.client.connection.pool.name", "default"),)
    assert points(metrics["db.client.connection.max"])[default].value == 8
    assert points(metrics["db.client.connection.idle.min"])[default].value == 2
    # The three queries' connections: lane 0's, and the two extra lanes'.
    waits = points(metrics["db.client.connection.wait_time"])[default]
    uses = points(metrics["db.client.connection.use_time"])[default]
    assert waits.count >= 3
    assert uses.count >= 3
    assert uses.sum >= 2 * 0.1  # two extra lanes held for a 0.1 s query at least
    assert budget.total == 0


async def test_the_librarys_own_metrics(reader: InMemoryMetricReader) -> None:
    before = get_stats()
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=3, lease_timeout=5.0):
            await asyncio.gather(*(sleeping(0.2).acount() for _ in range(3)))
        await sync_to_async(connections.close_all)()
    after = get_stats()
    metrics = collect(reader)
    (leased,) = metrics["asgi_dbset.lanes.leased"].data.data_points
    assert leased.value == after["lanes_leased"]
    assert after["lanes_leased"] - before["lanes_leased"] == 2
    (calls,) = metrics["asgi_dbset.calls"].data.data_points
    assert calls.value == after["calls"]
    (open_lanes,) = metrics["asgi_dbset.lanes.open"].data.data_points
    assert open_lanes.value == 0
    (gain,) = metrics["asgi_dbset.request.gain"].data.data_points
    assert gain.count == 1
    assert gain.sum > 2  # three 0.2 s queries side by side
    (wait,) = metrics["asgi_dbset.request.wait_time"].data.data_points
    assert wait.count == 1
    assert metrics["asgi_dbset.request.wait_time"].unit == "s"
    for name in (
        "asgi_dbset.leases.refused",
        "asgi_dbset.calls.queued",
        "asgi_dbset.fallbacks",
        "asgi_dbset.cancels",
        "asgi_dbset.sets.open",
    ):
        assert name in metrics


async def test_refused_leases_count_as_pool_timeouts(
    reader: InMemoryMetricReader,
) -> None:
    pool, held = await take_every_pooled_connection()
    try:
        async with connection_set(parallelism=2, lease_timeout=0.05):
            await asyncio.gather(sleeping(0.2).acount(), sleeping(0).acount())
    finally:
        for conn in held:
            pool.putconn(conn)
    metrics = collect(reader)
    default = (("db.client.connection.pool.name", "default"),)
    timeouts = points(metrics["db.client.connection.timeouts"])[default]
    assert timeouts.value == get_pool_stats()["default"]["requests_errors"] >= 1
    (refused,) = metrics["asgi_dbset.leases.refused"].data.data_points
    assert refused.value == get_stats()["lease_failures"] >= 1
    await asyncio.sleep(0.05)  # the refusal's back-off


# The library's counters, exported as OpenTelemetry counters: monotonic.
COUNTERS = [
    name
    for name, key, _, _ in _LIBRARY
    if key not in ("lanes_open", "sets_open")  # (the two up-down counters)
]


async def _refused_lease_gather() -> list[int]:
    """Two gathered counts while the pool has no connection to lend: the
    second call's extra lane is refused and the call runs after the first on
    lane 0 (with the library), or on the shared thread (stock)."""
    pool, held = await take_every_pooled_connection()
    try:
        return list(await asyncio.gather(sleeping(0.4).acount(), sleeping(0).acount()))
    finally:
        for conn in held:
            pool.putconn(conn)


async def test_the_librarys_counters_never_go_down(
    reader: InMemoryMetricReader,
) -> None:
    """A call whose extra lane is refused queues again for lane 0: it must
    not be counted out meanwhile. A counter that goes down between two
    collections is a counter reset to Prometheus (rate() and increase() add
    its whole value again) and a negative delta to a delta exporter."""
    stock = await _refused_lease_gather()
    seen: dict[str, list[float]] = {name: [] for name in COUNTERS}

    async def sample() -> None:
        while True:
            metrics = collect(reader)
            for name in COUNTERS:
                (point,) = metrics[name].data.data_points
                seen[name].append(point.value)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        async with connection_set(parallelism=2, lease_timeout=0.1):
            library = await _refused_lease_gather()
    finally:
        sampler.cancel()
    await asyncio.sleep(0.05)  # the refusal's back-off
    assert library == stock == [0, 0]
    assert get_stats()["lease_failures"] >= 1  # (the pattern happened)
    for name, values in seen.items():
        drops = [(a, b) for a, b in itertools.pairwise(values) if b < a]
        assert not drops, f"{name} went down: {drops} in {values}"
    (calls,) = collect(reader)["asgi_dbset.calls"].data.data_points
    assert calls.value == get_stats()["calls"]


async def test_uninstrument_stops_the_metrics() -> None:
    found = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[found])
    instrument(meter_provider=provider)
    assert instrumented()
    uninstrument()
    assert not instrumented()
    async with connection_set(parallelism=2):
        await asyncio.gather(sleeping(0.05).acount(), sleeping(0.05).acount())
    metrics = collect(found)
    assert all(not m.data.data_points for m in metrics.values())
    # Instrumented again, the same provider gets its instruments back.
    instrument(meter_provider=provider)
    try:
        assert collect(found)["asgi_dbset.calls"].data.data_points
    finally:
        uninstrument()


class FailingFilter(ExemplarFilter):
    """An SDK extension that fails: the SDK lets its error out of record()."""

    def should_sample(self, *args: Any) -> bool:
        raise RuntimeError("the metrics pipeline failed")


async def test_a_failing_metrics_pipeline_never_fails_a_request_or_keeps_a_connection() -> (
    None
):
    provider = MeterProvider(
        metric_readers=[InMemoryMetricReader()], exemplar_filter=FailingFilter()
    )
    instrument(meter_provider=provider)
    try:
        async with ThreadSensitiveContext():
            async with connection_set(parallelism=3, lease_timeout=5.0) as dbset:
                counts = await asyncio.gather(
                    *(sleeping(0.05).acount() for _ in range(3))
                )
            await sync_to_async(connections.close_all)()
    finally:
        uninstrument()
    assert counts == [0, 0, 0]
    assert len({record.lane for record in dbset.records}) == 3
    # (The suite's leak check then finds every connection back in its pool.)
    assert budget.total == 0


class TracedQuerySet(QuerySet[Any]):
    """A queryset whose count() opens a span on the thread that runs it, as
    an instrumentation of the database driver does for each query."""

    def count(self) -> int:
        with TRACER.start_as_current_span("count"):
            THREADS.add(threading.get_ident())
            return super().count()


SPANS = InMemorySpanExporter()
_TRACER_PROVIDER = TracerProvider()
_TRACER_PROVIDER.add_span_processor(SimpleSpanProcessor(SPANS))
TRACER = _TRACER_PROVIDER.get_tracer("tests")
THREADS: set[int] = set()


async def _traced_counts(parallelism: int | None) -> tuple[list[int], Any, list[Any]]:
    """Three gathered counts inside a request's span: their results, the
    request's span and the counts' spans."""
    SPANS.clear()
    THREADS.clear()
    querysets = [sleeping(0.1), sleeping(0.1), sleeping(0.1)]
    for queryset in querysets:
        queryset.__class__ = TracedQuerySet
    async with ThreadSensitiveContext():
        with TRACER.start_as_current_span("request") as request_span:
            if parallelism is None:
                counts = await asyncio.gather(*(qs.acount() for qs in querysets))
            else:
                async with connection_set(parallelism=parallelism, lease_timeout=5.0):
                    counts = await asyncio.gather(*(qs.acount() for qs in querysets))
        await sync_to_async(connections.close_all)()
    return (
        list(counts),
        request_span,
        [span for span in SPANS.get_finished_spans() if span.name == "count"],
    )


async def test_spans_on_lanes_are_children_of_the_requests_span() -> None:
    """A call runs on a lane's thread in a copy of its caller's context: the
    span an instrumentation opens there has the request's span as parent, as
    on stock Django's one thread."""
    stock, stock_request, stock_spans = await _traced_counts(None)
    assert len(THREADS) == 1
    library, library_request, library_spans = await _traced_counts(3)
    assert len(THREADS) == 3  # (three lanes, three threads)
    assert library == stock == [0, 0, 0]
    for request_span, spans in (
        (stock_request, stock_spans),
        (library_request, library_spans),
    ):
        assert len(spans) == 3
        for span in spans:
            assert span.parent is not None
            assert span.parent.span_id == request_span.get_span_context().span_id
            assert span.context.trace_id == request_span.get_span_context().trace_id
