"""Watch the database itself: ``pg_stat_activity`` for one ``application_name``.

The watcher's own connection uses another application_name, so it never
counts itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

WATCH_APP_NAME = "asgi_dbset_rel_watch"


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        dsn, autocommit=True, connect_timeout=10, application_name=WATCH_APP_NAME
    )


@dataclass(frozen=True)
class Backend:
    pid: int
    state: str
    query: str
    seconds: float  # since its current query started


def backends(dsn: str, app_name: str) -> list[Backend]:
    """Every backend of ``app_name`` now."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "SELECT pid, coalesce(state, ''), coalesce(query, ''), "
            "coalesce(extract(epoch FROM now() - query_start), 0)::float "
            "FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            [app_name],
        ).fetchall()
    return [Backend(*row) for row in rows]


def active(dsn: str, app_name: str) -> list[Backend]:
    return [b for b in backends(dsn, app_name) if b.state == "active"]


def wait_for(dsn: str, app_name: str, predicate: Any, timeout: float) -> list[Backend]:
    """Poll until ``predicate(backends)`` holds or ``timeout`` passes; return the last."""
    deadline = time.monotonic() + timeout
    while True:
        found = backends(dsn, app_name)
        if predicate(found) or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def terminate(dsn: str, pids: list[int]) -> int:
    """pg_terminate_backend each pid; returns how many the server terminated."""
    with connect(dsn) as conn:
        done = 0
        for pid in pids:
            row = conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()
            done += bool(row and row[0])
    return done


class ActivityWatch:
    """Sample ``app_name``'s backends every ``interval`` s in a thread.

    ``with ActivityWatch(dsn, app) as watch: ...``; then ``watch.max_total``,
    ``watch.max_active``, ``watch.max_active_seconds`` (the oldest running
    query seen) and ``watch.samples`` (time, total, active). Stops by itself
    after ``max_seconds``.
    """

    def __init__(
        self, dsn: str, app_name: str, interval: float = 0.01, max_seconds: float = 900
    ) -> None:
        self.dsn = dsn
        self.app_name = app_name
        self.interval = interval
        self.max_seconds = max_seconds
        self.samples: list[tuple[float, int, int]] = []
        # The longest any query of the app had been running, at any sample.
        self.max_active_seconds = 0.0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="activity-watch", daemon=True
        )

    def __enter__(self) -> ActivityWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def max_total(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    @property
    def max_active(self) -> int:
        return max((s[2] for s in self.samples), default=0)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if conn is None or conn.closed:
                    conn = connect(self.dsn)
                row = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE state = 'active'), "
                    "coalesce(max(extract(epoch FROM now() - query_start)) "
                    "FILTER (WHERE state = 'active'), 0)::float "
                    "FROM pg_stat_activity WHERE application_name = %s",
                    [self.app_name],
                ).fetchone()
                assert row is not None
                self.samples.append((time.time(), int(row[0]), int(row[1])))
                self.max_active_seconds = max(self.max_active_seconds, row[2])
            except psycopg.Error:
                # The server may be restarting (fault scenarios): keep trying.
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.1)
                continue
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()
