"""Print, as JSON, whether Django still sends the SQL the ceiling sends.

``python -m bench.sqlcheck`` (the harness runs it with BENCH_VARIANT=stock):
runs the views' querysets synchronously, captures the SQL each executes and
compares it with bench.config's strings.
"""

from __future__ import annotations

import json
import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.djsite.settings")

import django

django.setup()

from django.db import connection  # noqa: E402

from bench import config  # noqa: E402
from bench.djsite import views  # noqa: E402


def captured(run: Any) -> str:
    seen: list[str] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        run()
    return seen[-1]


def main() -> None:
    pairs = {
        "W1/W4": (
            captured(lambda: views.sleep_queryset().get(pk=1)),
            config.SLEEP_SQL,
        ),
        "W2": (
            captured(lambda: views.aggregate_queryset(0).aggregate(**views.AGGREGATES)),
            config.AGGREGATE_SQL,
        ),
        "W3": (
            captured(lambda: views.Item.objects.get(pk=1)),
            config.LOOKUP_SQL,
        ),
    }
    result = {
        name: {
            "django": django_sql,
            "ceiling": ceiling_sql,
            "same": django_sql == ceiling_sql,
        }
        for name, (django_sql, ceiling_sql) in pairs.items()
    }
    same = all(v["same"] for v in result.values())
    result["summary"] = (
        "Django and the ceiling send the same SQL"
        if same
        else "the ceiling's SQL differs from Django's: "
        + ", ".join(
            n for n, v in result.items() if isinstance(v, dict) and not v["same"]
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
