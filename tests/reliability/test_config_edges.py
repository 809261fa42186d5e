"""Configuration edges a review once found broken, now refused when applied.

Each test passes when the value is either refused at configuration time
(a ValueError/TypeError, or a check id ``asgi_dbset.E0xx``) or works at
request time; they failed on the core before commit "Refuse non-finite and
out-of-range timeouts and HISTORY" (bugs 2-4 of docs/reliability.md), and the
``wild`` properties search every value for such a gap.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.test import override_settings
from hypothesis import HealthCheck, given, settings

from asgi_dbset import DBSetMiddleware, connection_set, db_parallelism, get_stats
from tests.asgi import request
from tests.helpers import sleeping, take_every_pooled_connection
from tests.reliability import properties

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
    pool, held = await take_every_pooled_connection()
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
