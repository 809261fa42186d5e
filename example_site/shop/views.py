"""The example shop's Django pages and JSON API.

- ``/dashboard/`` gathers every panel under ``@db_parallelism(PARALLELISM)``;
  ``/dashboard/serial/`` is the same view without the decorator, so its queries
  run one after another on the request's one connection, as stock Django does;
  ``/dashboard/snapshot/`` adds ``snapshot=True``: every panel, on every lane,
  reads one snapshot, so their totals agree while orders come in.
- ``/api/panels/`` (and ``/api/panels/serial/``, ``/api/panels/<name>/``) serve
  the same panels as JSON, with the request's figures.
- ``/timeline/`` draws the lanes of the last requests from ``recent_requests()``.
- ``/api/stats/`` shows the process-wide counters and the pool.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import BadRequest
from django.db import DatabaseError, connections
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.decorators import method_decorator
from django.views import View

import asgi_dbset
from asgi_dbset import active_set, db_parallelism, get_stats, recent_requests
from asgi_dbset.history import RequestSummary

from .models import Customer
from .panels import PANELS, Gathered, gather_panels, parse_latency
from .timeline import as_json, build_timeline

#: Connections the parallel pages may use at once (lane 0 included).
PARALLELISM = 4


def request_figures(gathered: Gathered) -> dict[str, Any]:
    """How the panels ran: the view's own timing, and the connection set's figures.

    At parallelism 1 a set hands every call to stock Django without recording
    it, so ``calls`` is 0 there: the calls ran one at a time on one connection.
    """
    dbset = active_set()
    figures = dbset.figures() if dbset is not None else {}
    recorded = bool(figures.get("calls"))
    panel_ms = sum(t.ms for t in gathered.timings)
    return {
        "elapsed_ms": round(gathered.elapsed_ms, 1),
        "panel_ms": round(panel_ms, 1),
        "parallelism": dbset.parallelism if dbset is not None else 1,
        "lanes_used": figures["lanes_used"] if recorded else 1,
        "recorded": recorded,
        "set": figures,
    }


def _latency(request: HttpRequest) -> float:
    try:
        return parse_latency(request.GET.get("latency"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _panel_rows(gathered: Gathered) -> list[dict[str, Any]]:
    """Each panel's bar for the page's own small timeline, as percentages."""
    scale = max(gathered.elapsed_ms, 0.001)
    return [
        {
            "name": t.name.replace("_", " "),
            "ms": t.ms,
            "left": round(t.started_ms * 100 / scale, 2),
            "width": round(max(t.ms * 100 / scale, 0.5), 2),
        }
        for t in gathered.timings
    ]


def consistency(data: dict[str, Any]) -> dict[str, Any]:
    """Two panels that count the same orders: the totals panel's count, and the
    orders by status added up. Read from one snapshot they always agree."""
    orders = int(data["totals"]["orders"])
    by_status = sum(int(row["orders"]) for row in data["orders_by_status"])
    return {"orders": orders, "by_status": by_status, "agree": orders == by_status}


async def _render_dashboard(
    request: HttpRequest, *, parallel: bool, snapshot: bool = False
) -> HttpResponse:
    latency = _latency(request)
    gathered = await gather_panels(latency=latency)
    context = {
        **gathered.data,
        "parallel": parallel,
        "snapshot": snapshot,
        "consistency": consistency(gathered.data),
        "figures": request_figures(gathered),
        "panel_rows": _panel_rows(gathered),
        "latency_ms": round(latency * 1000),
        "query": f"?latency={round(latency * 1000)}" if latency else "",
        "version": asgi_dbset.__version__,
    }
    return render(request, "shop/dashboard.html", context)


@db_parallelism(PARALLELISM)
async def dashboard(request: HttpRequest) -> HttpResponse:
    return await _render_dashboard(request, parallel=True)


async def dashboard_serial(request: HttpRequest) -> HttpResponse:
    return await _render_dashboard(request, parallel=False)


@db_parallelism(PARALLELISM, snapshot=True)
async def dashboard_snapshot(request: HttpRequest) -> HttpResponse:
    return await _render_dashboard(request, parallel=True, snapshot=True)


def _panels_json(gathered: Gathered, *, parallel: bool) -> JsonResponse:
    return JsonResponse(
        {
            "parallel": parallel,
            "figures": request_figures(gathered),
            "timings": [
                {
                    "panel": t.name,
                    "started_ms": round(t.started_ms, 3),
                    "ended_ms": round(t.ended_ms, 3),
                }
                for t in gathered.timings
            ],
            "panels": gathered.data,
        }
    )


class PanelsAPI(View):
    """``GET /api/panels/``: every panel, or one (``/api/panels/<name>/``), in parallel."""

    @method_decorator(db_parallelism(PARALLELISM))
    async def get(self, request: HttpRequest, name: str | None = None) -> JsonResponse:
        if name is not None and name not in PANELS:
            return JsonResponse(
                {"error": f"No panel {name!r}; the panels are: {', '.join(PANELS)}."},
                status=404,
            )
        gathered = await gather_panels(
            None if name is None else [name], latency=_latency(request)
        )
        return _panels_json(gathered, parallel=True)


async def panels_serial(request: HttpRequest) -> JsonResponse:
    """``GET /api/panels/serial/``: the same panels, without ``db_parallelism``."""
    return _panels_json(await gather_panels(latency=_latency(request)), parallel=False)


def _limit(request: HttpRequest, default: int = 10) -> int:
    try:
        return max(1, min(int(request.GET.get("limit", default)), 50))
    except ValueError:
        return default


#: Requests the timeline leaves out: its own, health checks, the browser's icon.
NOT_DRAWN = ("/timeline/", "/api/timeline/", "/healthz", "/favicon.ico")


def drawn_requests() -> list[RequestSummary]:
    return [s for s in recent_requests() if s.path not in NOT_DRAWN]


async def timeline(request: HttpRequest) -> HttpResponse:
    summaries = drawn_requests()
    context = {
        "timeline": build_timeline(summaries, limit=_limit(request)),
        "history_size": getattr(settings, "ASGI_DBSET", {}).get("HISTORY", 0),
        "kept": len(summaries),
    }
    return render(request, "shop/timeline.html", context)


async def timeline_json(request: HttpRequest) -> JsonResponse:
    timeline = build_timeline(drawn_requests(), limit=_limit(request))
    return JsonResponse(as_json(timeline))


def pool_stats() -> dict[str, dict[str, int]]:
    """Each pooled alias's ``psycopg_pool`` statistics (zero values may be left out)."""
    found = {}
    for alias in connections:
        pool = getattr(connections[alias], "_connection_pools", {}).get(alias)
        if pool is not None:
            found[alias] = dict(pool.get_stats())
    return found


async def stats(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "asgi_dbset": get_stats(),
            "pools": pool_stats(),
            "recent_requests": len(recent_requests()),
        }
    )


async def index(request: HttpRequest) -> HttpResponse:
    customers = await Customer.objects.acount()
    context = {
        "seeded": customers > 0,
        "customers": customers,
        "panels": list(PANELS),
        "parallelism": PARALLELISM,
        "version": asgi_dbset.__version__,
    }
    return render(request, "shop/index.html", context)


async def healthz(request: HttpRequest) -> JsonResponse:
    try:
        await Customer.objects.aexists()
    except DatabaseError as exc:
        return JsonResponse(
            {"status": "error", "database": False, "error": str(exc)}, status=503
        )
    return JsonResponse(
        {"status": "ok", "database": True, "asgi_dbset": asgi_dbset.__version__}
    )
