"""What the tools that watch queries see: stock Django's outcome, with and
without ``DBSetMiddleware``.

Each test serves the same requests through Django's handler alone (stock) and
through the middleware, and compares what the watching code saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.http import HttpRequest, JsonResponse
from django.test import override_settings
from django.urls import path

from asgi_dbset import DBSetMiddleware
from tests.asgi import request
from tests.helpers import sleeping

pytestmark = pytest.mark.django_db(transaction=True)

#: The queries the hooks saw, while a test records them.
SEEN: list[str] = []
RECORDING: list[bool] = []


async def gathered(request: HttpRequest) -> JsonResponse:
    counts = await asyncio.gather(*(sleeping(0.05).acount() for _ in range(4)))
    return JsonResponse({"counts": counts})


async def one_by_one(request: HttpRequest) -> JsonResponse:
    counts = [await sleeping(0.05).acount() for _ in range(4)]
    return JsonResponse({"counts": counts})


urlpatterns = [path("gathered/", gathered), path("one-by-one/", one_by_one)]


def application_hook(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
) -> Any:
    """An APM's execute wrapper (Scout APM installs its own this way)."""
    if RECORDING and "pg_sleep" in sql:
        SEEN.append(context["connection"].alias)
    return execute(sql, params, many, context)


def install_hook(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    # Once per Django connection object, as Scout APM's receiver does.
    if application_hook not in connection.execute_wrappers:
        connection.execute_wrappers.append(application_hook)


@pytest.fixture
def recording() -> Iterator[list[str]]:
    SEEN.clear()
    RECORDING.append(True)
    connection_created.connect(install_hook)
    try:
        yield SEEN
    finally:
        connection_created.disconnect(install_hook)
        RECORDING.clear()


async def serve(parallelism: int | None, path: str) -> list[int]:
    """One request to *path*: through Django's handler alone (None), or
    through DBSetMiddleware at *parallelism*."""
    with override_settings(
        ROOT_URLCONF=__name__,
        ASGI_DBSET={
            **getattr(settings, "ASGI_DBSET", {}),
            "DEFAULT_PARALLELISM": parallelism or 1,
        },
    ):
        app = get_asgi_application()
        if parallelism is not None:
            app = DBSetMiddleware(app)
        response = await asyncio.wait_for(request(app, path), 20)
    assert response.status == 200, response.body
    counts: list[int] = response.json()["counts"]
    return counts


@pytest.mark.parametrize("view", ["/gathered/", "/one-by-one/"])
@pytest.mark.parametrize("parallelism", [1, 4])
async def test_a_hook_installed_on_connection_created_sees_every_query(
    recording: list[str], view: str, parallelism: int
) -> None:
    stock = await serve(None, view)
    stock_seen = list(recording)
    recording.clear()
    library = await serve(parallelism, view)

    assert stock_seen == ["default"] * 4
    # (Before: a call that opened the request's connection took the hook off
    # it as it ended, and left its own guard there: 1 query seen of 4.)
    assert (library, recording) == (stock, stock_seen)
