"""The dashboard's panels: independent read-only queries, shared by every front end.

Each panel is an ``async`` function that returns plain JSON-ready data (money as
strings with two decimals, months as ``"2025-03"``), so the Django pages, the JSON
API and the Starlette app all serve the same numbers. :func:`gather_panels` runs
them with ``asyncio.gather``: under a connection set with a parallelism above 1
they run side by side on several connections; otherwise Django runs them one after
another on the request's single connection.

``latency`` (seconds) adds a server-side ``pg_sleep`` once to every query, to show
what a remote or busy database server does to a page of many small queries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from django.db.models import (
    BooleanField,
    Count,
    DecimalField,
    ExpressionWrapper,
    F,
    Model,
    QuerySet,
    Sum,
)
from django.db.models.expressions import RawSQL
from django.db.models.functions import TruncMonth

from .models import Customer, Order, OrderLine, Product

M = TypeVar("M", bound=Model)

#: Products with fewer units than this in stock are listed under "Low stock".
LOW_STOCK = 25
#: How many rows the top-N panels show.
TOP = 8
#: The most simulated latency a request may ask for, in seconds.
MAX_LATENCY = 2.0

LINE_TOTAL = ExpressionWrapper(
    F("quantity") * F("unit_price"),
    output_field=DecimalField(max_digits=14, decimal_places=2),
)
SOLD = (Order.Status.PAID, Order.Status.SHIPPED)


def money(value: Decimal | None) -> str:
    return f"{value or Decimal(0):.2f}"


def share(value: Decimal | int | None, largest: Decimal | int | None) -> float:
    """``value`` as a percentage of ``largest``, for the width of a bar."""
    if not value or not largest:
        return 0.0
    return round(float(value) * 100 / float(largest), 1)


def slow(queryset: QuerySet[M], latency: float) -> QuerySet[M]:
    """The queryset, made to wait ``latency`` seconds on the server once per query.

    The subquery has no outer reference, so PostgreSQL runs it once as an
    InitPlan, whatever the number of rows.
    """
    if latency <= 0:
        return queryset
    gate = RawSQL(
        "(SELECT true FROM pg_sleep(%s))", [latency], output_field=BooleanField()
    )
    return queryset.filter(gate)


def _sold_lines(latency: float) -> QuerySet[OrderLine]:
    return slow(OrderLine.objects.filter(order__status__in=SOLD), latency)


# -- the panels ------------------------------------------------------------------


async def totals(latency: float = 0.0) -> dict[str, Any]:
    customers, products, orders, sales = await asyncio.gather(
        slow(Customer.objects.all(), latency).acount(),
        slow(Product.objects.all(), latency).acount(),
        slow(Order.objects.all(), latency).acount(),
        _sold_lines(latency).aaggregate(
            revenue=Sum(LINE_TOTAL), sold_orders=Count("order", distinct=True)
        ),
    )
    revenue = sales["revenue"] or Decimal(0)
    sold_orders = sales["sold_orders"] or 0
    average = revenue / sold_orders if sold_orders else Decimal(0)
    return {
        "customers": customers,
        "products": products,
        "orders": orders,
        "sold_orders": sold_orders,
        "revenue": money(revenue),
        "average_order": money(average),
    }


async def revenue_by_month(latency: float = 0.0) -> list[dict[str, Any]]:
    rows = (
        _sold_lines(latency)
        .annotate(month=TruncMonth("order__created_at"))
        .values("month")
        .annotate(revenue=Sum(LINE_TOTAL), units=Sum("quantity"))
        .order_by("month")
    )
    found = [row async for row in rows]
    largest = max((row["revenue"] for row in found), default=None)
    return [
        {
            "month": row["month"].strftime("%Y-%m"),
            "revenue": money(row["revenue"]),
            "units": row["units"],
            "share": share(row["revenue"], largest),
        }
        for row in found
    ]


async def top_customers(latency: float = 0.0) -> list[dict[str, Any]]:
    rows = slow(Customer.objects.order_by("-spent", "id"), latency)[:TOP]
    return [
        {
            "name": c.name,
            "email": c.email,
            "country": c.country,
            "spent": money(c.spent),
        }
        async for c in rows
    ]


async def top_products(latency: float = 0.0) -> list[dict[str, Any]]:
    rows = (
        _sold_lines(latency)
        .values("product__name", "product__category")
        .annotate(revenue=Sum(LINE_TOTAL), units=Sum("quantity"))
        .order_by("-revenue", "product__name")[:TOP]
    )
    found = [row async for row in rows]
    largest = found[0]["revenue"] if found else None
    return [
        {
            "name": row["product__name"],
            "category": row["product__category"],
            "units": row["units"],
            "revenue": money(row["revenue"]),
            "share": share(row["revenue"], largest),
        }
        for row in found
    ]


async def low_stock(latency: float = 0.0) -> list[dict[str, Any]]:
    rows = (
        slow(Product.objects.filter(stock__lt=LOW_STOCK), latency)
        .annotate(units_sold=Sum("order_lines__quantity"))
        .order_by("stock", "id")[:TOP]
    )
    return [
        {
            "name": p.name,
            "category": p.category,
            "stock": p.stock,
            "units_sold": p.units_sold or 0,
        }
        async for p in rows
    ]


async def orders_by_status(latency: float = 0.0) -> list[dict[str, Any]]:
    rows = (
        slow(Order.objects.all(), latency)
        .values("status")
        .annotate(orders=Count("id"))
        .order_by("status")
    )
    found = [row async for row in rows]
    largest = max((row["orders"] for row in found), default=None)
    return [
        {
            "status": row["status"],
            "orders": row["orders"],
            "share": share(row["orders"], largest),
        }
        for row in found
    ]


async def revenue_by_country(latency: float = 0.0) -> list[dict[str, Any]]:
    rows = (
        _sold_lines(latency)
        .values("order__customer__country")
        .annotate(revenue=Sum(LINE_TOTAL))
        .order_by("-revenue", "order__customer__country")
    )
    found = [row async for row in rows]
    largest = found[0]["revenue"] if found else None
    return [
        {
            "country": row["order__customer__country"],
            "revenue": money(row["revenue"]),
            "share": share(row["revenue"], largest),
        }
        for row in found
    ]


async def revenue_by_category(latency: float = 0.0) -> list[dict[str, Any]]:
    rows = (
        _sold_lines(latency)
        .values("product__category")
        .annotate(revenue=Sum(LINE_TOTAL))
        .order_by("-revenue", "product__category")
    )
    found = [row async for row in rows]
    largest = found[0]["revenue"] if found else None
    return [
        {
            "category": row["product__category"],
            "revenue": money(row["revenue"]),
            "share": share(row["revenue"], largest),
        }
        for row in found
    ]


#: Every panel, by the name the API and the templates use, in page order.
PANELS: dict[str, Callable[[float], Awaitable[Any]]] = {
    "totals": totals,
    "revenue_by_month": revenue_by_month,
    "top_customers": top_customers,
    "top_products": top_products,
    "low_stock": low_stock,
    "orders_by_status": orders_by_status,
    "revenue_by_country": revenue_by_country,
    "revenue_by_category": revenue_by_category,
}


@dataclass(frozen=True, slots=True)
class PanelTiming:
    """When one panel started and ended, in ms from the start of the gather."""

    name: str
    started_ms: float
    ended_ms: float

    @property
    def ms(self) -> float:
        return self.ended_ms - self.started_ms


@dataclass(frozen=True, slots=True)
class Gathered:
    data: dict[str, Any]
    timings: list[PanelTiming]
    elapsed_ms: float


async def gather_panels(
    names: list[str] | None = None, *, latency: float = 0.0
) -> Gathered:
    """Run the named panels (all by default) with ``asyncio.gather``, timing each."""
    chosen = list(PANELS) if names is None else names
    origin = time.perf_counter()

    async def timed(name: str) -> tuple[Any, PanelTiming]:
        started = time.perf_counter()
        result = await PANELS[name](latency)
        ended = time.perf_counter()
        return result, PanelTiming(
            name, (started - origin) * 1000, (ended - origin) * 1000
        )

    results = await asyncio.gather(*(timed(name) for name in chosen))
    elapsed_ms = (time.perf_counter() - origin) * 1000
    return Gathered(
        data={name: result for name, (result, _) in zip(chosen, results, strict=True)},
        timings=[timing for _, timing in results],
        elapsed_ms=elapsed_ms,
    )


def parse_latency(raw: str | None) -> float:
    """``?latency=`` in milliseconds, as seconds; refuse what is not a number."""
    if not raw:
        return 0.0
    try:
        ms = float(raw)
    except ValueError:
        raise ValueError(
            f"latency must be a number of milliseconds such as 50, not {raw!r}."
        ) from None
    if not 0 <= ms <= MAX_LATENCY * 1000:
        raise ValueError(
            f"latency must be between 0 and {MAX_LATENCY * 1000:.0f} ms, not {raw}."
        )
    return ms / 1000
