"""Fill the shop with deterministic data: ``python -m example_site seed_shop``.

The same ``--scale`` always gives the same rows (``random.Random(42)``). At the default
scale: 5,000 customers, 500 products, 40,000 orders and about 120,000 order lines.
Does nothing if the shop already has customers, unless ``--reset`` is given.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from example_site.shop.models import Customer, Order, OrderLine, Product

SEED = 42
BATCH = 5_000
BASE_SIZES = {"customers": 5_000, "products": 500, "orders": 40_000}
START = datetime(2025, 1, 1, tzinfo=UTC)

FIRST = ["Ada", "Alan", "Barbara", "Claude", "Donald", "Edsger", "Frances", "Grace"]
FIRST += ["Hedy", "Ivan", "John", "Katherine", "Leslie", "Margaret", "Niklaus", "Radia"]
LAST = ["Allen", "Backus", "Cerf", "Dijkstra", "Engelbart", "Floyd", "Goldberg"]
LAST += ["Hamilton", "Hopper", "Kahn", "Knuth", "Lamport", "Liskov", "Perlman", "Wirth"]
COUNTRIES = ["CH", "DE", "DK", "ES", "FR", "GB", "IT", "NL", "PL", "SE", "US"]
CATEGORIES = ["books", "games", "garden", "kitchen", "music", "office", "outdoor"]
CATEGORIES += ["tools", "toys"]
ADJECTIVES = ["Blue", "Compact", "Deluxe", "Handy", "Quiet", "Rapid", "Sturdy", "Tiny"]
NOUNS = ["Lamp", "Kettle", "Notebook", "Puzzle", "Rake", "Speaker", "Tent", "Wrench"]
STATUSES = [Order.Status.OPEN, Order.Status.PAID, Order.Status.SHIPPED]
STATUS_WEIGHTS = [2, 3, 5]


def batches(items: Sequence[Any], size: int = BATCH) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Command(BaseCommand):
    help = "Create deterministic demo data for the example shop (skips if seeded)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--scale",
            type=float,
            default=1.0,
            help="multiply the default sizes (1.0: 40,000 orders, ~120,000 lines)",
        )
        parser.add_argument(
            "--reset",
            action="store_true",
            help="delete the shop's rows first, then seed again",
        )

    def handle(self, *args: Any, scale: float, reset: bool, **options: Any) -> None:
        if scale <= 0:
            raise CommandError(f"--scale must be more than 0, not {scale}.")
        sizes = {name: max(1, round(n * scale)) for name, n in BASE_SIZES.items()}
        started = time.monotonic()
        with transaction.atomic():
            if reset:
                OrderLine.objects.all().delete()
                Order.objects.all().delete()
                Customer.objects.all().delete()
                Product.objects.all().delete()
            elif Customer.objects.exists():
                self.stdout.write(
                    f"The shop is already seeded ({Customer.objects.count()} customers, "
                    f"{OrderLine.objects.count()} order lines); nothing to do. "
                    "Use --reset to seed it again."
                )
                return
            counts = self.seed(random.Random(SEED), **sizes)
        summary = ", ".join(f"{n:,} {name}" for name, n in counts.items())
        self.stdout.write(
            self.style.SUCCESS(
                f"Seeded {summary} in {time.monotonic() - started:.1f} s."
            )
        )

    def seed(
        self, rng: random.Random, *, customers: int, products: int, orders: int
    ) -> dict[str, int]:
        product_rows = [
            Product(
                name=f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {i + 1}",
                category=rng.choice(CATEGORIES),
                price=Decimal(rng.randint(199, 49_999)) / 100,
                stock=rng.randint(0, 500),
            )
            for i in range(products)
        ]

        # Orders and lines as plain tuples first: the customers' totals must be
        # known before the customers are written.
        spent = [Decimal(0)] * customers
        order_rows: list[tuple[int, datetime, str]] = []
        line_rows: list[list[tuple[int, int, Decimal]]] = []
        for _ in range(orders):
            customer = rng.randrange(customers)
            created_at = START + timedelta(seconds=rng.randrange(365 * 24 * 3600))
            status = rng.choices(STATUSES, STATUS_WEIGHTS)[0]
            lines = []
            for _ in range(rng.randint(1, 5)):
                product = rng.randrange(products)
                quantity = rng.randint(1, 4)
                price = product_rows[product].price
                lines.append((product, quantity, price))
                if status != Order.Status.OPEN:
                    spent[customer] += quantity * price
            order_rows.append((customer, created_at, status))
            line_rows.append(lines)

        customer_rows = [
            Customer(
                name=f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                email=f"customer{i + 1}@example.com",
                country=rng.choice(COUNTRIES),
                spent=spent[i],
            )
            for i in range(customers)
        ]
        for batch in batches(customer_rows):
            Customer.objects.bulk_create(batch)
        for batch in batches(product_rows):
            Product.objects.bulk_create(batch)

        n_lines = 0
        product_ids = [product.pk for product in product_rows]
        for first in range(0, orders, BATCH):
            created = Order.objects.bulk_create(
                Order(customer_id=customer_rows[c].pk, created_at=at, status=status)
                for c, at, status in order_rows[first : first + BATCH]
            )
            # Plain ids, not instances: building 100k+ lines is the slow part.
            lines_batch = [
                OrderLine(
                    order_id=order.pk,
                    product_id=product_ids[p],
                    quantity=quantity,
                    unit_price=price,
                )
                for order, lines in zip(
                    created, line_rows[first : first + BATCH], strict=True
                )
                for p, quantity, price in lines
            ]
            OrderLine.objects.bulk_create(lines_batch)
            n_lines += len(lines_batch)
        return {
            "customers": customers,
            "products": products,
            "orders": orders,
            "order lines": n_lines,
        }
