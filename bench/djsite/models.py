from __future__ import annotations

from django.db import models


class Item(models.Model):
    """bench_item, created and seeded by the harness (bench/run.py)."""

    category = models.IntegerField()
    price = models.IntegerField()
    qty = models.IntegerField()
    name = models.CharField(max_length=32)

    class Meta:
        managed = False
        db_table = "bench_item"

    def __str__(self) -> str:
        return self.name
