"""Find a PostgreSQL server for the example site and the test suite.

``database_url()`` returns ``DATABASE_URL`` when it is set; otherwise it starts an
embedded PostgreSQL (the ``pgserver`` package) whose data lives in ``<repo>/.pgdata/``
and returns its URL. The embedded server is left running when the process exits, so
the next run, the tests or the demo, reuses it instead of starting another.

This module must not touch Django settings: it is imported by settings modules.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

REPO_ROOT = Path(__file__).resolve().parent.parent
PGDATA = REPO_ROOT / ".pgdata"

HOW_TO_PROVIDE = (
    "Point DATABASE_URL at a PostgreSQL server "
    "(export DATABASE_URL=postgresql://user@host:port/dbname), "
    "or install the embedded server with `pip install pgserver`."
)

_lock = threading.Lock()
_embedded_url: str | None = None


class DatabaseServerError(RuntimeError):
    """No PostgreSQL server was configured and the embedded one could not start."""


def database_url() -> str:
    """Return ``DATABASE_URL`` if set, else the URL of the embedded server."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return url
    return embedded_database_url()


def embedded_database_url() -> str:
    """Start the embedded server in ``<repo>/.pgdata/`` (or reuse it) and return its URL.

    Started at most once per process; a server left running by an earlier process is
    reused rather than started again. Where ``pgserver`` cannot be installed (it has
    no wheels for Python 3.13 yet), a server that another environment started in
    ``.pgdata/`` is still used; ``make db-start`` starts one.
    """
    global _embedded_url
    with _lock:
        if _embedded_url is None:
            try:
                with warnings.catch_warnings():
                    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers,
                    # CI) and falls back to /tmp, which is what pgserver needs.
                    warnings.filterwarnings(
                        "ignore",
                        message="XDG_RUNTIME_DIR is not set",
                        category=UserWarning,
                    )
                    from pgserver.postgres_server import get_server
            except ImportError as exc:
                running = running_embedded_url()
                if running is None:
                    raise DatabaseServerError(
                        "The embedded PostgreSQL server is not installed in this "
                        f"environment and none is running in {PGDATA}. "
                        f"{HOW_TO_PROVIDE} (`make db-start` starts it from .venv.)"
                    ) from exc
                _embedded_url = running
                return _embedded_url
            try:
                server = get_server(PGDATA, cleanup_mode=None)
                _embedded_url = str(server.get_uri())
            except Exception as exc:
                raise DatabaseServerError(
                    f"The embedded PostgreSQL server in {PGDATA} did not start "
                    f"({type(exc).__name__}: {exc}); its log is {PGDATA / 'log'}. "
                    f"{HOW_TO_PROVIDE}"
                ) from exc
        return _embedded_url


def _running_pid() -> tuple[int, list[str]] | None:
    """The postmaster's pid and postmaster.pid lines, if a server runs in PGDATA."""
    try:
        lines = (PGDATA / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
        os.kill(pid, 0)
    except (OSError, IndexError, ValueError):
        return None
    return pid, lines


def running_embedded_url() -> str | None:
    """The URL of a server already running in ``PGDATA``, found without pgserver."""
    found = _running_pid()
    if found is None:
        return None
    _, lines = found
    # postmaster.pid: pid, data dir, start time, port, socket dir, listen address,
    # shared memory key, status.
    if len(lines) < 8 or lines[7].strip() != "ready" or not lines[4].strip():
        return None
    port, socket_dir = lines[3].strip(), lines[4].strip()
    return f"postgresql://postgres:@/postgres?host={socket_dir}&port={port}"


def stop_embedded_server(timeout: float = 10.0) -> bool:
    """Stop the embedded server of ``<repo>/.pgdata/``; False if it was not running."""
    found = _running_pid()
    if found is None:
        print(f"No embedded PostgreSQL is running in {PGDATA}.")
        return False
    pid, _ = found
    os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"Stopped the embedded PostgreSQL in {PGDATA}.")
            return True
        time.sleep(0.1)
    raise DatabaseServerError(
        f"The embedded PostgreSQL (pid {pid}) did not stop within {timeout} s."
    )


def django_database(
    url: str,
    *,
    name: str | None = None,
    pool: Mapping[str, Any] | bool = True,
    application_name: str = "asgi_dbset",
) -> dict[str, Any]:
    """Turn a libpq URL or conninfo string into a pooled Django ``DATABASES`` entry.

    The host may be a socket directory (``?host=/path``), as the embedded server's is.
    Other libpq parameters in the URL (``sslmode``, ...) are passed on in ``OPTIONS``.
    ``name`` replaces the URL's database name.
    """
    params: dict[str, Any] = conninfo_to_dict(url)
    dbname = params.pop("dbname", None)
    options: dict[str, Any] = {
        **params,
        "pool": dict(pool) if isinstance(pool, Mapping) else pool,
        "application_name": application_name,
    }
    entry: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name or dbname or "postgres",
        "USER": options.pop("user", "") or "",
        "PASSWORD": options.pop("password", "") or "",
        "HOST": options.pop("host", "") or "",
        "PORT": str(options.pop("port", "") or ""),
        # Django refuses a persistent connection age together with a pool.
        "CONN_MAX_AGE": 0,
        "OPTIONS": options,
    }
    return entry


if __name__ == "__main__":
    # `python -m example_site.dbserver`: make sure a server is up, print its URL.
    try:
        print(database_url())
    except DatabaseServerError as exc:
        raise SystemExit(str(exc)) from None
