"""Process-wide counters, readable with :func:`asgi_dbset.get_stats`."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()

#: Counter names, with what they count.
COUNTERS = {
    "sets_opened": "connection sets opened",
    "sets_open": "connection sets open now",
    "lanes_leased": "extra lanes leased (a worker thread and a pooled connection)",
    "lanes_open": "extra lanes held now",
    "lease_failures": "extra lanes refused: pool busy past LEASE_TIMEOUT",
    "calls": "ORM calls run through a set",
    "waits": "calls that queued for a lane",
    "pinned_calls": "calls that had to run on one lane (a cursor, a transaction, "
    "a watched connection)",
    "lane0_queued_calls": "calls queued on lane 0's thread behind its current call: "
    "no other lane could be had",
    "saturated_calls": "calls a set let run as stock Django, with none of its "
    "bookkeeping: the requests in flight needed every pooled connection",
    "fallbacks": "calls that ran as stock Django although a set was active",
    "cancels": "server-side cancels sent for abandoned queries",
    "connections_discarded": "lane connections found broken and discarded",
    "rollbacks": "lane connections returned inside a transaction and rolled back",
}


# Every key there from the start: incr() is on the path of every call.
_counters: Counter[str] = Counter(dict.fromkeys([*COUNTERS, "sets_closed"], 0))


#: Called with each connection set as it closes, when something observes them
#: (asgi_dbset.opentelemetry's per-request histograms); None otherwise.
closed_observer: Callable[[Any], None] | None = None


def set_closed_observer(observer: Callable[[Any], None] | None) -> None:
    global closed_observer
    closed_observer = observer


def incr(name: str, n: int = 1) -> None:
    with _lock:
        _counters[name] += n


def sets_open() -> int:
    """Connection sets open now, in this process."""
    with _lock:
        return _sets_open()


def sets_open_now() -> int:
    """:func:`sets_open` without the lock, for a hint on a hot path (two dict
    reads, each atomic under the GIL; a set opening meanwhile may be missed)."""
    return _counters["sets_opened"] - _counters["sets_closed"]


def _sets_open() -> int:
    # Counted as opened and closed: one update per set open, one per close.
    # (The caller holds _lock.)
    return _counters["sets_opened"] - _counters["sets_closed"]


def get_pool_stats() -> dict[str, dict[str, int]]:
    """``get_stats()`` of each database alias's psycopg pool that exists now."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    # Django keeps one pool per alias in this class-level dict (5.1+).
    pools: dict[str, Any] = dict(getattr(DatabaseWrapper, "_connection_pools", {}))
    return {alias: dict(pool.get_stats()) for alias, pool in sorted(pools.items())}


def get_stats() -> dict[str, int]:
    """Return a snapshot of the process-wide counters (every name in COUNTERS)."""
    with _lock:
        counts = {name: _counters[name] for name in COUNTERS}
        counts["sets_open"] = _sets_open()
        return counts
