"""Hypothesis strategies and the properties that test_bad_input.py checks.

The property, for any ``ASGI_DBSET`` and any decorator or ``connection_set``
arguments: either the configuration is refused when it is made - a
``TypeError``/``ValueError`` with a message, or a system check error with an
``asgi_dbset.E0xx`` id that stops ``DBSetMiddleware`` from starting - or it is
taken exactly as written and a real request runs with it. Never a crash, and
never a silent default, at request time.

Two value spaces: ``wild`` is everything (non-finite floats, integers past
any C type), drawn by ``test_config_edges.py``; ``ordinary`` leaves out the
values that once got past the checks and failed at request time (NaN,
infinities, timeouts past PostgreSQL's limit, HISTORY past ``sys.maxsize``:
bugs 2 to 4 of docs/reliability.md, now refused), and is what
``test_bad_input.py`` draws from.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.db import OperationalError
from django.test import override_settings
from hypothesis import event
from hypothesis import strategies as st

from asgi_dbset import DBSetMiddleware, connection_set, db_parallelism
from asgi_dbset.checks import check_settings
from asgi_dbset.conf import conf
from tests.asgi import request
from tests.helpers import sleeping

CHECK_ID = re.compile(r"asgi_dbset\.E0\d\d")

# PostgreSQL's statement_timeout is an int of milliseconds.
PG_MAX_TIMEOUT_S = (2**31 - 1) / 1000
# A statement timeout shorter than this may cancel even the tests' quickest
# query; that is the limit working, not a failure.
SHORTEST = 0.05


def _may_time_out(statement_timeout: Any) -> bool:
    return (
        isinstance(statement_timeout, int | float)
        and not isinstance(statement_timeout, bool)
        and 0 < statement_timeout < SHORTEST
    )


def _is_statement_timeout(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) and "statement timeout" in str(exc)


EDGES = [float("nan"), float("inf"), -float("inf"), 2**63, 10**30, 1e300, 2_147_484]


def _numbers(wild: bool) -> st.SearchStrategy[Any]:
    if wild:
        return st.one_of(
            st.integers(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from(EDGES),
        )
    return st.one_of(
        st.integers(min_value=-(2**31), max_value=int(PG_MAX_TIMEOUT_S)),
        st.floats(min_value=-1e6, max_value=0),
        st.floats(min_value=SHORTEST, max_value=PG_MAX_TIMEOUT_S),
    )


def values(wild: bool) -> st.SearchStrategy[Any]:
    """Anything a settings file might hold."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-3, max_value=12),
        st.just(0.0),
        st.floats(min_value=SHORTEST, max_value=3),
        _numbers(wild),
        st.text(max_size=4),
        st.sampled_from(["1", "0.5", "fast", ""]),
        st.lists(st.integers(min_value=0, max_value=4), max_size=2),
    )


# Values each key is meant to take; drawn three times as often as anything.
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "DEFAULT_PARALLELISM": st.integers(min_value=1, max_value=4),
    "MAX_PARALLELISM": st.integers(min_value=1, max_value=10),
    "BUDGET": st.one_of(st.none(), st.integers(min_value=1, max_value=7)),
    "LEASE_TIMEOUT": st.one_of(st.floats(min_value=0, max_value=1), st.integers(0, 2)),
    "STATEMENT_TIMEOUT": st.one_of(
        st.none(), st.floats(min_value=SHORTEST, max_value=60)
    ),
    "SERVER_TIMING": st.booleans(),
    "HISTORY": st.integers(min_value=0, max_value=100),
}


def asgi_dbset_settings(wild: bool) -> st.SearchStrategy[Any]:
    per_key = {
        key: st.one_of(good, good, good, values(wild)) for key, good in GOOD.items()
    }
    plausible = st.fixed_dictionaries({}, optional=GOOD)
    known = st.fixed_dictionaries({}, optional=per_key)
    unknown = st.dictionaries(
        st.text(min_size=1, max_size=12), values(wild), max_size=2
    )
    with_unknown = st.builds(lambda a, b: {**b, **a}, known, unknown)
    # Known keys with meant values, with any values, and with unknown keys too.
    # (Values that are not a dict at all: test_bad_input draws them from
    # values() on their own.)
    if not wild:
        return st.one_of(plausible, known, with_unknown)
    # Numbers at the edges, one key at a time, so they are not drowned out.
    edge = st.builds(
        lambda good, key, value: {**good, key: value},
        plausible,
        st.sampled_from(sorted(GOOD)),
        st.sampled_from(EDGES),
    )
    return st.one_of(plausible, known, with_unknown, edge)


