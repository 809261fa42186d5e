"""The demo pages: a dashboard read from the database, and a health check."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from django.db import DatabaseError
from django.db.models import Count, DecimalField, ExpressionWrapper, F, Sum
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

import asgi_dbset

from .models import Customer, Order, OrderLine, Product


async def _top_customers(limit: int = 5) -> list[Customer]:
    return [c async for c in Customer.objects.order_by("-spent", "id")[:limit]]


async def _orders_by_status() -> list[dict[str, Any]]:
    rows = Order.objects.values("status").annotate(n=Count("id")).order_by("status")
    return [row async for row in rows]


async def _revenue_by_category(limit: int = 5) -> list[dict[str, Any]]:
    line_total = ExpressionWrapper(
        F("quantity") * F("unit_price"),
        output_field=DecimalField(max_digits=14, decimal_places=2),
    )
    rows = (
        OrderLine.objects.values("product__category")
        .annotate(revenue=Sum(line_total))
        .order_by("-revenue")[:limit]
    )
    return [row async for row in rows]


async def index(request: HttpRequest) -> HttpResponse:
    # Independent reads: under asgi_dbset's middleware they may run side by side.
    started = time.perf_counter()
    (
        customers,
        products,
        orders,
        lines,
        top_customers,
        by_status,
        by_category,
    ) = await asyncio.gather(
        Customer.objects.acount(),
        Product.objects.acount(),
        Order.objects.acount(),
        OrderLine.objects.acount(),
        _top_customers(),
        _orders_by_status(),
        _revenue_by_category(),
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    context = {
        "counts": {
            "customers": customers,
            "products": products,
            "orders": orders,
            "order lines": lines,
        },
        "seeded": customers > 0,
        "top_customers": top_customers,
        "by_status": by_status,
        "by_category": by_category,
        "elapsed_ms": elapsed_ms,
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
