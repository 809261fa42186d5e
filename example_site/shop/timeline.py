"""Lay out the last requests' calls as a timeline: one row per lane, one bar per call.

The input is :func:`asgi_dbset.recent_requests`, whose records carry
``perf_counter`` seconds; the output is percentages on one time scale shared by
every request shown, so bars of different requests compare by length.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from asgi_dbset.history import RequestSummary

# Calls shorter than this still get a visible sliver.
MIN_BAR_PERCENT = 0.4
PALETTE = ("#3b82f6", "#10b981", "#f59e0b", "#8b5cf6", "#ef4444", "#14b8a6")
NICE_STEPS = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000)


@dataclass(frozen=True, slots=True)
class Bar:
    name: str
    alias: str
    left: float  # percent of the scale
    width: float
    ms: float
    wait_left: float
    wait_width: float
    wait_ms: float
    color: str

    @property
    def title(self) -> str:
        text = f"{self.name} on {self.alias}: {self.ms:.1f} ms"
        if self.wait_ms >= 0.05:
            text += f", after {self.wait_ms:.1f} ms queued for a lane"
        return text


@dataclass(frozen=True, slots=True)
class LaneRow:
    lane: int
    bars: list[Bar]


@dataclass(frozen=True, slots=True)
class RequestTimeline:
    number: int  # 1 is the oldest request kept
    path: str
    wall_ms: float
    width: float  # percent of the scale: the request's own span
    figures: dict[str, Any]
    lanes: list[LaneRow] = field(default_factory=list)

    @property
    def recorded(self) -> bool:
        return bool(self.lanes)


@dataclass(frozen=True, slots=True)
class Timeline:
    requests: list[RequestTimeline]
    scale_ms: float
    ticks: list[tuple[float, str]]  # (percent, label)
    hidden: int  # requests kept by the history but left out here


# Record names are the sync methods Django's async entry points hand to a thread.
_ENTRY_POINTS = {"_fetch_all": "async for", "next_slice": "aiterator chunk"}


def entry_point(name: str) -> str:
    """The async ORM call that ran ``name``: ``count`` -> ``acount``."""
    return _ENTRY_POINTS.get(name, name if name.startswith("_") else f"a{name}")


_COLORS = {
    "async for": "#3b82f6",
    "acount": "#10b981",
    "aaggregate": "#f59e0b",
    "aiterator chunk": "#8b5cf6",
}


def color_for(name: str) -> str:
    """One colour per kind of call: fixed for the common ones, hashed for the rest."""
    return _COLORS.get(name) or PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def ticks_for(scale_ms: float, most: int = 8) -> list[tuple[float, str]]:
    """Round tick marks from 0 to ``scale_ms``, at most ``most`` + 1 of them."""
    if scale_ms <= 0:
        return [(0.0, "0 ms")]
    step = next((s for s in NICE_STEPS if scale_ms / s <= most), NICE_STEPS[-1])
    marks = []
    value = 0
    while value <= scale_ms:
        marks.append((round(value * 100 / scale_ms, 3), f"{value:g} ms"))
        value += step
    return marks


def _percent(seconds: float, scale_ms: float) -> float:
    return max(0.0, seconds * 1000 * 100 / scale_ms)


def build_timeline(summaries: Sequence[RequestSummary], limit: int = 12) -> Timeline:
    """The last ``limit`` requests of ``summaries`` (oldest first), newest first."""
    numbered = list(enumerate(summaries, start=1))
    shown = numbered[-limit:][::-1] if limit > 0 else []
    spans = [
        max(summary.closed_at - summary.opened_at, 0.0) * 1000 for _, summary in shown
    ]
    scale_ms = max(spans, default=0.0) or 1.0
    requests = []
    for (number, summary), wall_ms in zip(shown, spans, strict=True):
        rows: dict[int, list[Bar]] = {}
        for record in summary.records:
            started = record.started - summary.opened_at
            ended = max(record.ended, record.started) - summary.opened_at
            queued = min(record.queued, record.started) - summary.opened_at
            ms = (ended - started) * 1000
            rows.setdefault(record.lane, []).append(
                Bar(
                    name=entry_point(record.name),
                    alias=record.alias,
                    left=round(_percent(started, scale_ms), 3),
                    width=round(
                        max(_percent(ended - started, scale_ms), MIN_BAR_PERCENT), 3
                    ),
                    ms=ms,
                    wait_left=round(_percent(queued, scale_ms), 3),
                    wait_width=round(_percent(started - queued, scale_ms), 3),
                    wait_ms=(started - queued) * 1000,
                    color=color_for(entry_point(record.name)),
                )
            )
        requests.append(
            RequestTimeline(
                number=number,
                path=summary.path,
                wall_ms=wall_ms,
                width=round(wall_ms * 100 / scale_ms, 3),
                figures=summary.figures,
                lanes=[LaneRow(lane, rows[lane]) for lane in sorted(rows)],
            )
        )
    return Timeline(
        requests=requests,
        scale_ms=scale_ms,
        ticks=ticks_for(scale_ms),
        hidden=len(summaries) - len(shown),
    )


def as_json(timeline: Timeline) -> dict[str, Any]:
    return {
        "scale_ms": round(timeline.scale_ms, 3),
        "hidden": timeline.hidden,
        "requests": [
            {
                "number": request.number,
                "path": request.path,
                "wall_ms": round(request.wall_ms, 3),
                "figures": request.figures,
                "lanes": [
                    {
                        "lane": row.lane,
                        "calls": [
                            {
                                "name": bar.name,
                                "alias": bar.alias,
                                "ms": round(bar.ms, 3),
                                "wait_ms": round(bar.wait_ms, 3),
                                "left": bar.left,
                                "width": bar.width,
                            }
                            for bar in row.bars
                        ],
                    }
                    for row in request.lanes
                ],
            }
            for request in timeline.requests
        ],
    }
