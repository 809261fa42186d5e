"""BENCH_TRACE=1: sum every request's ConnectionSet.figures() (bench.diagnose).

An ASGI wrapper outside DBSetMiddleware: when the app returns, the request's
set is closed and its figures are final. /stats/ reports the sums.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

_lock = threading.Lock()
totals: Counter[str] = Counter()
lanes_used: Counter[int] = Counter()


def snapshot() -> dict[str, Any]:
    with _lock:
        return {"totals": dict(totals), "lanes_used": dict(sorted(lanes_used.items()))}


class Trace:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        dbset = scope.get("asgi_dbset")
        if scope["type"] != "http" or dbset is None or scope["path"] == "/stats/":
            return
        figures = dbset.figures()
        with _lock:
            totals["requests"] += 1
            for key in ("calls", "wait_ms", "query_ms", "wall_ms"):
                totals[key] += figures[key]
            lanes_used[figures["lanes_used"]] += 1
