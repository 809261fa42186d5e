"""4.7 Bad input: any configuration is refused when it is made, or works.

Property-based (hypothesis) over ``ASGI_DBSET``, ``db_parallelism(n,
statement_timeout=...)`` and ``connection_set(...)``; the property is stated in
:mod:`tests.reliability.properties`. The default suite draws from the
``ordinary`` value space; ``test_config_edges.py`` draws from everything (it
found bugs 2 to 4 of docs/reliability.md, now fixed).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.reliability import properties

pytestmark = pytest.mark.django_db(transaction=True)

# Each accepted example runs a real request or set against the database.
FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SOAK = settings(FAST, max_examples=1500)


@FAST
@given(properties.asgi_dbset_settings(wild=False))
def test_any_asgi_dbset_is_refused_at_startup_or_works(raw: Any) -> None:
    properties.check_settings_property(raw)


@FAST
@given(properties.values(wild=True))
def test_an_asgi_dbset_that_is_not_a_dict_is_refused(raw: Any) -> None:
    properties.check_settings_property(raw)


@FAST
@given(properties.decorator_args(wild=False))
def test_any_db_parallelism_arguments_are_refused_or_work(
    args: tuple[Any, Any],
) -> None:
    properties.decorator_property(*args)


@FAST
@given(properties.connection_set_args(wild=False))
def test_any_connection_set_arguments_are_refused_or_work(
    args: tuple[Any, Any, Any],
) -> None:
    properties.connection_set_property(*args)


@pytest.mark.soak
@SOAK
@given(properties.asgi_dbset_settings(wild=False))
def test_any_asgi_dbset_soak(raw: Any) -> None:
    properties.check_settings_property(raw)


@pytest.mark.soak
@SOAK
@given(properties.decorator_args(wild=False))
def test_any_db_parallelism_arguments_soak(args: tuple[Any, Any]) -> None:
    properties.decorator_property(*args)


@pytest.mark.soak
@SOAK
@given(properties.connection_set_args(wild=False))
def test_any_connection_set_arguments_soak(args: tuple[Any, Any, Any]) -> None:
    properties.connection_set_property(*args)
