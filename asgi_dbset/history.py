"""The last finished requests' sets, for timelines and dashboards.

Off unless ``ASGI_DBSET["HISTORY"]`` is above 0; then ``DBSetMiddleware``
keeps that many summaries, newest last.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from .conf import conf
from .dbset import ConnectionSet
from .records import CallRecord

#: The most requests HISTORY may keep (they are held in memory).
MAX_HISTORY = 100_000

_lock = threading.Lock()
_recent: deque[RequestSummary] = deque(maxlen=1)


@dataclass(frozen=True, slots=True)
class RequestSummary:
    """One finished request: its path, figures and calls (perf_counter seconds)."""

    path: str
    opened_at: float
    closed_at: float
    figures: dict[str, Any]
    records: tuple[CallRecord, ...]


def remember(path: str, dbset: ConnectionSet, size: int | None = None) -> None:
    """Keep *dbset*'s summary; ``size`` is ``HISTORY`` (read now if not given)."""
    size = conf.HISTORY if size is None else size
    if size <= 0:
        return
    global _recent
    summary = RequestSummary(
        path, dbset.opened_at, dbset.closed_at, dbset.figures(), tuple(dbset.records)
    )
    with _lock:
        if _recent.maxlen != size:
            _recent = deque(_recent, maxlen=size)
        _recent.append(summary)


def recent_requests() -> list[RequestSummary]:
    """The last ``HISTORY`` requests served through ``DBSetMiddleware``, oldest first."""
    with _lock:
        return list(_recent)
