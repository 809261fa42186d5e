"""Failing proofs of bugs found in asgi_dbset's core: NOT part of any suite yet.

This file's name does not match ``test_*.py``, so pytest leaves it out of the
default and the soak runs. Run it on purpose::

    pytest tests/reliability/core_bugs.py

Every test here fails on the core as of commit dfea5ba and should pass once
the bug it names is fixed; then move it into the matching ``test_*.py`` (and
switch ``test_bad_input.py`` to the ``wild`` value space). Each docstring says
what goes wrong, where, and what the fix could be. docs/reliability.md lists
them too. (Bug 1, an abandoned call that still waited for the pool ran its
query anyway, was fixed in d8a8e3e; its proofs moved to test_cancel_races.py
and test_disconnects.py.)
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.db import connections
from django.test import override_settings
from hypothesis import HealthCheck, given, settings

from asgi_dbset import DBSetMiddleware, connection_set, db_parallelism, get_stats
from tests.asgi import request
from tests.helpers import checked_out, sleeping
from tests.reliability import properties
from tests.reliability.conftest import ServerFactory
from tests.reliability.pgwatch import active, backends, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


# --- 2. statement timeouts the checks accept, that fail every query ----------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, 2_147_484])
async def test_a_statement_timeout_setting_the_checks_accept_works(
    value: float,
) -> None:
    """Bug 2. ``STATEMENT_TIMEOUT`` NaN, infinity, or more than PostgreSQL's
    2,147,483.647 s passes check E011 (and ``validate_statement_timeout``),
    then every query of every set fails at request time:
    ``ConnectionSet._timeout_ms`` raises ValueError (NaN) or OverflowError
    (infinity, 1e300) from ``round()``, or PostgreSQL refuses
    ``set_config('statement_timeout', '2147484000ms')`` (InvalidParameterValue).
    The same values pass ``db_parallelism(n, statement_timeout=...)`` and
    ``connection_set(statement_timeout=...)``.

    Fix idea: require a finite value no larger than 2_147_483.647 in
    ``validate_statement_timeout`` and in E011 (or treat "past the server's
    limit" as no limit, and say so).
    """
    with override_settings(ASGI_DBSET={"STATEMENT_TIMEOUT": value}):
        from asgi_dbset.checks import check_settings

        if any(m.is_serious() for m in check_settings()):
            return  # refused at configuration time: fixed
        async with connection_set() as dbset:
            assert dbset.statement_timeout is not None
            assert await sleeping(0.01).acount() == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2_147_484])
async def test_a_statement_timeout_argument_is_refused_or_works(value: float) -> None:
    """Bug 2, through the decorator's argument."""
    try:
        decorator = db_parallelism(2, statement_timeout=value)
    except (TypeError, ValueError):
        return  # refused when applied: fixed

    @decorator
    async def view() -> list[int]:
        return list(
            await asyncio.gather(sleeping(0.01).acount(), sleeping(0.01).acount())
        )

    assert await view() == [0, 0]


# --- 3. HISTORY past sys.maxsize ----------------------------------------------------


async def test_a_history_the_checks_accept_works() -> None:
    """Bug 3. ``HISTORY = 2**63`` passes E013, then every request through the
    middleware ends in ``OverflowError: Python int too large to convert to C
    ssize_t`` from ``deque(maxlen=...)`` in ``history.remember`` - after the
    response was sent, so the server logs an ASGI exception per request.

    Fix idea: bound HISTORY in E013 (for example at most 1_000_000).
    """
    with override_settings(ASGI_DBSET={"HISTORY": 2**63}):
        from asgi_dbset.checks import check_settings

        if any(m.is_serious() for m in check_settings()):
            return  # refused at configuration time: fixed
        app = DBSetMiddleware(ASGIHandler())
        response = await request(app, "/plain/")
        assert response.status == 200


# --- 4. LEASE_TIMEOUT infinity ------------------------------------------------------


async def test_an_infinite_lease_timeout_still_leases_when_the_pool_frees_up() -> None:
    """Bug 4. ``lease_timeout=float("inf")`` (and ``LEASE_TIMEOUT``) is accepted
    (E007 only refuses negatives), but when the pool has no idle connection,
    psycopg's ``getconn(timeout=inf)`` raises OverflowError ("timestamp out of
    range") from ``Condition.wait`` at once; ``_grow`` counts a lease failure
    and backs off for ``max(lease_timeout, 0.01)`` = forever: the set silently
    never leases again. NaN is accepted too, and ``now >= nan`` is never true,
    so a set never retries after its first failure either.

    Fix idea: require a finite LEASE_TIMEOUT / lease_timeout.
    """
    try:
        dbset = connection_set(parallelism=3, lease_timeout=float("inf"))
    except (TypeError, ValueError):
        return  # refused when made: fixed
    pool = connections["default"].pool
    pool.open()
    await asyncio.to_thread(pool.wait)
    await sleeping(0).acount()  # lane 0's own connection
    held = []
    while checked_out() < pool.max_size:
        held.append(await asyncio.to_thread(pool.getconn, 5))
    failures = get_stats()["lease_failures"]

    async def give_back_soon() -> None:
        await asyncio.sleep(0.3)
        for conn in held[:2]:
            pool.putconn(conn)

    try:
        async with dbset:
            await asyncio.gather(
                give_back_soon(), *(sleeping(0.6).acount() for _ in range(6))
            )
            used = dbset.lanes_used
    finally:
        for conn in held[2:]:
            pool.putconn(conn)
    # Waiting "forever" for the pool means getting the connections given back.
    assert get_stats()["lease_failures"] == failures
    assert used > 1


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


# --- the property tests over every value -------------------------------------------

WILD = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@WILD
@given(properties.asgi_dbset_settings(wild=True))
def test_any_asgi_dbset_wild(raw: Any) -> None:
    """Finds bugs 2 and 3 (and 4 when the pool is busy)."""
    properties.check_settings_property(raw)


@WILD
@given(properties.decorator_args(wild=True))
def test_any_db_parallelism_arguments_wild(args: tuple[Any, Any]) -> None:
    """Finds bug 2."""
    properties.decorator_property(*args)


@WILD
@given(properties.connection_set_args(wild=True))
def test_any_connection_set_arguments_wild(args: tuple[Any, Any, Any]) -> None:
    """Finds bug 2."""
    properties.connection_set_property(*args)
