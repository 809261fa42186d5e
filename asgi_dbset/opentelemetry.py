"""OpenTelemetry metrics of the Django pools and of asgi_dbset itself.

::

    from asgi_dbset.opentelemetry import instrument

    instrument()  # on the global MeterProvider; or instrument(meter_provider=...)

Install with the ``otel`` extra (``opentelemetry-api`` only; the application
brings the SDK and its exporter). For each Django connection pool, the
metrics of OpenTelemetry's database client semantic conventions, each with
``db.client.connection.pool.name`` (the database alias):

==============================================  =============  ==============================
``db.client.connection.count``                  {connection}   by ``db.client.connection.state``: ``idle``, ``used``
``db.client.connection.idle.max``               {connection}   the pool's ``max_size``
``db.client.connection.idle.min``               {connection}   the pool's ``min_size``
``db.client.connection.max``                    {connection}   the pool's ``max_size``
``db.client.connection.pending_requests``       {request}      requests waiting for a connection now
``db.client.connection.timeouts``               {timeout}      requests that got no connection (counter)
``db.client.connection.wait_time``              s              time to obtain a connection (histogram)
``db.client.connection.use_time``               s              time a connection was out of the pool (histogram)
==============================================  =============  ==============================

and the library's own under ``asgi_dbset.*`` (see docs/opentelemetry.md).

Costs: the counts and gauges are read from ``psycopg_pool``'s and the
library's counters when the exporter collects, nothing is added to an ORM
call. The two histograms are recorded where a connection leaves and enters
its pool (once per request's connection, once per extra lane), and the
per-request histograms when a set that recorded calls closes.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from . import __version__, stats
from .lanes import POOL_PATCH_LOCK

logger = logging.getLogger("asgi_dbset")

__all__ = ["instrument", "instrumented", "uninstrument"]

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

# Seconds: waits and uses of connections run from microseconds to the pool's
# timeout (30 s by default).
_TIME_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
)
_GAIN_BUCKETS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


class _Instruments:
    """What :func:`instrument` made on one meter."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it.",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )
        self.request_wait = meter.create_histogram(
            "asgi_dbset.request.wait_time",
            unit="s",
            description="Time a request's ORM calls spent queued for a lane, in all.",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )
        self.request_gain = meter.create_histogram(
            "asgi_dbset.request.gain",
            unit="1",
            description="A request's query time added up over its set's wall time.",
            explicit_bucket_boundaries_advisory=_GAIN_BUCKETS,
        )
        gauge = meter.create_observable_up_down_counter
        counter = meter.create_observable_counter
        gauge(
            "db.client.connection.count",
            [_pool_counts],
            unit="{connection}",
            description="The number of connections in each state.",
        )
        for name, key, what in (
            (
                "db.client.connection.idle.max",
                "pool_max",
                "idle open connections allowed",
            ),
            ("db.client.connection.idle.min", "pool_min", "idle open connections kept"),
            ("db.client.connection.max", "pool_max", "open connections allowed"),
        ):
            gauge(
                name,
                [_pool_stat(key)],
                unit="{connection}",
                description=f"The pool's {what}.",
            )
        gauge(
            "db.client.connection.pending_requests",
            [_pool_stat("requests_waiting")],
            unit="{request}",
            description="Requests waiting for an open connection now.",
        )
        counter(
            "db.client.connection.timeouts",
            [_pool_stat("requests_errors")],
            unit="{timeout}",
            description="Requests that got no connection (timed out, or refused "
            "with the queue full); extra lanes refused count here too.",
        )
        for name, key, unit, description in _LIBRARY:
            make = gauge if key in ("lanes_open", "sets_open") else counter
            make(name, [_library_stat(key)], unit=unit, description=description)


# (name, stats counter, unit, description) of the library's own metrics.
_LIBRARY = (
    ("asgi_dbset.lanes.open", "lanes_open", "{lane}", "Extra lanes held now."),
    ("asgi_dbset.lanes.leased", "lanes_leased", "{lane}", "Extra lanes leased."),
    (
        "asgi_dbset.leases.refused",
        "lease_failures",
        "{lease}",
        "Extra lanes refused: the pool had none within LEASE_TIMEOUT.",
    ),
    ("asgi_dbset.sets.open", "sets_open", "{set}", "Connection sets open now."),
    ("asgi_dbset.sets.opened", "sets_opened", "{set}", "Connection sets opened."),
    ("asgi_dbset.calls", "calls", "{call}", "ORM calls run through a set."),
    ("asgi_dbset.calls.queued", "waits", "{call}", "Calls that queued for a lane."),
    (
        "asgi_dbset.calls.pinned",
        "pinned_calls",
        "{call}",
        "Calls that had to run on one lane (a cursor, a transaction, a watched connection).",
    ),
    (
        "asgi_dbset.calls.queued_on_lane0",
        "lane0_queued_calls",
        "{call}",
        "Calls queued on lane 0's thread: no other lane could be had.",
    ),
    (
        "asgi_dbset.calls.saturated",
        "saturated_calls",
        "{call}",
        "Calls run as stock Django: the requests in flight needed every pooled "
        "connection.",
    ),
    (
        "asgi_dbset.fallbacks",
        "fallbacks",
        "{call}",
        "Calls that ran as stock Django although a set was active.",
    ),
    (
        "asgi_dbset.cancels",
        "cancels",
        "{cancel}",
        "Server-side cancels sent for abandoned queries.",
    ),
)

