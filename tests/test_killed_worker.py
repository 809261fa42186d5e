"""A worker process killed mid-request: its queries stop on the server.

When a process dies without running any code (SIGKILL; a server that kills
its workers after a grace period), PostgreSQL notices the dead client only
when it next writes to it - for a long query, when the query ends. PostgreSQL
14+'s ``client_connection_check_interval`` makes a running query check its
client and stop. Set on the app's connections (``OPTIONS["options"]``, as
docs/deployment.md says), the killed process's queries stop within about a
second; without it, as the control beside it shows, they run on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings
from psycopg.conninfo import conninfo_to_dict

from tests.one_database import SETUP

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parent.parent

KILLED_MID_GATHER = """
import asyncio

from asgiref.sync import ThreadSensitiveContext

from asgi_dbset import connection_set
from tests.helpers import sleeping


async def main():
    async with ThreadSensitiveContext():
        async with connection_set(parallelism=4, lease_timeout=10.0):
            await asyncio.gather(*(sleeping(30).acount() for _ in range(4)))


asyncio.run(main())
"""


def direct_database(app_name: str, check_ms: int | None) -> dict[str, Any]:
    """The suite's test database, reached directly (not through a pooler:
    there the setting cannot help, PgBouncer's server session stays alive)."""
    params = conninfo_to_dict(settings.DATABASE_URL)
    options: dict[str, Any] = {
        "pool": {"min_size": 4, "max_size": 8},
        "application_name": app_name,
    }
    if check_ms is not None:
        options["options"] = f"-c client_connection_check_interval={check_ms}"
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": settings.DATABASES["default"]["NAME"],
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        "OPTIONS": options,
    }


def sleeps_of(app_name: str) -> list[int]:
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'active' AND query LIKE '%%pg_sleep%%'",
            [app_name],
        ).fetchall()
    return [int(row[0]) for row in rows]


def kill_mid_gather(check_ms: int | None) -> tuple[float | None, list[int]]:
    """Start the worker, SIGKILL it once its 4 queries run; how long they
    ran on after that (None: still running 3 s later), and their pids."""
    import json

    app_name = f"killed_worker_{check_ms}_{os.getpid()}"
    database = direct_database(app_name, check_ms)
    worker = subprocess.Popen(
        [sys.executable, "-c", SETUP + KILLED_MID_GATHER, json.dumps(database)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            if len(sleeps_of(app_name)) == 4:
                break
            time.sleep(0.05)
        pids = sleeps_of(app_name)
        assert len(pids) == 4
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        killed = time.monotonic()
        while time.monotonic() - killed < 3:
            if not sleeps_of(app_name):
                return time.monotonic() - killed, pids
            time.sleep(0.05)
        return None, pids
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                [app_name],
            )


def test_queries_of_a_killed_worker_stop_with_client_connection_checks() -> None:
    with_checks, _ = kill_mid_gather(check_ms=500)
    without, pids = kill_mid_gather(check_ms=None)
    print(
        f"killed worker: with client_connection_check_interval=500ms its 4 queries "
        f"stopped {with_checks} s after the kill; without, after 3 s: {without}"
    )
    # With the check every 0.5 s, the queries stop within about a second...
    assert with_checks is not None
    assert with_checks < 1.5
    # ...without it (the control, side by side), they run on.
    assert without is None, pids
