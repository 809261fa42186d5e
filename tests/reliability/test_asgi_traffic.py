"""4.7 Unusual ASGI traffic passes through unharmed.

``tests/test_middleware.py`` shows that websocket and unknown scopes reach a
bare app without a set, and that lifespan opens and closes the pools. Here:
the same scopes through Django's own handler (its error is not swallowed or
changed, and no set or connection is taken); a request body that never ends,
in process and through uvicorn, while other requests are served; and
uvicorn's own lifespan and graceful shutdown around a real server.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.asgi import get_asgi_application

from asgi_dbset import DBSetMiddleware, get_stats
from asgi_dbset.budget import budget
from asgi_dbset.types import Message
from tests.asgi import http_scope, request
from tests.helpers import checked_out
from tests.reliability.conftest import Report, ServerFactory
from tests.reliability.load import Load
from tests.reliability.pgwatch import ActivityWatch, backends, wait_for
from tests.reliability.server import quiet

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ({"type": "websocket", "path": "/ws"}, "not websocket"),
        ({"type": "something-new"}, "not something-new"),
    ],
)
async def test_scopes_django_refuses_reach_it_and_its_error_is_kept(
    scope: dict[str, Any], message: str
) -> None:
    app = DBSetMiddleware(get_asgi_application())
    opened = get_stats()["sets_opened"]
    before = checked_out()

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        raise AssertionError(f"nothing should be sent: {message}")

    with pytest.raises(ValueError, match=message):
        await app(scope, receive, send)
    assert get_stats()["sets_opened"] == opened
    assert checked_out() == before


async def test_a_body_that_never_ends_holds_nothing() -> None:
    """Django reads the whole body before the view: a request whose body never
    ends sits in the middleware's set with no lane and no connection, while
    other requests run in parallel; the client's disconnect ends it cleanly."""
    app = DBSetMiddleware(get_asgi_application())
    await request(app, "/plain/")  # warm up
    before, sets_open = checked_out(), get_stats()["sets_open"]
    gone = asyncio.Event()
    chunks = 0

    async def receive() -> Message:
        nonlocal chunks
        if chunks < 3:
            chunks += 1
            return {"type": "http.request", "body": b"x" * 10, "more_body": True}
        await gone.wait()  # bounded: the test sets it below
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {**http_scope("/plain/"), "method": "POST"}
    stuck = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.sleep(0.2)
        assert get_stats()["sets_open"] == sets_open + 1
        assert checked_out() == before
        assert budget.total == 0
        # Others are served meanwhile, in parallel.
        responses = await asyncio.gather(
            *(request(app, "/dashboard/", "sleep=0.05") for _ in range(3))
        )
        assert [r.status for r in responses] == [200] * 3
        assert max(r.json()["lanes_used"] for r in responses) == 3
    finally:
        gone.set()
        await asyncio.wait_for(stuck, 10)
    assert sent == []  # Django answers nothing to a request it never read
    assert get_stats()["sets_open"] == sets_open
    assert budget.total == 0


def _settled(server: Any) -> dict[str, Any]:
    """The state once the last normal request has returned its connections."""
    deadline = time.monotonic() + 5
    while True:
        state = server.state()
        if state["checked_out"] == 0 or time.monotonic() >= deadline:
            return dict(state)
        time.sleep(0.05)


def _plan(port: int, clients: int, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "port": port,
        "clients": clients,
        "per_client": 1,
        "timeout": 30,
        "requests": [spec],
    }


def stalled_bodies(
    serve: ServerFactory,
    dsn: str,
    app_name: str,
    workdir: Path,
    *,
    stalled: int,
    hold: float,
    clients: int,
    per_client: int,
) -> dict[str, Any]:
    """``stalled`` clients promise a large body and go quiet for ``hold``
    seconds; meanwhile ``clients`` x ``per_client`` normal requests are all
    answered, and the stalled ones hold no connection. When the stalled
    clients leave, nothing is left."""
    server = serve(pool={"min_size": 2, "max_size": 8, "timeout": 10})
    stall = {"label": "stalled", "path": "/body/", "kind": "stalled_body", "hold": hold}
    normal = {"label": "gathered", "path": "/gathered/?sleep=0.05", "expect": {"n": 3}}
    with (
        ActivityWatch(dsn, app_name) as watch,
        Load(_plan(server.port, stalled, stall), workdir, "stalled") as stalling,
    ):
        time.sleep(1.0)
        plan = {**_plan(server.port, clients, normal), "per_client": per_client}
        with Load(plan, workdir, "normal") as load:
            answered = load.wait(timeout=hold)
        # The normal requests are done; the stalled ones are still inside the
        # app, and hold no connection.
        during = _settled(server)
        result = stalling.wait(timeout=120)
    others = clients * per_client
    assert answered["statuses"]["gathered"] == {"200": others}
    assert answered["error_count"] == 0, answered["errors"]
    assert during["counters"]["sets_open"] == stalled, during
    assert during["checked_out"] == 0, during
    assert during["budget"] == 0, during
    assert result["statuses"]["stalled"] == {"stalled": stalled}
    assert watch.max_total <= 8
    state = server.wait_quiet()
    assert quiet(state), state
    return {
        "stalled": stalled,
        "answered_meanwhile": others,
        "sets_open_while_stalled": during["counters"]["sets_open"],
        "connections_out_while_stalled": during["checked_out"],
        "max_connections": watch.max_total,
    }


def test_stalled_bodies_through_uvicorn(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = stalled_bodies(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        stalled=20,
        hold=3,
        clients=20,
        per_client=1,
    )
    report(figures)


@pytest.mark.soak
def test_stalled_bodies_through_uvicorn_soak(
    serve: ServerFactory, watch_dsn: str, app_name: str, tmp_path: Path, report: Report
) -> None:
    figures = stalled_bodies(
        serve,
        watch_dsn,
        app_name,
        tmp_path,
        stalled=500,
        hold=40,
        clients=20,
        per_client=25,
    )
    report(figures)


def test_lifespan_and_graceful_shutdown(
    serve: ServerFactory, watch_dsn: str, app_name: str
) -> None:
    """uvicorn runs the lifespan through the middleware (Django alone would
    refuse it); on SIGTERM the pools are closed and every connection of the
    server is gone."""
    server = serve(pool={"min_size": 3, "max_size": 6})
    assert server.get("/gathered/?sleep=0.01")[0] == 200
    assert server.wait_quiet()["pool"]["pool_size"] >= 3
    server.stop()
    log = server.log()
    assert "Application startup complete." in log
    assert "Application shutdown complete." in log
    assert "lifespan" not in log.lower().replace("waiting for application", "")
    assert "Traceback" not in log
    assert "ERROR" not in log
    left = wait_for(watch_dsn, app_name, lambda found: not found, 2.0)
    assert left == []


def test_a_slowloris_does_not_stop_the_server(
    serve: ServerFactory, app_name: str, watch_dsn: str
) -> None:
    """A client that sends its request line a byte at a time never reaches
    the app; meanwhile the server answers others."""
    server = serve(pool={"min_size": 2, "max_size": 4})
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        for byte in b"GET /gathered/?sleep=30 HT":
            slow.sendall(bytes([byte]))
            time.sleep(0.01)
        assert server.get("/gathered/?sleep=0.01")[0] == 200
        assert not [b for b in backends(watch_dsn, app_name) if b.state == "active"]
    assert quiet(server.wait_quiet())
