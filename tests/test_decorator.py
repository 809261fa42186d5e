"""db_parallelism and connection_set reject bad arguments when applied."""

from __future__ import annotations

from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse
from django.test import override_settings

from asgi_dbset import ConnectionSet, connection_set, db_parallelism


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        db_parallelism(bad)


@pytest.mark.parametrize("bad", [True, False, 2.0, "3", None, [3]])
def test_non_integers_are_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="whole number"):
        db_parallelism(bad)


def test_a_sync_view_is_refused_with_what_to_write() -> None:
    def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    with pytest.raises(TypeError, match="async def"):
        db_parallelism(3)(view)


def test_a_non_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="directly above"):
        db_parallelism(3)(42)  # type: ignore[type-var]


def test_decorated_view_keeps_its_name_and_is_async() -> None:
    async def dashboard(request: HttpRequest) -> HttpResponse:
        return HttpResponse()

    decorated = db_parallelism(3)(dashboard)
    assert decorated.__name__ == "dashboard"
    assert decorated.db_parallelism == 3  # type: ignore[attr-defined]
    from asgiref.sync import iscoroutinefunction

    assert iscoroutinefunction(decorated)


@pytest.mark.parametrize("bad", [0, True, "2"])
def test_connection_set_validates(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        connection_set(parallelism=bad)


def test_connection_set_caps_at_max_parallelism() -> None:
    with override_settings(ASGI_DBSET={"MAX_PARALLELISM": 2}):
        assert connection_set(parallelism=16).parallelism == 2


def test_connection_set_validates_lease_timeout() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        ConnectionSet(parallelism=2, lease_timeout=-1)
    with pytest.raises(TypeError, match="seconds"):
        ConnectionSet(parallelism=2, lease_timeout="soon")  # type: ignore[arg-type]


def test_repr_shows_live_state() -> None:
    assert repr(ConnectionSet(parallelism=3)) == (
        "<ConnectionSet new parallelism=3 | lanes: 0 busy, 1 idle, 0 leasing | "
        "calls: 0 queued, 0 run>"
    )
