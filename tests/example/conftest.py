"""Fixtures for the example shop's tests: seeded rows and the example's URLs."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from django.core.management import call_command
from django.test import override_settings

from example_site.shop.models import Customer, OrderLine

# 100 customers, 10 products, 800 orders, about 2,400 order lines: enough for
# every panel to have rows, small enough to seed in a fraction of a second.
SCALE = 0.02

#: What the example's own settings add, on top of the test settings.
EXAMPLE_SETTINGS = {
    "ROOT_URLCONF": "example_site.urls",
    "TEMPLATES": [
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "APP_DIRS": True,
        }
    ],
    "ASGI_DBSET": {"HISTORY": 50, "SERVER_TIMING": True},
}


@pytest.fixture
def shop(transactional_db: None) -> dict[str, int]:
    """The seeded shop, committed, so that every lane's connection sees it."""
    call_command("seed_shop", scale=SCALE, stdout=io.StringIO())
    return {
        "customers": Customer.objects.count(),
        "order_lines": OrderLine.objects.count(),
    }


@pytest.fixture
def example_settings() -> Iterator[None]:
    with override_settings(**EXAMPLE_SETTINGS):
        yield