def _same(written: Any, read: Any) -> bool:
    if isinstance(written, float) and math.isnan(written):
        return False  # NaN taken as a setting is always a silent surprise
    if isinstance(read, float) and isinstance(written, int):
        return float(written) == read
    return bool(written == read)


def check_settings_property(raw: Any) -> None:
    with override_settings(ASGI_DBSET=raw):
        serious = [m for m in check_settings() if m.is_serious()]
        if serious:
            event("refused: " + ",".join(sorted({str(m.id) for m in serious})))
            assert all(CHECK_ID.fullmatch(str(m.id)) for m in serious), serious
            assert all(m.msg and m.hint for m in serious), serious
            refusal = ""
            try:
                DBSetMiddleware(ASGIHandler())
            except ImproperlyConfigured as exc:
                refusal = str(exc)
            assert refusal, f"the middleware started with {raw!r}"
            assert all(str(m.id) in refusal for m in serious), refusal
            return
        event("accepted: a request ran")
        app = DBSetMiddleware(ASGIHandler())
        # Taken as written: no silent default.
        for key, written in raw.items():
            assert _same(written, getattr(conf, key)), (
                key,
                written,
                getattr(conf, key),
            )
        # And a real request runs with it, lanes, timeouts and history included.
        limit = conf.STATEMENT_TIMEOUT
        quick = limit is not None and limit < 1
        response = asyncio.run(
            request(app, "/dashboard/", "" if quick else "sleep=0.02")
        )
        if response.status == 500 and _may_time_out(limit):
            return
        assert response.status == 200, (raw, response.status, response.body[:300])
        data = response.json()
        assert data["parallelism"] == min(3, conf.MAX_PARALLELISM)


def parallelism_args(wild: bool) -> st.SearchStrategy[Any]:
    good = st.integers(min_value=1, max_value=10)
    return st.one_of(good, good, st.integers(min_value=-2, max_value=0), values(wild))


def timeout_args(wild: bool) -> st.SearchStrategy[Any]:
    good = st.one_of(st.none(), st.floats(min_value=SHORTEST, max_value=30))
    return st.one_of(good, good, values(wild))


def decorator_args(wild: bool) -> st.SearchStrategy[tuple[Any, Any]]:
    """(n, statement_timeout): half meant values, half anything."""
    good = st.tuples(
        st.integers(min_value=1, max_value=10),
        st.one_of(st.none(), st.floats(min_value=SHORTEST, max_value=30)),
    )
    return st.one_of(good, st.tuples(parallelism_args(wild), timeout_args(wild)))


def connection_set_args(wild: bool) -> st.SearchStrategy[tuple[Any, Any, Any]]:
    """(parallelism, statement_timeout, lease_timeout): half meant values."""
    good = st.tuples(
        st.one_of(st.none(), st.integers(min_value=1, max_value=10)),
        st.one_of(st.none(), st.floats(min_value=SHORTEST, max_value=30)),
        st.one_of(st.none(), st.floats(min_value=0, max_value=1)),
    )
    return st.one_of(
        good,
        st.tuples(parallelism_args(wild), timeout_args(wild), timeout_args(wild)),
    )


async def _three_queries(quick: bool = False) -> list[int]:
    seconds = 0 if quick else 0.01
    return list(await asyncio.gather(*(sleeping(seconds).acount() for _ in range(3))))


def _runs(coro: Any, statement_timeout: Any) -> None:
    try:
        assert asyncio.run(coro) == [0, 0, 0]
    except OperationalError as exc:
        if not (_may_time_out(statement_timeout) and _is_statement_timeout(exc)):
            raise


def _refused(exc: TypeError | ValueError) -> None:
    event(f"refused: {type(exc).__name__}")
    if not str(exc):
        raise AssertionError("an error without a message") from exc


def decorator_property(n: Any, statement_timeout: Any) -> None:
    try:
        decorator = db_parallelism(n, statement_timeout=statement_timeout)
    except (TypeError, ValueError) as exc:
        _refused(exc)
        return
    event("accepted: a view ran")

    @decorator
    async def view() -> list[int]:
        return await _three_queries(_may_time_out(statement_timeout))

    _runs(view(), statement_timeout)


def connection_set_property(n: Any, statement_timeout: Any, lease_timeout: Any) -> None:
    try:
        dbset = connection_set(
            parallelism=n,
            statement_timeout=statement_timeout,
            lease_timeout=lease_timeout,
        )
    except (TypeError, ValueError) as exc:
        _refused(exc)
        return
    event("accepted: a set ran")
    if lease_timeout is not None:
        assert _same(lease_timeout, dbset.lease_timeout), (
            lease_timeout,
            dbset.lease_timeout,
        )

    async def run() -> list[int]:
        async with dbset:
            return await _three_queries(_may_time_out(statement_timeout))

    _runs(run(), statement_timeout)
