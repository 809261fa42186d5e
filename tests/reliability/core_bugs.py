"""A failing proof of a gap that remains in asgi_dbset: NOT part of any suite.

This file's name does not match ``test_*.py``, so pytest leaves it out of the
default and the soak runs. Run it on purpose::

    pytest tests/reliability/core_bugs.py

Bug 5 (shared with stock Django): a request cancelled by uvicorn's graceful
shutdown timeout leaves its queries running on PostgreSQL. Django's
ASGIHandler does not pass the cancellation to its inner task, and asgiref's
ThreadSensitiveContext.__aexit__ then blocks the event loop in
``executor.shutdown()`` until the request thread's query ends - before
DBSetMiddleware regains control to cancel its set's queries. Fixing it in the
middleware needs the app run in a task of its own on every request (shielded,
so the set can stop its calls first); see docs/reliability.md. Bugs 2-4 were
fixed; their proofs are in test_config_edges.py.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.reliability.conftest import ServerFactory
from tests.reliability.pgwatch import active, backends, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


# --- 5. requests cancelled at server shutdown leave their queries running ----------


def test_queries_of_requests_cancelled_at_shutdown_do_not_outlive_the_server(
    serve: ServerFactory, watch_dsn: str, app_name: str
) -> None:
    """Bug 5 (a gap, shared with stock Django). On SIGTERM uvicorn waits
    ``--timeout-graceful-shutdown`` (5 s here), then cancels the request
    tasks. Django's ``ASGIHandler.handle`` does not pass that cancellation on
    to its inner ``process_request`` task, so the view's calls are never
    abandoned; the set closes, waits (shielded) for the calls still running
    on its lanes, and the process exits first. The gathered 20 s queries keep
    running on PostgreSQL after the server is gone.

    Fix idea: when a set closes while calls still run on its lanes (it closes
    on an exception or a cancellation of the request), cancel them on the
    server (``cancel_query``) before waiting for them, as for abandoned calls.
    """
    server = serve(pool={"min_size": 3, "max_size": 8, "timeout": 10})
    socks = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /gathered/?sleep=20 HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        time.sleep(0.5)
        assert len(active(watch_dsn, app_name)) == 6
        server.stop()
        assert "Cancel 2 running task(s)" in server.log()
        left = wait_for(
            watch_dsn,
            app_name,
            lambda bs: not any(b.state == "active" for b in bs),
            1.0,
        )
        still = [b for b in left if b.state == "active"]
        assert still == [], f"{len(still)} queries outlived the server: {still}"
    finally:
        for sock in socks:
            sock.close()
        from tests.reliability.pgwatch import connect

        with connect(watch_dsn) as conn:
            for b in backends(watch_dsn, app_name):
                conn.execute("SELECT pg_terminate_backend(%s)", [b.pid])
