"""A Starlette app that uses the Django ORM, for the middleware tests."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dbset import db_parallelism
from tests.views import dashboard_data


def _sleep(request: Request) -> float:
    return float(request.query_params.get("sleep", "0"))


async def dashboard(request: Request) -> JSONResponse:
    async with db_parallelism(3):
        return JSONResponse(await dashboard_data(_sleep(request)))


async def plain(request: Request) -> JSONResponse:
    return JSONResponse(await dashboard_data(_sleep(request)))


starlette_app = Starlette(
    routes=[Route("/dashboard", dashboard), Route("/plain", plain)]
)
