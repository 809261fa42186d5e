"""A Starlette app on the shop's Django models, served under ``/starlette/``.

``example_site.asgi`` mounts it beside Django, behind the same
``DBSetMiddleware``: the middleware gives each of its requests a connection set
and a thread of its own (Starlette has no ``ThreadSensitiveContext``), and
returns the request's connection to the pool when the response is sent.
``async with db_parallelism(n)`` plays the decorator's part.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dbset import db_parallelism
from example_site.shop.panels import PANELS, Gathered, gather_panels, parse_latency
from example_site.shop.views import PARALLELISM, request_figures


def _latency(request: Request) -> float:
    return parse_latency(request.query_params.get("latency"))


def _payload(gathered: Gathered, *, parallel: bool) -> dict[str, Any]:
    return {
        "served_by": "starlette",
        "parallel": parallel,
        "figures": request_figures(gathered),
        "panels": gathered.data,
    }


def _bad_request(exc: ValueError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


async def panels(request: Request) -> JSONResponse:
    """Every panel, or ``?panel=<name>`` (repeatable), on up to PARALLELISM connections."""
    names = request.query_params.getlist("panel") or None
    unknown = [name for name in names or () if name not in PANELS]
    if unknown:
        return JSONResponse(
            {"error": f"No panel {unknown[0]!r}; the panels are: {', '.join(PANELS)}."},
            status_code=404,
        )
    try:
        latency = _latency(request)
    except ValueError as exc:
        return _bad_request(exc)
    async with db_parallelism(PARALLELISM):
        gathered = await gather_panels(names, latency=latency)
        # Read the figures inside the block, where the set runs at PARALLELISM.
        return JSONResponse(_payload(gathered, parallel=True))


async def panels_serial(request: Request) -> JSONResponse:
    """The same panels without ``db_parallelism``: one connection, one at a time."""
    try:
        latency = _latency(request)
    except ValueError as exc:
        return _bad_request(exc)
    gathered = await gather_panels(latency=latency)
    return JSONResponse(_payload(gathered, parallel=False))


starlette_app = Starlette(
    routes=[
        Route("/", panels),
        Route("/serial", panels_serial),
    ]
)
