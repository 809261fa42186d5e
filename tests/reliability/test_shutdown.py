"""4.8 Server shutdown with requests still running.

On SIGTERM uvicorn waits ``--timeout-graceful-shutdown`` (5 s here) for the
requests in flight, then cancels their tasks, runs the lifespan shutdown and
exits. The queries of those requests must end with the server, not run on in
PostgreSQL for a client that is gone.

Two parts make it so (once bug 5 of docs/reliability.md):

- ``DBSetMiddleware`` opens the request's thread-sensitive context itself,
  outside the set, so Django's handler opens none. Django 5.2's handler does
  not pass a cancellation on to the task that runs the view; with its own
  context, its exit then waited for the request's thread (asgiref < 3.12
  blocks the event loop meanwhile) until that thread's query ended, before the
  set could stop anything. Now the cancellation reaches the set at
  once, and a set closing on a cancellation cancels its running queries on the
  server.
- The lifespan shutdown waits (at most ``CLOSING_SETS_WAIT``) for the sets
  still open to close: the cancels run on threads, and uvicorn exits right
  after the shutdown.
"""

from __future__ import annotations

import socket

import pytest

from tests.reliability.conftest import ServerFactory
from tests.reliability.pgwatch import Backend, backends, connect, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _active(found: list[Backend]) -> int:
    return sum(b.state == "active" for b in found)


def test_queries_of_requests_cancelled_at_shutdown_end_with_the_server(
    serve: ServerFactory, watch_dsn: str, app_name: str
) -> None:
    server = serve(pool={"min_size": 6, "max_size": 8, "timeout": 10})
    # Every connection the two requests need is open before they come (a
    # lease waits LEASE_TIMEOUT at most for the pool to grow).
    wait_for(watch_dsn, app_name, lambda bs: len(bs) >= 6, 10.0)
    socks = []
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /gathered/?sleep=20 HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        # Two requests, three 20 s queries each: lane 0 and two pooled lanes.
        started = wait_for(watch_dsn, app_name, lambda bs: _active(bs) == 6, 5.0)
        assert _active(started) == 6

        server.stop()
        log = server.log()
        assert "Cancel 2 running task(s)" in log
        assert "still open at shutdown" not in log
        left = wait_for(watch_dsn, app_name, lambda bs: _active(bs) == 0, 1.0)
        still = [b for b in left if b.state == "active"]
        assert still == [], f"{len(still)} queries outlived the server: {still}"
    finally:
        for sock in socks:
            sock.close()
        with connect(watch_dsn) as conn:
            for b in backends(watch_dsn, app_name):
                conn.execute("SELECT pg_terminate_backend(%s)", [b.pid])