_lock = threading.Lock()
# The instruments recording now (None when not instrumented), and those made
# on each meter provider before (observable instruments cannot be removed: a
# provider instrumented again gets its own back).
_active: _Instruments | None = None
_made: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_global_made: _Instruments | None = None


def instrument(meter_provider: metrics.MeterProvider | None = None) -> None:
    """Register the metrics on *meter_provider* (the global one by default).

    Idempotent; :func:`uninstrument` stops them. Pools that exist now are
    timed at once, pools Django creates later from the next collection on
    (``DBSetMiddleware`` opens every pool at startup when the server sends
    lifespan events, so with it, all are; daphne sends none).
    """
    global _active, _global_made
    with _lock:
        if meter_provider is None:
            if _global_made is None:
                _global_made = _Instruments(_meter(None))
            _active = _global_made
        else:
            made = _made.get(meter_provider)
            if made is None:
                made = _made[meter_provider] = _Instruments(_meter(meter_provider))
            _active = made
    stats.set_closed_observer(_record_set)
    time_pools()


def uninstrument() -> None:
    """Stop recording: observations and histograms are empty from now on."""
    global _active
    with _lock:
        _active = None
    stats.set_closed_observer(None)


def instrumented() -> bool:
    return _active is not None


def _meter(provider: metrics.MeterProvider | None) -> metrics.Meter:
    if provider is None:
        return metrics.get_meter("asgi_dbset", __version__)
    return provider.get_meter("asgi_dbset", __version__)


# -- the pools ------------------------------------------------------------------


def _pools() -> dict[str, Any]:
    from django.db.backends.postgresql.base import DatabaseWrapper

    # Django keeps one pool per alias in this class-level dict (5.1+).
    return dict(getattr(DatabaseWrapper, "_connection_pools", {}))


def _pool_counts(options: CallbackOptions) -> Iterable[Observation]:
    if _active is None:
        return
    time_pools()
    for alias, pool in _pools().items():
        got = pool.get_stats()  # (zero values may be missing)
        size, idle = got.get("pool_size", 0), got.get("pool_available", 0)
        yield Observation(idle, {POOL_NAME: alias, STATE: "idle"})
        yield Observation(size - idle, {POOL_NAME: alias, STATE: "used"})


def _pool_stat(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        if _active is None:
            return
        for alias, pool in _pools().items():
            yield Observation(pool.get_stats().get(key, 0), {POOL_NAME: alias})

    return observe


def time_pools() -> None:
    """Time the getconn and putconn of every pool that exists now (once each)."""
    for alias, pool in _pools().items():
        _time_pool(alias, pool)


def _time_pool(alias: str, pool: Any) -> None:
    if getattr(pool, "_asgi_dbset_timed", False):
        return
    with POOL_PATCH_LOCK:
        if not getattr(pool, "_asgi_dbset_timed", False):
            _wrap_pool(alias, pool)


def _wrap_pool(alias: str, pool: Any) -> None:
    # (Under POOL_PATCH_LOCK: a lane's thread may be wrapping getconn too.)
    getconn, putconn = pool.getconn, pool.putconn
    attributes = {POOL_NAME: alias}
    # When each connection out of the pool left it (by id: connections are
    # not weak-referenceable); written and read under the GIL, one key each.
    borrowed: dict[int, float] = {}

    def timed_getconn(timeout: float | None = None) -> Any:
        started = time.perf_counter()
        conn = getconn(timeout)
        now = time.perf_counter()
        recording = _active
        if recording is not None:
            borrowed[id(conn)] = now
            _record(recording.wait_time, now - started, attributes)
        return conn

    def timed_putconn(conn: Any) -> None:
        left = borrowed.pop(id(conn), None)
        recording = _active
        if left is not None and recording is not None:
            _record(recording.use_time, time.perf_counter() - left, attributes)
        putconn(conn)

    # (A lane's bounded getconn wraps whatever getconn the pool has; it must
    # see that it wrapped this one already.)
    if getattr(getconn, "_asgi_dbset_bounded", False):
        timed_getconn._asgi_dbset_bounded = True  # type: ignore[attr-defined]
    pool.getconn, pool.putconn = timed_getconn, timed_putconn
    pool._asgi_dbset_timed = True


# -- the library ------------------------------------------------------------------


def _library_stat(key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        if _active is None:
            return
        yield Observation(stats.get_stats()[key])

    return observe


def _record_set(dbset: Any) -> None:
    """Called as each connection set closes: its wait and gain, if it
    recorded calls (at parallelism 1, without SERVER_TIMING or HISTORY, a set
    hands its calls to stock Django and records none)."""
    recording = _active
    if recording is None or not dbset.calls:
        return
    figures = dbset.figures()
    _record(recording.request_wait, figures["wait_ms"] / 1000)
    _record(recording.request_gain, figures["gain"])


def _record(
    histogram: metrics.Histogram,
    value: float,
    attributes: dict[str, str] | None = None,
) -> None:
    """Record one value. A metrics pipeline that fails (an SDK extension
    raising out of record(), say) costs the value, never the caller's query
    or the pool its connection: this runs between getconn/putconn and their
    callers."""
    try:
        histogram.record(value, attributes)
    except Exception:
        logger.debug("asgi_dbset: could not record a metric", exc_info=True)
