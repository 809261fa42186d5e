"""Fixtures of the reliability tests: servers in subprocesses, their database."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.reliability.server import Server, ServerConfig

ServerFactory = Callable[..., Server]
Report = Callable[[dict[str, Any]], None]


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """Record a scenario's figures: printed (see them with ``-s``), and
    appended as a JSON line to ``$REL_FIGURES`` when it is set."""

    def record(figures: dict[str, Any]) -> None:
        line = json.dumps({"test": request.node.nodeid, **figures}, default=str)
        print(line)
        path = os.environ.get("REL_FIGURES")
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")

    return record


@pytest.fixture
def watch_dsn() -> str:
    """Where the tests read ``pg_stat_activity`` (any database of the server)."""
    return str(settings.DATABASE_URL)


@pytest.fixture
def app_name() -> str:
    """A fresh ``application_name``: the server's connections, and only them."""
    return f"asgi_dbset_rel_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def serve(
    transactional_db: None, tmp_path: Path, app_name: str
) -> Iterator[ServerFactory]:
    """Start servers on the test database; every one is stopped at the end.

    ``serve(pool={...}, asgi_dbset={...}, stock=False, health_checks=False)``.
    The servers are stopped before the test database is flushed.
    """
    servers: list[Server] = []
    db_name = settings.DATABASES["default"]["NAME"]

    def start(**options: Any) -> Server:
        name = options.pop("app_name", app_name)
        # (The app's own address: a PgBouncer in the PgBouncer cell.)
        url = options.pop("db_url", settings.APP_DATABASE_URL)
        options.setdefault("transaction_pooled", settings.PGBOUNCER is not None)
        config = ServerConfig(
            db_url=url,
            app_name=name,
            db_name=options.pop("db_name", db_name),
            **options,
        )
        server = Server(config, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def too_many_clients(server: Server) -> list[str]:
    """Server log lines that report SQLSTATE 53300 (too many clients)."""
    return [
        line
        for line in server.log().splitlines()
        if "53300" in line or "too many clients" in line.lower()
    ]
